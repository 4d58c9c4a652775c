"""The embedded default: no download, 2 CPU cores, about 20 minutes.

Trains the tiny binary tokenizer (configs/digits_tokenizer.py) on scikit-learn's digits
upsampled to 32x32, then the tiny next-patch BitDance (configs/digits_bitdance.py,
parallel_num 4, classifier-free guidance) on its latents, writes a class-conditional sample
grid (one row per digit) to <workdir>/bitdance/samples/final.png and scores it with a
classifier fitted on the real digits (<workdir>/score.json).

    python -m bitdance_jax.train --config configs/default.py --workdir out/default
"""
import importlib.util
import os

import ml_collections

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(_HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = ml_collections.ConfigDict()
    c.kind = "pipeline"
    c.stages = ("tokenizer", "bitdance")
    c.tokenizer = _load("digits_tokenizer")
    c.bitdance = _load("digits_bitdance")
    c.bitdance.tokenizer_from_stage = "tokenizer"
    c.score_digits = True
    return c
