"""``bitdance.json`` is read before anything else of a directory: any content that is not a
JSON object is a clean ``CheckpointError``, from every loader."""
import json

import pytest

import bitdance_jax as bd
from bitdance_jax.checkpointing.param_dir import META_FILE, CheckpointError, read_meta
from bitdance_jax.porting.convention import PortingError, read_json


@pytest.mark.parametrize("content", [b"[1, 2]", b'"text"', b"3", b"null", b"{", b"\xff\xfe"])
def test_meta_that_is_not_an_object_is_refused(tmp_path, content):
    (tmp_path / META_FILE).write_bytes(content)
    with pytest.raises(CheckpointError, match="is corrupt"):
        read_meta(str(tmp_path))
    for load in (bd.load_model, bd.load_tokenizer, bd.load_t2i):   # a list was AttributeError
        with pytest.raises(ValueError, match="corrupt"):
            load(str(tmp_path))


def test_released_config_json_must_be_an_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps([{"hidden_size": 8}]))
    with pytest.raises(PortingError, match="should hold a JSON object, found a list"):
        read_json(str(path), "LLM config")
