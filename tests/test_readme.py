"""Every Python block of the README runs, in order and in one namespace as a reader would type
them, on the golden tiny models: the documented ``hf:`` ids resolve through an offline Hub
cache holding the fixtures, and the documented output paths (``out/...``) are ported from
them. Only what a tiny model cannot take is swapped: class ids beyond its classes and image
sizes beyond its latent grid. A documented call that breaks fails here."""
import os
import re

import numpy as np
import pytest

import golden
import hub_cache
from bitdance_jax import port_imagenet_checkpoint
from bitdance_jax.porting.cli import port

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
HUB_C2I = "shallowdream204/BitDance-ImageNet"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _fit_to_tiny_models(code: str) -> str:
    """Class ids modulo the tiny model's classes; image sizes to the golden T2I run's."""
    num_classes = golden.case("ar_parallel")["config"]["model_kwargs"]["num_classes"]
    height, width = golden.case("t2i_gen")["config"]["image_size"]
    code = re.sub(r"class_ids=\[([\d, ]+)\]", lambda m: "class_ids=[%s]" % ", ".join(
        str(int(i) % num_classes) for i in m.group(1).split(",")), code)
    return code.replace("height=1024, width=1024", f"height={height}, width={width}")


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A directory holding the README's ``out/...`` paths, and an offline Hub cache."""
    home = str(tmp_path / "hf_home")
    hub_cache.add_snapshot(home, HUB_C2I, {"BitDance_B_4x.pt": golden.path("ar_parallel", "checkpoint.pt")})
    monkeypatch.setenv("HF_HOME", home)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("BITDANCE_JAX_CACHE", str(tmp_path / "ported"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "out"
    out.mkdir()
    port(golden.path("tokenizer", "ae.pt"), str(out / "ae_d16c32"))
    port_imagenet_checkpoint(golden.path("ar_parallel", "checkpoint.pt"), str(out / "b16x"))
    os.symlink(golden.path("t2i_model"), out / "t2i_14b")   # load_t2i reads released folders
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_has_python_blocks():
    with open(README) as f:
        blocks = python_blocks(f.read())
    assert len(blocks) >= 4 and all("import" in b or "bd." in b for b in blocks)


def test_every_python_block_of_the_readme_runs(workspace):
    with open(README) as f:
        blocks = python_blocks(f.read())
    images_hw = golden.case("tokenizer")["arrays"]["images"]["shape"][2:]
    rng = np.random.default_rng(0)
    # The tokenizer block works on the reader's own images ("float [B,H,W,3] in [-1,1]").
    namespace = {"images": rng.uniform(-1, 1, (2, *images_hw, 3)).astype(np.float32)}
    for k, block in enumerate(blocks):
        code = _fit_to_tiny_models(block)
        try:
            exec(compile(code, f"README.md python block {k + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"README python block {k + 1} fails:\n{code}\n{type(e).__name__}: {e}") from e
    assert namespace["images"].dtype == np.uint8          # the last c2i sample grid
    assert namespace["image"].size[::-1] == tuple(golden.case("t2i_gen")["config"]["image_size"])
