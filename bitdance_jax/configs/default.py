"""The embedded default: no download, 2 CPU cores.

Trains the tiny binary tokenizer (digits_tokenizer) on scikit-learn's digits upsampled to
32x32, then the tiny next-patch BitDance (digits_bitdance: parallel_num 4, classifier-free
guidance) on its latents, writes a class-conditional sample grid (one row per digit) to
<workdir>/bitdance/samples/final.png and scores it with a classifier fitted on the real
digits (<workdir>/score.json).

    python -m bitdance_jax.train --config configs/default.py --workdir out/default
"""
import ml_collections

from bitdance_jax.configs import digits_bitdance, digits_tokenizer


def get_config():
    c = ml_collections.ConfigDict()
    c.kind = "pipeline"
    c.stages = ("tokenizer", "bitdance")
    c.tokenizer = digits_tokenizer.get_config()
    c.bitdance = digits_bitdance.get_config()
    c.bitdance.tokenizer_from_stage = "tokenizer"
    c.score_digits = True
    return c
