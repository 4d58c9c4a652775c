"""The T2I folder's shard index is downloaded with the weights, so it is untrusted input."""
import json

import pytest

from bitdance_jax.porting.convention import PortingError
from bitdance_jax.porting.t2i import LLM_INDEX_FILE, _llm_shard_files


def _folder(tmp_path, weight_map):
    src = tmp_path / "model"
    src.mkdir()
    (src / "model-00001-of-00001.safetensors").write_bytes(b"")
    (tmp_path / "outside.safetensors").write_bytes(b"")
    (src / LLM_INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    return str(src)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors",
                                   ".hidden.safetensors", "", "..\\outside.safetensors", 3])
def test_shard_names_outside_the_folder_are_refused(tmp_path, shard):
    src = _folder(tmp_path, {"a.weight": "model-00001-of-00001.safetensors", "b.weight": shard})
    with pytest.raises(PortingError, match="outside its folder"):
        _llm_shard_files(src)


def test_plain_shard_names_are_read(tmp_path):
    src = _folder(tmp_path, {"a.weight": "model-00001-of-00001.safetensors"})
    assert [p.split("/")[-1] for p in _llm_shard_files(src)] == ["model-00001-of-00001.safetensors"]
