"""bitdance_jax.parallel.distributed: flags, cluster detection, and on 2 local processes x 2 CPU
devices: joining through flags and through SLURM variables, a barrier that names the process
that never arrived, run_once, and a process whose partner was SIGKILLed exiting with an error
within a bounded time. Every subprocess runs under a hard timeout."""
import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.multiprocess

from bitdance_jax.parallel import distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(REPO, "tools", "launch_local.py")
WORKER = os.path.join(REPO, "tests", "parallel", "mp_worker.py")
HEARTBEAT_S = 3  # the children's heartbeat timeout in the dead-partner cases
CHILD_ENV = {"PYTHONPATH": REPO, "BITDANCE_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_S),
             "BITDANCE_SHUTDOWN_TIMEOUT_S": "20", "BITDANCE_INIT_TIMEOUT_S": "60"}


# ---------------------------------------------------------------------------------------
# Flags and detection (this process).

def test_argparse_flags_and_normalize_argv():
    parser = argparse.ArgumentParser()
    distributed.add_arguments(parser)
    args = parser.parse_args(["--coordinator", "h:1", "--num-processes", "2",
                              "--process_id=1", "--multihost", "yes"])
    assert (args.coordinator, args.num_processes, args.process_id, args.multihost) == \
        ("h:1", 2, 1, "yes")
    assert parser.parse_args([]).multihost == "auto"
    assert distributed.normalize_argv(
        ["prog", "--num-processes", "2", "--process-id=1", "--config.x=1", "--", "--process-id"]
    ) == ["prog", "--num_processes", "2", "--process_id=1", "--config.x=1", "--", "--process-id"]


def test_absl_flags():
    from absl import flags
    fv = flags.FlagValues()
    distributed.define_absl_flags(fv)
    fv(distributed.normalize_argv(["prog", "--coordinator=h:2", "--num-processes=4",
                                   "--process-id", "3"]))
    assert (fv.coordinator, fv.num_processes, fv.process_id, fv.multihost) == ("h:2", 4, 3, "auto")


def test_detect_cluster():
    assert distributed.detect_cluster({}) is None
    assert distributed.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert distributed.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}) == "slurm"
    assert distributed.detect_cluster({"OMPI_COMM_WORLD_SIZE": "4"}) == "ompi"
    assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
    assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "a"}) is None
    assert distributed.detect_cluster({"JAX_COORDINATOR_ADDRESS": "h:1"}) == "jax_env"


def test_initialize_without_a_job(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("SLURM_", "OMPI_", "TPU_")) or k == "JAX_COORDINATOR_ADDRESS":
            monkeypatch.delenv(k)
    assert distributed.initialize() is False                     # auto, no cluster
    assert distributed.initialize(mode="no") is False
    assert distributed.initialize("h:1", 1, 0) is False          # one process: nothing to join
    with pytest.raises(ValueError, match="contradicts"):
        distributed.initialize("h:1", 2, 0, mode="no")
    with pytest.raises(ValueError, match="--process-id"):
        distributed.initialize("h:1", 2, None)
    with pytest.raises(ValueError, match="not in 0 .. 1"):
        distributed.initialize("h:1", 2, 2)
    with pytest.raises(ValueError, match="multihost mode"):
        distributed.initialize(mode="maybe")
    # one process: the barrier is a no-op and run_once just runs
    distributed.barrier("alone", timeout_s=0.1)
    assert distributed.run_once("alone", lambda: 5) == 5


# ---------------------------------------------------------------------------------------
# Two processes.

def results(stdout: str) -> list[dict]:
    return [json.loads(l.split("RESULT ", 1)[1]) for l in stdout.splitlines() if "RESULT " in l]


def launch(case, *extra, slurm=False, env=None, timeout=120):
    cmd = [sys.executable, LAUNCHER, "-n", "2", "--devices-per-process", "2", "--grace", "5"]
    cmd += ["--slurm"] if slurm else []
    cmd += ["--", sys.executable, WORKER, case, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **CHILD_ENV, **(env or {})))


@pytest.mark.parametrize("slurm", [False, True], ids=["flags", "slurm_env"])
def test_two_processes_join(slurm):
    out = launch("allgather", slurm=slurm)
    assert out.returncode == 0, out.stdout + out.stderr
    done = [r for r in results(out.stdout) if r["event"] == "done"]
    assert sorted(r["process"] for r in done) == [0, 1]
    for r in done:
        assert (r["process_count"], r["device_count"], r["gathered"]) == (2, 4, [1, 11])


def test_barrier_timeout_names_the_missing_process():
    t0 = time.monotonic()
    out = launch("barrier_missing", "--timeout", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    err = [r for r in results(out.stdout) if r["event"] == "barrier_error"]
    assert len(err) == 1, out.stdout
    assert "barrier 'missing': process 1 did not arrive within 2 s" in err[0]["message"]
    assert err[0]["seconds"] < 10
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("fail", [False, True], ids=["ok", "fails"])
def test_run_once(fail):
    out = launch("run_once", env={"MP_WORKER_FAIL": "1"} if fail else {})
    assert out.returncode == 0, out.stdout + out.stderr
    by_process = {r["process"]: r for r in results(out.stdout) if r["event"].startswith("run_once")}
    if not fail:
        assert by_process[0]["value"] == "built" and by_process[1]["value"] is None
    else:
        assert by_process[0]["type"] == "OSError"
        assert by_process[1]["type"] == "DistributedError"
        assert "failed on process 0: OSError: disk full" in by_process[1]["message"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("victim,wait_in", [(1, "collective"), (1, "exit"), (0, "barrier")],
                         ids=["worker_dies_partner_in_collective",
                              "worker_dies_partner_in_shutdown",
                              "coordinator_dies_partner_in_barrier"])
def test_partner_sigkilled_exits_within_bounded_time(victim, wait_in):
    """No launcher here (it would stop the survivor itself): the survivor must end on its own,
    with an error, within the heartbeat timeout plus a margin."""
    port = _free_port()
    env = dict(os.environ, **CHILD_ENV, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=2",
               MP_WORKER_VICTIM=str(victim), MP_WORKER_WAIT_IN=wait_in)
    procs = [subprocess.Popen([sys.executable, WORKER, "kill_partner", "--coordinator",
                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [[], []]
    readers = [threading.Thread(target=lambda i=i: outputs[i].extend(procs[i].stdout), daemon=True)
               for i in range(2)]
    for r in readers:
        r.start()
    survivor = 1 - victim
    try:
        procs[victim].wait(timeout=90)
        killed_at = time.monotonic()
        rc = procs[survivor].wait(timeout=HEARTBEAT_S + 30)
        took = time.monotonic() - killed_at
    except subprocess.TimeoutExpired:
        pytest.fail(f"process {survivor} hangs after process {victim} died:\n"
                    + "".join(outputs[survivor]))
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
    for r in readers:
        r.join(timeout=5)
    assert procs[victim].returncode == -9, "".join(outputs[victim])
    assert rc != 0, "".join(outputs[survivor])
    assert took < HEARTBEAT_S + 15, took
    print(f"process {survivor} exited ({rc}) {took:.1f} s after process {victim} was killed")
