"""Sampling defaults: the compute dtype per backend (bf16-mixed on GPU/TPU, float32 on CPU,
overridable), bf16 latents agreeing with float32 on >= 99% of bits, and the guidance of
models without a published scale (4.6, with a note) wherever a directory gets one.

``pytest -s`` prints the bit agreement.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from bitdance_jax.c2i import api
from bitdance_jax.c2i.config import (DEFAULT_CFG_SCALES, FALLBACK_CFG_SCALE, RELEASED_MODELS,
                                     BitDanceConfig, default_cfg_scale)
from bitdance_jax.c2i.model import init_params
from bitdance_jax.c2i.sampler import Sampler
from bitdance_jax.checkpointing import fingerprint, param_dir
from bitdance_jax.configs.common import imagenet_bitdance
from bitdance_jax.nn import precision
from bitdance_jax.parallel import sharding
from bitdance_jax.tokenizer.model import BinaryAutoencoder, TokenizerConfig
from sampling_check import bit_agreement

CONFIG = BitDanceConfig(dim=64, n_layer=2, n_head=4, diff_layers=2, diff_dim=64,
                        diff_adanln_layers=1, latent_dim=16, grid_size=8, cls_token_num=2,
                        num_classes=10, parallel_num=4)
TOKENIZER = TokenizerConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16,
                            num_codebooks=2)


def random_params(config, seed=0, final_std=0.1):
    """A fresh init whose zero-initialised layers (adaLN, final layer) are made random:
    N(0, 0.02), the final linear N(0, final_std), so the head predicts O(1) values as a
    trained one does (a fresh head predicts exactly 0)."""
    def make(rng):
        flat, treedef = jax.tree_util.tree_flatten_with_path(nn.unbox(init_params(config, rng)))
        keys = jax.random.split(jax.random.fold_in(rng, 1), len(flat))
        leaves = []
        for (path, x), k in zip(flat, keys):
            name = jax.tree_util.keystr(path)
            std = final_std if "final_layer" in name and "'linear'" in name else 0.02
            leaves.append(jnp.where(jnp.any(x != 0), x, std * jax.random.normal(k, x.shape)))
        return jax.tree.unflatten(treedef, leaves)
    return jax.device_get(jax.jit(make)(jax.random.PRNGKey(seed)))


@pytest.fixture(scope="module")
def params():
    return random_params(CONFIG)


def test_dtype_default_per_backend(monkeypatch):
    assert precision.default_sampling_dtype("cpu") == jnp.float32
    for backend in ("gpu", "tpu"):
        assert precision.default_sampling_dtype(backend) == jnp.bfloat16
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    assert Sampler(CONFIG, mesh=mesh).dtype == jnp.float32          # this test runs on CPU
    assert Sampler(CONFIG, dtype="bf16-mixed", mesh=mesh).dtype == jnp.bfloat16
    assert Sampler(CONFIG, dtype=jnp.float32, mesh=mesh).dtype == jnp.float32
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert Sampler(CONFIG, mesh=mesh).dtype == jnp.bfloat16
    assert Sampler(CONFIG, dtype="auto", mesh=mesh).dtype == jnp.bfloat16
    assert Sampler(CONFIG, dtype="float32", mesh=mesh).dtype == jnp.float32
    with pytest.raises(ValueError, match="unknown precision"):
        Sampler(CONFIG, dtype="fp8", mesh=mesh)


def test_bf16_latents_agree_with_float32(params):
    """A random model (reference init, zero layers made random). The final sample is the
    head's x-prediction at t = 0.95, so bits whose prediction is within bf16 error of 0
    flip; a trained model predicts more decisively (see test_mixed_precision's digits run)."""
    agreement, first, bits = bit_agreement(CONFIG, params, list(range(10)) * 2, seed=0,
                                           cfg_scale=4.0, num_sampling_steps=10)
    print(f"\nrandom model: bf16-mixed vs float32 latents agree on {agreement:.2%} of {bits} "
          f"bits ({first:.2%} in the first AR step)")
    assert agreement >= 0.99


@pytest.fixture(scope="module")
def tokenizer_params():
    return nn.unbox(jax.jit(BinaryAutoencoder(TOKENIZER).init)(
        jax.random.PRNGKey(1), np.zeros((1, 8, 8, 3), np.float32))["params"])


def save(path, params, tokenizer_params, **kw):
    return api.save_model(str(path), CONFIG, {**params, "tokenizer": tokenizer_params},
                          TOKENIZER, **kw)


def test_guidance_default_of_unpublished_models(tmp_path, params, tokenizer_params, capsys):
    assert default_cfg_scale("BitDance-B-4x") == 3.9
    assert capsys.readouterr().out == ""
    unlisted = sorted(set(RELEASED_MODELS) - set(DEFAULT_CFG_SCALES))
    assert unlisted                                  # e.g. BitDance-L-4x
    assert default_cfg_scale(unlisted[0]) == FALLBACK_CFG_SCALE == 4.6
    assert "4.6" in capsys.readouterr().out
    assert default_cfg_scale(None, announce=False) == 4.6
    assert capsys.readouterr().out == ""
    # configs: the training sample grid of a released size without a published scale
    assert imagenet_bitdance("L", 4).sample.cfg_scale == 4.6
    assert imagenet_bitdance("B", 4).sample.cfg_scale == 3.9

    # save_model without a scale records 4.6 (with a note); load_model keeps a recorded one
    plain = save(tmp_path / "plain", params, tokenizer_params)
    assert "note:" in capsys.readouterr().out
    assert param_dir.read_meta(plain)["default_cfg_scale"] == 4.6
    # the export names the tokenizer its latents came from (the latent cache's key)
    assert (param_dir.read_meta(plain)["tokenizer_params"]
            == fingerprint.tree_digest(tokenizer_params))
    assert api.load_model(plain).default_cfg_scale == 4.6
    chosen = save(tmp_path / "chosen", params, tokenizer_params, default_cfg_scale=2.5)
    capsys.readouterr()
    assert api.load_model(chosen).default_cfg_scale == 2.5
    assert capsys.readouterr().out == ""
    assert api.BitDanceModel(CONFIG, params, api.load_model(chosen).tokenizer).default_cfg_scale == 4.6


def test_old_ports_that_recorded_no_guidance_load_with_4_6(tmp_path, params, tokenizer_params,
                                                          capsys):
    """Ports of unpublished architectures written before this default recorded 1.0."""
    dst = save(tmp_path / "old_port", params, tokenizer_params, default_cfg_scale=1.0)
    meta_path = os.path.join(dst, param_dir.META_FILE)
    with open(meta_path) as f:
        meta = json.load(f)
    meta.update(weights="ema", source="ckpt.pt")          # what a port records
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    capsys.readouterr()
    assert api.load_model(dst).default_cfg_scale == 4.6
    assert "4.6" in capsys.readouterr().out
    del meta["default_cfg_scale"]                         # no scale recorded at all
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    assert api.load_model(dst).default_cfg_scale == 4.6
    # a trained export that chose cfg 1.0 keeps it
    trained = save(tmp_path / "trained", params, tokenizer_params, default_cfg_scale=1.0,
                   source="bitdance_jax.train")
    assert api.load_model(trained).default_cfg_scale == 1.0


def test_one_function_gives_the_default_guidance(tmp_path, params, tokenizer_params, capsys):
    """``default_cfg_scale`` answers for a name, a config, a directory and its metadata alike,
    and loading asks it (a directory's recorded scale, with the old-port fallback)."""
    assert default_cfg_scale(RELEASED_MODELS["BitDance-B-16x"]) == 6.1
    assert default_cfg_scale(CONFIG, announce=False) == 4.6
    chosen = save(tmp_path / "chosen", params, tokenizer_params, default_cfg_scale=2.5)
    assert default_cfg_scale(chosen) == 2.5 == api.load_model(chosen).default_cfg_scale
    meta = dict(param_dir.read_meta(chosen), default_cfg_scale=1.0, weights="ema")
    assert default_cfg_scale(meta, announce=False) == 4.6     # an old port: no guidance recorded
    del meta["weights"]
    assert default_cfg_scale(meta) == 1.0                      # a trained export chose 1.0
