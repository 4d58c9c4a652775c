"""The compile tool on a real TPU compiler (libtpu, no TPU needed): the tiny class-conditional
training step and sampler for v5e:2x2 with an fsdp axis, every report field present and sane,
and each chip holding 1/fsdp of the parameters the rules shard."""
import json
import os
import shlex

import jax
import numpy as np
import pytest

from bitdance_jax.compile import main
from bitdance_jax.compile.analysis import COLLECTIVES
from bitdance_jax.train.metrics import TPU_CHIPS

TOPOLOGY, FSDP = "v5e:2x2", 4
# The README's command with the digits model cut to one block (the CI budget), sharded over fsdp.
TINY = ["--config", "configs/digits_bitdance.py", "--config.model.n_layer=1",
        "--config.model.diff_layers=1", "--config.global_batch_size=8",
        "--topology", TOPOLOGY, "--mesh", f"1,{FSDP},1"]


README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "README.md")


def readme_command() -> list[str]:
    """The README's ``python -m bitdance_jax.compile`` line, as argv."""
    lines = [l for l in open(README).read().splitlines()
             if l.startswith("python -m bitdance_jax.compile ")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])[3:]


def run(capsys, *args):
    rc = main(["bitdance-compile", *TINY, *args])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1])


def check_fields(report, job, mesh=(1, FSDP, 1)):
    assert report["topology"] == TOPOLOGY and report["job"] == job
    assert report["num_devices"] == 4 and report["device_kind"].startswith("TPU v5 lite")
    assert report["mesh"] == dict(zip(("data", "fsdp", "tensor"), mesh))
    mem = report["per_device_bytes"]
    assert set(mem) == {"arguments", "outputs", "temps", "aliased", "total"}
    assert all(v >= 0 for v in mem.values()) and mem["arguments"] > 0
    assert mem["total"] == mem["arguments"] + mem["outputs"] + mem["temps"] - mem["aliased"]
    assert set(report["hbm_bytes_per_device"]) == set(TPU_CHIPS)
    assert report["fits"] is True
    assert report["flops_per_device"] > 0 and report["roofline_step_s"] > 0
    assert set(report["collectives"]) == set(COLLECTIVES)
    assert all(set(c) == {"count", "bytes"} for c in report["collectives"].values())
    assert report["compile_s"] > 0


def test_readme_command_is_the_tested_one():
    argv = readme_command()
    assert argv[:2] == TINY[:2] and argv[argv.index("--topology") + 1] == TOPOLOGY
    assert argv[argv.index("--mesh") + 1] == f"1,{FSDP},1" and "train" in argv


def test_train_step_shards_params_over_fsdp(capsys):
    report = run(capsys, "--job", "train")
    check_fields(report, "train")
    assert report["global_batch"] == 8
    # fsdp shards the embed dim of (nearly) every param: a chip holds a quarter of them.
    total, per_chip = report["params_bytes"], report["params_bytes_per_device"]
    assert per_chip <= total / FSDP * 1.1, (per_chip, total)
    # params, EMA and two Adam moments are arguments: sharded, they are ~4 x params / fsdp.
    assert report["per_device_bytes"]["arguments"] < 4 * total / FSDP * 1.2
    # the step gathers the sharded params (fsdp) and reduces gradients over the chips
    assert report["collectives"]["all-gather"]["count"] > 0
    # donation: the new state reuses the old state's buffers
    assert report["per_device_bytes"]["aliased"] > 0.9 * report["per_device_bytes"]["outputs"] - 1e5


def test_sampler_compiles_for_the_topology(capsys):
    report = run(capsys, "--job", "sample", "--batch", "8", "--num_sampling_steps", "2",
                 "--mesh", "4,1,1")
    check_fields(report, "sample", mesh=(4, 1, 1))
    assert report["global_batch"] == 8
