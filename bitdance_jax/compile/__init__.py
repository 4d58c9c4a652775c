"""Compile a training step or a sampler for a TPU pod on any machine (no TPU needed), and say whether it fits.

    bitdance-compile --config configs/<name>.py[:<arg>] [--config.<field>=<value> ...] \\
        --topology v5p:2x2x4 [--job train|sample] [--mesh DATA,FSDP,TENSOR] \\
        [--batch N] [--height H --width W] [--num_sampling_steps S]

libtpu (``pip install 'jax[tpu]'``) describes the topology's chips as abstract devices; the
trainer's own jitted step (or the family's sampler) is lowered on a mesh of them with every
input a ShapeDtypeStruct on the project's shardings (nothing is allocated) and compiled by the
real TPU compiler. One JSON line reports per-chip memory against each chip kind's HBM, FLOPs,
collectives and a roofline time; the exit status is 1 when the program does not fit the
topology's chips (the message names the biggest buffers), 2 for a bad command line.
"""
from __future__ import annotations

import json
import sys
import time

import jax
from absl import flags

from bitdance_jax.compile import analysis, jobs
from bitdance_jax.parallel import sharding
from bitdance_jax.train.cli import UsageError, config_flag_values, parse_config


def topology_devices(name: str) -> list:
    """The abstract devices of TPU topology ``name`` (e.g. ``v5e:2x2``, ``v5p:4x4x4``)."""
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # libtpu missing, or a name it does not know
        raise UsageError(f"cannot describe TPU topology {name!r} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); it needs libtpu "
                         "(pip install 'jax[tpu]') and a name like v5e:2x2, v5p:2x2x4") from None


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x2, v5p:4x4x4, v6e:8x8",
                        flag_values=fv)
    flags.DEFINE_enum("job", "train", ["train", "sample"], "what to compile", flag_values=fv)
    flags.DEFINE_list("mesh", None, "data,fsdp,tensor (default: config.mesh; -1 takes the rest)",
                      flag_values=fv)
    flags.DEFINE_integer("batch", None, "global batch (train: default config.global_batch_size; "
                         "sample: images, default 8 class-conditional / 1 T2I)", flag_values=fv)
    flags.DEFINE_integer("height", 1024, "T2I sampling: image height", flag_values=fv)
    flags.DEFINE_integer("width", 1024, "T2I sampling: image width", flag_values=fv)
    flags.DEFINE_integer("num_sampling_steps", 50, "sampling: head SDE steps", flag_values=fv)


def build_job(config, mesh, job: str, batch: int | None = None, height: int = 1024,
              width: int = 1024, num_sampling_steps: int = 50) -> jobs.Job:
    if config.kind not in ("bitdance", "t2i"):
        raise UsageError(f"compiles bitdance and t2i configs, not kind {config.kind!r}")
    if job == "train":
        if batch:
            with config.unlocked():
                config.global_batch_size = batch
        return jobs.train_job(config, mesh)
    if config.kind == "bitdance":
        return jobs.c2i_sample_job(config, mesh, batch or 8, num_sampling_steps)
    return jobs.t2i_sample_job(config, mesh, height, width, num_sampling_steps, batch or 1)


def compile_report(config, topology: str, job: str = "train", mesh_shape=None, **job_args
                   ) -> tuple[dict, list[str]]:
    """(the report, the biggest buffers) of ``config``'s ``job`` compiled for ``topology``."""
    devices = topology_devices(topology)
    mesh = sharding.make_mesh(tuple(mesh_shape or config.mesh), devices=devices)
    t0 = time.perf_counter()
    built = build_job(config, mesh, job, **job_args)
    compiled = built.lowered.compile()
    compile_s = time.perf_counter() - t0
    text = compiled.as_text()
    kind = devices[0].device_kind
    mem = analysis.memory(compiled)
    cost = analysis.cost(compiled)
    flops = analysis.matmul_flops(text)
    # XLA's bytes accessed count a loop body once: scaled as its FLOPs are (an estimate).
    bytes_accessed = cost["bytes"] * max(flops / cost["flops"], 1.0) if cost["flops"] else cost["bytes"]
    limit = (analysis.hbm(kind) or (None,))[0]
    report = {
        "topology": topology, "num_devices": len(devices), "device_kind": kind,
        "mesh": dict(mesh.shape), "global_batch": built.global_batch, "job": job,
        "per_device_bytes": mem, "hbm_bytes_per_device": analysis.hbm_table(),
        "fits": limit is not None and mem["total"] <= limit,
        "params_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(built.params)),
        "params_bytes_per_device": sum(analysis.per_chip_bytes(built.params).values()),
        "flops_per_device": flops,
        "collectives": analysis.collectives(text),
        "roofline_step_s": analysis.roofline_s(flops, bytes_accessed, kind, built.dtype),
        "compile_s": round(compile_s, 1)}
    return report, analysis.biggest_buffers(text, built.arguments)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__)
        print(config_flag_values(argv[:1], _define_flags).get_help())
        return 0
    try:
        config, fv = parse_config(argv, _define_flags)
        if not fv["topology"].value:
            raise UsageError("--topology is required (e.g. --topology v5e:2x2)")
        mesh = [int(x) for x in fv["mesh"].value] if fv["mesh"].value else None
        report, biggest = compile_report(
            config, fv["topology"].value, fv["job"].value, mesh, batch=fv["batch"].value,
            height=fv["height"].value, width=fv["width"].value,
            num_sampling_steps=fv["num_sampling_steps"].value)
    except (UsageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, sort_keys=True))
    if not report["fits"]:
        total = report["per_device_bytes"]["total"]
        print(f"error: {total / 1e9:.2f} GB per chip does not fit the {report['device_kind']} "
              f"HBM; the biggest buffers:\n  " + "\n  ".join(biggest), file=sys.stderr)
        return 1
    return 0
