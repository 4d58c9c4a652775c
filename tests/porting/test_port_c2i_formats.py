"""Our class-conditional models have exactly the released checkpoints' keys, shapes and
parameter counts (checkpoint_formats.json, through the porting map, no allocation); the
architecture is inferred from a checkpoint; porting rejects other architectures."""
import json
import math

import jax
import numpy as np
import pytest
from flax import linen as nn

import golden
from bitdance_jax.checkpointing import fingerprint
from bitdance_jax.porting import convention as porting
from bitdance_jax.nn.diffusion_head import abstract_head_params
from bitdance_jax.c2i.config import DEFAULT_CFG_SCALES, RELEASED_MODELS, BitDanceConfig, released_name
from bitdance_jax.c2i.model import abstract_backbone_params
from bitdance_jax.porting.c2i import HEAD_PREFIX, VAE_PREFIX, infer_config, port_imagenet_checkpoint
from bitdance_jax.tokenizer.api import abstract_tokenizer_params
from bitdance_jax.porting.tokenizer import infer_tokenizer_config

with open(golden.path("checkpoint_formats.json")) as f:
    FORMATS = json.load(f)["models"]
CLASS_MODELS = sorted(n for n in FORMATS if n in RELEASED_MODELS)


def test_every_released_size_is_covered():
    listed = {n for n, e in FORMATS.items() if "imagenet_gen/src/model" in str(e.get("source"))}
    assert listed == set(CLASS_MODELS)


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree)))


@pytest.mark.parametrize("name", CLASS_MODELS)
def test_released_layout(name):
    entry = FORMATS[name]
    released = {k: tuple(s) for k, s, _ in entry["state_dict"]}
    config = RELEASED_MODELS[name]
    backbone = abstract_backbone_params(config)
    head = abstract_head_params(config.head_config)
    ours = dict(porting.expected_torch_shapes(backbone))
    ours.update({HEAD_PREFIX + k: s for k, s in porting.expected_torch_shapes(head).items()})
    theirs = {k: s for k, s in released.items() if not k.startswith(VAE_PREFIX)}
    assert ours == theirs
    assert _count(backbone) + _count(head) == entry["params_without_vae"]
    assert _count(head) == entry["params_diffusion_head"]
    # the architecture is recoverable from the file's keys and shapes alone
    fake_sd = {k: np.broadcast_to(np.float32(0), s) for k, s in released.items()}
    assert infer_config(fake_sd) == config
    assert released_name(config) == name
    tok_config = infer_tokenizer_config(fake_sd, VAE_PREFIX, num_codebooks=4)
    tok_shapes = porting.expected_torch_shapes(abstract_tokenizer_params(tok_config))
    assert {VAE_PREFIX + k: s for k, s in tok_shapes.items()} == {
        k: s for k, s in released.items() if k.startswith(VAE_PREFIX)}
    assert _count(abstract_tokenizer_params(tok_config)) == entry["params_vae"]


def test_default_cfg_scales_are_released_models():
    assert set(DEFAULT_CFG_SCALES) <= set(RELEASED_MODELS)


def test_other_architecture_is_rejected(tmp_path):
    """A file whose weights disagree with the stated config fails with a clear error."""
    parallel = BitDanceConfig.from_reference_kwargs(
        golden.case("ar_parallel")["config"]["model_kwargs"])
    one_x_file = golden.path(golden.case("ar_1x")["weight_files"][0])
    with pytest.raises(porting.PortingError, match="another architecture"):
        port_imagenet_checkpoint(one_x_file, str(tmp_path / "a"), config=parallel)
    with pytest.raises(porting.PortingError, match="another architecture"):
        port_imagenet_checkpoint(one_x_file, str(tmp_path / "b"), config="BitDance-B-1x")
    with pytest.raises(ValueError, match="unknown model"):
        port_imagenet_checkpoint(one_x_file, str(tmp_path / "c"), config="BitDance-X-1x")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_mismatched_shapes_name_the_keys(tmp_path):
    """Stating a head count the weights cannot have is caught by the strict porting."""
    src = golden.path(golden.case("ar_parallel")["weight_files"][0])
    with pytest.raises(porting.PortingError, match="invalid architecture"):
        port_imagenet_checkpoint(src, str(tmp_path / "d"), n_head=5)


def test_tokenizer_from_another_file(tmp_path):
    """Without vae.* keys the tokenizer must come from tokenizer_pt (ae_d16c32.pt layout)."""
    import torch
    from bitdance_jax.tokenizer.api import load_tokenizer
    conf = golden.case("ar_parallel")["config"]
    config = BitDanceConfig.from_reference_kwargs(conf["model_kwargs"])
    ckpt = porting.load_torch_file(golden.path(golden.case("ar_parallel")["weight_files"][0]))
    stripped = {k: v for k, v in ckpt["ema"].items() if not k.startswith(VAE_PREFIX)}
    src = str(tmp_path / "no_vae.pt")
    torch.save({"model": stripped, "ema": stripped}, src)
    schedule = {k: getattr(config, k) for k in ("n_head", "parallel_mode", "diff_batch_mul",
                                                 "time_shift", "P_mean", "P_std")}
    with pytest.raises(porting.PortingError, match="no vae"):
        port_imagenet_checkpoint(src, str(tmp_path / "a"), **schedule)
    tok_pt = str(tmp_path / "ae.pt")
    vae = {k[len(VAE_PREFIX):]: v for k, v in ckpt["ema"].items() if k.startswith(VAE_PREFIX)}
    torch.save({"state_dict": vae}, tok_pt)
    dst = port_imagenet_checkpoint(src, str(tmp_path / "b"), tokenizer_pt=tok_pt, **schedule)
    tok = load_tokenizer(dst)
    assert tok.config.z_channels == config.latent_dim
    assert tok.config == infer_tokenizer_config(porting.tensors_to_numpy(vae), num_codebooks=4)


@pytest.mark.parametrize("name", ["BitDance-B-1x", "BitDance-H-16x"])
def test_params_have_logical_axes_that_divide_on_a_mesh(name):
    from bitdance_jax.parallel.sharding import logical_sharding, make_mesh
    config = RELEASED_MODELS[name]
    abstract = abstract_backbone_params(config)
    leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    mesh = make_mesh((2, 2, 2))
    shardings = jax.tree.leaves(logical_sharding(abstract, mesh))
    assert len(shardings) == len(leaves)
    for leaf, s in zip(leaves, shardings):
        for size, axes in zip(leaf.value.shape, s.spec):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            assert size % math.prod(mesh.shape[a] for a in axes) == 0, (leaf.names, s.spec)


def test_training_checkpoint_args_give_the_schedule(tmp_path):
    """A training checkpoint with argparse ``args`` (and optimizer state) loads; its schedule
    values are used, explicit overrides still win."""
    import argparse
    import torch
    from bitdance_jax.checkpointing.param_dir import read_meta
    ckpt = porting.load_torch_file(golden.path(golden.case("ar_parallel")["weight_files"][0]))
    args = argparse.Namespace(model="BitDance-B", parallel_mode="standard", diff_batch_mul=3,
                              P_mean=-0.5, P_std=1.0, time_shift=2.0, lr=1e-4)
    src = str(tmp_path / "train.pt")
    torch.save({"model": ckpt["model"], "ema": ckpt["ema"], "args": args, "epochs": 7,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95)}]}},
               src)
    dst = port_imagenet_checkpoint(src, str(tmp_path / "out"), n_head=4)   # B's 12 heads: no
    config = BitDanceConfig.from_dict(read_meta(dst)["config"])
    assert (config.parallel_mode, config.diff_batch_mul, config.P_mean, config.P_std,
            config.time_shift, config.n_head) == ("standard", 3, -0.5, 1.0, 2.0, 4)
    with pytest.raises(porting.PortingError, match="invalid architecture"):
        port_imagenet_checkpoint(src, str(tmp_path / "out2"))


def test_raw_weights_instead_of_ema(tmp_path):
    from bitdance_jax.checkpointing.param_dir import load_param_dir
    src = golden.path(golden.case("ar_parallel")["weight_files"][0])
    ckpt = porting.tensors_to_numpy(porting.load_torch_file(src)["model"])
    ema = porting.tensors_to_numpy(porting.load_torch_file(src)["ema"])
    assert not np.array_equal(ckpt["norm.weight"], ema["norm.weight"])
    for use_ema, sd in [(False, ckpt), (True, ema)]:
        dst = port_imagenet_checkpoint(src, str(tmp_path / str(use_ema)), use_ema=use_ema, n_head=4)
        meta, params = load_param_dir(dst)
        assert meta["weights"] == ("ema" if use_ema else "model")
        # written by c2i.io.save_model, as a trained export: the tokenizer's digest too
        assert meta["tokenizer_params"] == fingerprint.tree_digest(params["tokenizer"])
        np.testing.assert_array_equal(params["model"]["norm"]["scale"], sd["norm.weight"])
        np.testing.assert_array_equal(params["head"]["final_layer"]["linear"]["kernel"],
                                      sd["head.net.final_layer.linear.weight"].T)
