"""Joins the processes of a multi-process run into one JAX job and keeps every wait between them bounded.

    from bitdance_jax.parallel import distributed
    distributed.add_arguments(parser)               # --coordinator --num-processes --process-id --multihost
    args = parser.parse_args()
    distributed.initialize_from(args)               # before any other JAX call
    ...
    distributed.barrier("latent_cache", timeout_s=3600)
    distributed.run_once("text_tokenizer", build)   # process 0 builds, the others wait for it

The rule for multi-process code: every collective (an Orbax save or restore, a
``process_allgather``, a jitted function over a global mesh) is called by ALL processes in the
same order; only plain file writes that must happen once are guarded by ``is_main()``.
Waiting for such a write is ``barrier`` / ``run_once`` (never a loop polling the file system),
so a process that never arrives turns into an error naming it instead of a hang.

Processes are joined from explicit flags (``--coordinator HOST:PORT --num-processes N
--process-id I``, as ``tools/launch_local.py`` passes them) or, in ``auto`` mode, from the
cluster's environment (SLURM with ``SLURM_NTASKS`` > 1, Open MPI, a Cloud TPU VM, or
``JAX_COORDINATOR_ADDRESS``). The distributed client is given heartbeat and shutdown timeouts,
so a process whose partner died exits with an error within about ``heartbeat_timeout_s``
instead of waiting forever in a collective or in shutdown. The defaults can be changed with
the environment variables ``BITDANCE_HEARTBEAT_TIMEOUT_S``, ``BITDANCE_SHUTDOWN_TIMEOUT_S``
and ``BITDANCE_INIT_TIMEOUT_S`` (tests set them low).
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import threading
from typing import Any, Callable, Sequence

MODES = ("auto", "yes", "no")

# Seconds. jax's own defaults are 100 (heartbeat), 300 (shutdown) and 300 (initialization).
HEARTBEAT_TIMEOUT_S = 60
SHUTDOWN_TIMEOUT_S = 60
INIT_TIMEOUT_S = 300
BARRIER_TIMEOUT_S = 3600.0

_KEY_PREFIX = "bitdance"


class DistributedError(RuntimeError):
    """A barrier or a run_once did not complete on every process (the message names which)."""


# ---------------------------------------------------------------------------------------
# Command-line flags.

def add_arguments(parser) -> None:
    """``--coordinator HOST:PORT --num-processes N --process-id I --multihost auto|yes|no`` on
    an argparse parser (attributes ``coordinator``, ``num_processes``, ``process_id``,
    ``multihost``)."""
    group = parser.add_argument_group("multi-process")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="address of process 0's coordinator (with --num-processes and "
                            "--process-id; default: from the cluster environment)")
    group.add_argument("--num-processes", "--num_processes", dest="num_processes", type=int,
                       default=None, metavar="N", help="number of processes in the job")
    group.add_argument("--process-id", "--process_id", dest="process_id", type=int,
                       default=None, metavar="I", help="this process's index, 0 .. N-1")
    group.add_argument("--multihost", choices=MODES, default="auto",
                       help="join the processes with jax.distributed.initialize (auto: when "
                            "the flags above or a multi-process cluster environment say so)")


def define_absl_flags(flag_values=None) -> None:
    """The same four flags for absl (``flags.FLAGS.coordinator`` ...). absl names are
    underscored: pass ``normalize_argv(sys.argv)`` to absl to accept the dashed forms too."""
    from absl import flags
    fv = flags.FLAGS if flag_values is None else flag_values
    flags.DEFINE_string("coordinator", None, "address HOST:PORT of process 0's coordinator",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "number of processes in the job", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "this process's index, 0 .. N-1", flag_values=fv)
    flags.DEFINE_enum("multihost", "auto", list(MODES),
                      "join the processes with jax.distributed.initialize", flag_values=fv)


_DASHED = {"--num-processes": "--num_processes", "--process-id": "--process_id"}


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """``--num-processes``/``--process-id`` (also ``=value`` forms) -> the underscored absl
    names; everything after a bare ``--`` is left alone."""
    out, rest = [], False
    for a in argv:
        if rest or a == "--":
            rest = True
            out.append(a)
            continue
        name, eq, value = a.partition("=")
        out.append(_DASHED.get(name, name) + eq + value)
    return out


def initialize_from(args, **kwargs) -> bool:
    """``initialize`` with the attributes of parsed argparse args or absl FLAGS."""
    return initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                      getattr(args, "process_id", None), getattr(args, "multihost", "auto"),
                      **kwargs)


# ---------------------------------------------------------------------------------------
# Joining the processes.

def detect_cluster(environ=None) -> str | None:
    """Which multi-process launch this process belongs to: "slurm", "ompi", "tpu",
    "jax_env" (``JAX_COORDINATOR_ADDRESS``), or None (a single process)."""
    env = os.environ if environ is None else environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        return "jax_env"
    if "SLURM_JOB_ID" in env and _int(env.get("SLURM_NTASKS"), 1) > 1:
        return "slurm"
    if _int(env.get("OMPI_COMM_WORLD_SIZE"), 1) > 1:
        return "ompi"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if "," in hosts:
        return "tpu"
    if environ is None and _on_cloud_tpu_vm():
        return "tpu"  # jax reads the workers from the VM's metadata (one worker: 1 process)
    return None


def _int(text, default: int) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return default


def _on_cloud_tpu_vm() -> bool:
    if importlib.util.find_spec("libtpu") is None:
        return False
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def _env_seconds(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return max(1, int(float(value)))
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number of seconds") from None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, mode: str = "auto", *,
               heartbeat_timeout_s: int | None = None, shutdown_timeout_s: int | None = None,
               init_timeout_s: int | None = None) -> bool:
    """Join this process to the others; returns whether ``jax.distributed`` was initialized.

    Explicit ``coordinator``/``num_processes``/``process_id`` go to
    ``jax.distributed.initialize`` (a count of 1 starts nothing). Without them, ``mode``
    "auto" initializes when ``detect_cluster()`` finds a multi-process launch, "yes" always
    (jax auto-detects the rest and fails when it cannot), "no" never. Must run before any
    other JAX call. Calling it again once initialized does nothing.
    """
    if mode not in MODES:
        raise ValueError(f"multihost mode {mode!r}: use one of {MODES}")
    import jax
    explicit = (coordinator, num_processes, process_id) != (None, None, None)
    if mode == "no":
        if explicit:
            raise ValueError("--multihost=no contradicts --coordinator/--num-processes/"
                             "--process-id")
        return False
    if jax.distributed.is_initialized():
        return True
    if explicit:
        if num_processes is None or process_id is None or (coordinator is None
                                                            and num_processes > 1):
            if detect_cluster() is None:
                raise ValueError("give all of --coordinator HOST:PORT, --num-processes N and "
                                 "--process-id I (or launch under SLURM / Open MPI / a TPU VM)")
        if num_processes is not None and num_processes < 1:
            raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
        if num_processes is not None and process_id is not None \
                and not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id {process_id} is not in 0 .. {num_processes - 1}")
        if num_processes == 1:
            return False
    elif mode == "auto" and detect_cluster() is None:
        return False
    timeouts = dict(
        heartbeat_timeout_seconds=heartbeat_timeout_s or _env_seconds(
            "BITDANCE_HEARTBEAT_TIMEOUT_S", HEARTBEAT_TIMEOUT_S),
        shutdown_timeout_seconds=shutdown_timeout_s or _env_seconds(
            "BITDANCE_SHUTDOWN_TIMEOUT_S", SHUTDOWN_TIMEOUT_S),
        initialization_timeout=init_timeout_s or _env_seconds(
            "BITDANCE_INIT_TIMEOUT_S", INIT_TIMEOUT_S))
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, **timeouts)
    except ValueError as e:
        raise ValueError(f"cannot join the processes: {e} (give --coordinator HOST:PORT "
                         "--num-processes N --process-id I, or launch under SLURM / Open MPI "
                         "/ a TPU VM)") from e
    return True


# ---------------------------------------------------------------------------------------
# Waiting for each other.

def process_index() -> int:
    import jax
    return jax.process_index()


def process_count() -> int:
    import jax
    return jax.process_count()


def is_main() -> bool:
    """Process 0: the one that writes files that must be written once."""
    return process_index() == 0


def _client():
    from jax._src import distributed as jax_distributed
    client = jax_distributed.global_state.client
    if client is None:
        raise DistributedError("jax.distributed is not initialized, but jax.process_count() is "
                               f"{process_count()}")
    return client


_calls: dict[str, int] = {}
_calls_lock = threading.Lock()


def _call_id(kind: str, name: str) -> str:
    """A key unique to this call: processes call barriers in the same order, so the n-th
    call of a name is the same barrier on every process."""
    if not re.fullmatch(r"[A-Za-z0-9_.:\-]+", name):
        raise ValueError(f"barrier name {name!r}: use letters, digits and _ . : -")
    with _calls_lock:
        n = _calls.get(f"{kind}/{name}", 0)
        _calls[f"{kind}/{name}"] = n + 1
    return f"{_KEY_PREFIX}/{kind}/{name}/{n}"


def _arrived(client, key: str) -> set[int] | None:
    try:
        return {int(k.rsplit("/", 1)[-1]) for k, _ in client.key_value_dir_get(key + "/")}
    except Exception:  # the coordination service is gone or in error
        return None


def _task_ids(message: str) -> list[int]:
    """Task ids in a coordination-service error ("/task:1", or the lines after "timed out
    task names:")."""
    ids = {int(t) for t in re.findall(r"/task:(\d+)", message)}
    listed = re.search(r"timed out task names:\s*((?:\d+\s*)+)", message)
    if listed:
        ids.update(int(t) for t in listed.group(1).split())
    return sorted(ids)


def _names(ids) -> str:
    ids = sorted(ids)
    return ("process " if len(ids) == 1 else "processes ") + ", ".join(map(str, ids))


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Wait until every process has called ``barrier(name)``; a DistributedError naming the
    processes that did not arrive after ``timeout_s`` (or that died). One process: no-op.

    Unlike ``multihost_utils.sync_global_devices`` it runs nothing on the devices (it goes
    through the coordination service), so it has a timeout and names who is missing."""
    if process_count() == 1:
        return
    client, me, n = _client(), process_index(), process_count()
    key = _call_id("barrier", name)
    client.key_value_set(f"{key}/{me}", "1")
    try:
        client.wait_at_barrier(key, int(timeout_s * 1000))
    except Exception as e:  # jax raises XlaRuntimeError (DEADLINE_EXCEEDED, ...)
        arrived = _arrived(client, key)
        missing = (sorted(set(range(n)) - arrived) if arrived is not None
                   else [t for t in _task_ids(str(e)) if t != me])
        who = _names(missing) if missing else "some process"
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise DistributedError(f"barrier {name!r}: {who} did not arrive within {timeout_s:g} s "
                               f"(process {me} waited; {first_line})") from e


def run_once(name: str, fn: Callable[[], Any], timeout_s: float = BARRIER_TIMEOUT_S):
    """``fn()`` on process 0 while the others wait for it (at most ``timeout_s``); returns
    its result on process 0 and None elsewhere. An exception in ``fn`` is raised on process 0
    and reported as a DistributedError on the others (no one waits for the timeout).

    ``fn`` must not call collectives (only process 0 runs it): use it for file writes."""
    if process_count() == 1:
        return fn()
    client, me = _client(), process_index()
    key = _call_id("once", name)
    if me == 0:
        try:
            result = fn()
        except BaseException as e:
            client.key_value_set(key, f"error: {type(e).__name__}: {e}"[:2000])
            raise
        client.key_value_set(key, "ok")
        return result
    try:
        status = client.blocking_key_value_get(key, int(timeout_s * 1000))
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise DistributedError(f"{name!r}: process 0 did not finish it within {timeout_s:g} s "
                               f"(process {me} waited; {first_line})") from e
    if status != "ok":
        raise DistributedError(f"{name!r} failed on process 0: {status[len('error: '):]}")
    return None
