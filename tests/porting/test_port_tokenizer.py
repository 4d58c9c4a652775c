"""Porting tool, self-describing directories, the released ae_d16c32 layout, bad input."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import golden
from bitdance_jax import load_tokenizer
from bitdance_jax.porting import cli as port_cli
from bitdance_jax.porting import convention as porting
from bitdance_jax.checkpointing.param_dir import CheckpointError
from bitdance_jax.tokenizer.model import AE_D16C32
from bitdance_jax.tokenizer.api import abstract_tokenizer_params
from bitdance_jax.porting.tokenizer import infer_tokenizer_config


def _released(name):
    with open(golden.path("checkpoint_formats.json")) as f:
        return json.load(f)["models"][name]


def test_ae_d16c32_layout_matches_release_without_allocating():
    rel = _released("ae_d16c32")
    abstract = abstract_tokenizer_params(AE_D16C32)
    ours = porting.expected_torch_shapes(abstract)
    theirs = {k: tuple(s) for k, s, _ in rel["state_dict"]}
    assert set(ours) == set(theirs), (sorted(set(ours) ^ set(theirs)))[:10]
    assert {k: v for k, v in ours.items() if v != theirs[k]} == {}
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    assert n == rel["params"]


def test_config_inferred_from_released_shapes():
    rel = _released("ae_d16c32")
    # Zero-stride views: the full-size key/shape set without memory.
    sd = {k: np.broadcast_to(np.float32(0), s) for k, s, _ in rel["state_dict"]}
    cfg = infer_tokenizer_config(sd)
    assert cfg == AE_D16C32
    assert cfg.to_dict()["ch_mult"] == rel["ddconfig"]["ch_mult"]


def test_port_pt_then_load_and_encode(tmp_path):
    dst = tmp_path / "tok"
    assert port_cli.main([golden.path("tokenizer", "ae.pt"), str(dst),
                         "--num-codebooks", str(golden.case("tokenizer")["config"]["num_codebooks"])]) == 0
    meta = json.loads((dst / "bitdance.json").read_text())
    assert meta["kind"] == "tokenizer" and meta["config"]["z_channels"] == golden.case("tokenizer")["config"]["ddconfig"]["z_channels"]
    tok = load_tokenizer(str(dst))
    a = golden.arrays("tokenizer")
    bits, idx = tok.encode_indices(golden.nchw_to_nhwc(a["images"]))
    golden.check("tokenizer", "quant", np.moveaxis(bits, -1, 1))
    golden.check("tokenizer", "indices", idx.reshape(-1, idx.shape[-1]).T)
    golden.check("tokenizer", "dec", np.moveaxis(tok.decode(bits), -1, 1))


def test_port_safetensors_folder_gan_decoder(tmp_path):
    dst = tmp_path / "gan"
    port_cli.port(golden.path("gan_decoder"), str(dst))
    tok = load_tokenizer(str(dst))
    assert tok.config.gan_decoder
    a = golden.arrays("gan_decoder")
    bits = tok.encode(golden.nchw_to_nhwc(a["images"]))
    dec = tok.decode(bits, noise=golden.nchw_to_nhwc(a["noise"]))
    golden.check("gan_decoder", "dec", np.moveaxis(dec, -1, 1))


def test_port_released_tokenizer_file_names(tmp_path):
    """The released tokenizer repo names its files ``ae_d16c32.safetensors`` +
    ``ae_d16c32_config.json``: the config is found beside the weights by their stem."""
    import shutil
    src = tmp_path / "repo"
    src.mkdir()
    shutil.copyfile(golden.path("gan_decoder", "ae.safetensors"), src / "ae_tiny.safetensors")
    shutil.copyfile(golden.path("gan_decoder", "ae_config.json"), src / "ae_tiny_config.json")
    port_cli.port(str(src / "ae_tiny.safetensors"), str(tmp_path / "tok"))
    port_cli.port(golden.path("gan_decoder"), str(tmp_path / "ref"))
    a, b = load_tokenizer(str(tmp_path / "tok")), load_tokenizer(str(tmp_path / "ref"))
    assert a.config == b.config
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _write_pt(path, sd):
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}}, path)


@pytest.fixture
def golden_sd():
    return porting.tensors_to_numpy(porting.load_torch_file(golden.path("tokenizer", "ae.pt"))["state_dict"])


def test_missing_extra_and_misshaped_keys_are_named_and_nothing_written(tmp_path, golden_sd):
    sd = dict(golden_sd)
    dropped = "decoder.adaptive.0.gamma.bias"
    del sd[dropped]
    sd["decoder.bogus.weight"] = np.zeros(3, np.float32)
    sd["encoder.conv_out.bias"] = np.zeros(7, np.float32)
    src, dst = tmp_path / "bad.pt", tmp_path / "out"
    _write_pt(src, sd)
    with pytest.raises(porting.PortingError) as e:
        port_cli.port(str(src), str(dst))
    msg = str(e.value)
    assert dropped in msg and "decoder.bogus.weight" in msg and "encoder.conv_out.bias" in msg
    assert not dst.exists() and not (tmp_path / "out.partial").exists()
    assert port_cli.main([str(src), str(dst)]) == 1


def test_truncated_and_foreign_files(tmp_path):
    data = open(golden.path("tokenizer", "ae.pt"), "rb").read()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(porting.PortingError, match="truncated"):
        port_cli.port(str(tmp_path / "trunc.pt"), str(tmp_path / "o1"))
    folder = tmp_path / "ae"
    shutil.copytree(golden.path("gan_decoder"), folder)
    st = (folder / "ae.safetensors").read_bytes()
    (folder / "ae.safetensors").write_bytes(st[: len(st) // 3])
    with pytest.raises(porting.PortingError, match="safetensors"):
        port_cli.port(str(folder), str(tmp_path / "o2"))
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(porting.PortingError, match="unknown checkpoint layout"):
        port_cli.port(str(tmp_path / "other.pt"), str(tmp_path / "o3"))


def test_destination_must_be_new(tmp_path):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("x")
    with pytest.raises(porting.PortingError, match="not empty"):
        port_cli.port(golden.path("tokenizer", "ae.pt"), str(tmp_path / "dst"))
    assert (tmp_path / "dst" / "keep.txt").read_text() == "x"


def test_bad_tokenizer_inputs(tmp_path):
    dst = tmp_path / "tok"
    port_cli.port(golden.path("tokenizer", "ae.pt"), str(dst))
    tok = load_tokenizer(str(dst))
    z, f = tok.config.z_channels, tok.downsample_factor
    with pytest.raises(ValueError, match=f"{z} channels"):
        tok.decode(np.ones((1, 2, 2, z + 1), np.float32))
    with pytest.raises(ValueError, match="NHWC"):
        tok.encode(np.zeros((1, 3, 4 * f, 4 * f), np.float32))
    with pytest.raises(ValueError, match="multiple"):
        tok.encode(np.zeros((1, 4 * f + 1, 4 * f, 3), np.float32))
    with pytest.raises(CheckpointError, match="not a bitdance-jax checkpoint"):
        load_tokenizer(str(tmp_path))


def test_tokenize_cli_on_real_files(tmp_path, capsys):
    dst = tmp_path / "tok"
    port_cli.port(golden.path("tokenizer", "ae.pt"), str(dst))
    rng = np.random.default_rng(0)
    paths = []
    for i, (mode, size) in enumerate([("RGB", (40, 30)), ("L", (32, 32)), ("RGBA", (20, 50))]):
        arr = rng.integers(0, 255, size=(size[1], size[0]) + ((len(mode),) if mode != "L" else ()), dtype=np.uint8)
        p = tmp_path / f"im{i}.png"
        Image.fromarray(arr, mode).save(p)
        paths.append(str(p))
    (tmp_path / "notimage.png").write_text("hello")
    from bitdance_jax.tokenizer import cli as tokenizer_cli
    out = tmp_path / "grid.png"
    assert tokenizer_cli.main(["--ckpt", str(dst), "--images", *paths, "--out", str(out),
                          "--size", "32", "--out-dir", str(tmp_path / "rec")]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 4 and all(np.isfinite(l["psnr"]) for l in lines[:3])
    assert Image.open(out).format == "PNG" and len(os.listdir(tmp_path / "rec")) == 3
    assert tokenizer_cli.main(["--ckpt", str(dst), "--images", str(tmp_path / "notimage.png"),
                          "--out", str(tmp_path / "g2.png"), "--size", "32"]) == 1
    assert "not a readable image" in capsys.readouterr().err


def test_psnr_ssim_sanity():
    from bitdance_jax.images import psnr, ssim
    a = np.random.default_rng(1).integers(0, 255, (16, 16, 3)).astype(np.uint8)
    assert psnr(a, a) == float("inf") and abs(ssim(a, a) - 1) < 1e-9
    b = np.clip(a.astype(int) + 10, 0, 255).astype(np.uint8)
    assert 20 < psnr(a, b) < 40 and ssim(a, b) < 1


def test_every_param_has_logical_axes_and_shards_on_a_mesh():
    from flax import linen as nn
    from bitdance_jax.parallel.sharding import logical_sharding, make_mesh
    cfg = infer_tokenizer_config(porting.load_torch_file(golden.path("tokenizer", "ae.pt"))["state_dict"])
    abstract = abstract_tokenizer_params(cfg)
    leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    mesh = make_mesh((2, 2, 2))
    shardings = jax.tree.leaves(logical_sharding(abstract, mesh))
    assert len(shardings) == len(leaves)
    assert any(s.spec != jax.sharding.PartitionSpec(*([None] * len(s.spec))) for s in shardings)
