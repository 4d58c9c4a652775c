"""The porting command line end to end on the class-conditional and text-to-image layouts, and every console script."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import golden
from bitdance_jax import load_model, load_tokenizer
from bitdance_jax.porting import cli as port_cli
from bitdance_jax.porting import convention as porting
from bitdance_jax.checkpointing.param_dir import load_param_dir
from bitdance_jax.c2i.config import BitDanceConfig
from bitdance_jax.porting.c2i import port_model_state_dict


def test_port_class_conditional_cli_with_head_count(tmp_path):
    case = golden.case("ar_parallel")
    config = BitDanceConfig.from_reference_kwargs(case["config"]["model_kwargs"])
    src = golden.path(case["weight_files"][0])
    dst = tmp_path / "ar"
    tool = [sys.executable, "-m", "bitdance_jax.porting", src, str(dst), "--n-head", str(config.n_head)]
    out = subprocess.run(tool, capture_output=True, text=True, check=True)
    assert "wrote" in out.stdout
    meta = json.loads((dst / "bitdance.json").read_text())
    for field in ("dim", "n_layer", "n_head", "parallel_num", "cls_token_num", "latent_dim",
                  "num_classes", "grid_size"):
        assert meta["config"][field] == getattr(config, field), field
    model = load_model(str(dst))
    expected = port_model_state_dict(porting.tensors_to_numpy(porting.load_torch_file(src)["ema"]),
                                     config)
    for a, b in zip(jax.tree.leaves(model.params["model"]), jax.tree.leaves(expected["model"])):
        np.testing.assert_array_equal(np.asarray(a), b)
    # the tokenizer inside the model directory loads on its own too
    assert load_tokenizer(str(dst)).config.z_channels == config.latent_dim


def test_port_t2i_folder_bfloat16(tmp_path):
    dst = tmp_path / "t2i"
    assert port_cli.main([golden.path("t2i_model"), str(dst), "--param-dtype", "bfloat16"]) == 0
    meta = json.loads((dst / "bitdance.json").read_text())
    assert meta["kind"] == "bitdance_t2i"
    _, params = load_param_dir(str(dst))
    assert "bfloat16" in {str(x.dtype) for x in jax.tree.leaves(params)}
    assert port_cli.main([golden.path("t2i_model"), str(dst)]) == 1   # never overwrites


@pytest.mark.parametrize("script", ["bitdance-train", "bitdance-sample", "bitdance-t2i",
                                    "bitdance-port", "bitdance-tokenize"])
def test_console_scripts_are_installed(script):
    path = os.path.join(os.path.dirname(sys.executable), script)
    out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower() or "--config" in out.stdout
