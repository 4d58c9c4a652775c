"""Multi-process runs: ``jax.distributed`` setup and barriers every process must reach."""
from __future__ import annotations

import os

import jax


def initialize(mode: str = "auto"):
    """``jax.distributed.initialize()`` on multi-host launches (SLURM, TPU pods, explicit env)."""
    env = os.environ
    several = (int(env.get("SLURM_NTASKS", "1")) > 1 or "JAX_COORDINATOR_ADDRESS" in env
               or "," in env.get("TPU_WORKER_HOSTNAMES", "")
               or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
    if mode == "yes" or (mode == "auto" and several):
        jax.distributed.initialize()


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def define_flags(fv) -> None:
    """The multi-process flags of a command line (absl ``FlagValues``)."""
    from absl import flags
    flags.DEFINE_enum("multihost", "auto", ["auto", "yes", "no"],
                      "call jax.distributed.initialize (auto: on cluster launches or when "
                      "--coordinator is given)", flag_values=fv)
    flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0's coordinator",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "number of processes", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "this process's index", flag_values=fv)


def normalize_flag_names(argv: list[str]) -> list[str]:
    """``--num-processes`` / ``--process-id`` spelled as absl flags (underscores)."""
    out = []
    for arg in argv:
        for dashed in ("--num-processes", "--process-id"):
            if arg == dashed or arg.startswith(dashed + "="):
                arg = arg.replace(dashed, dashed.replace("-", "_").replace("__", "--", 1), 1)
        out.append(arg)
    return out


def initialize_from_flags(fv) -> None:
    if fv["coordinator"].value and fv["multihost"].value != "no":
        jax.distributed.initialize(fv["coordinator"].value, fv["num_processes"].value,
                                   fv["process_id"].value)
    else:
        initialize(fv["multihost"].value)
