"""tools/launch_local.py: flags and environment of each process, prefixed live output, signal
forwarding, stopping the others when one dies, the exit-code convention, and two real JAX
processes joined by the flags it passes. Every subprocess runs under a hard timeout."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(REPO, "tools", "launch_local.py")
HARD_TIMEOUT = 60


def child_script(tmp_path, body: str, name="child.py") -> str:
    """A dummy child: ``PID`` is its --process-id, ``ARGS`` its argv."""
    path = tmp_path / name
    path.write_text("import os, signal, sys, time\n"
                    "ARGS = sys.argv[1:]\n"
                    "PID = int(ARGS[ARGS.index('--process-id') + 1]) if '--process-id' in ARGS "
                    "else int(os.environ.get('SLURM_PROCID', -1))\n" + textwrap.dedent(body))
    return str(path)


def launch(args, *, env=None, timeout=HARD_TIMEOUT, status=None):
    cmd = [sys.executable, LAUNCHER] + list(args)
    if status is not None:
        cmd[2:2] = ["--status-file", str(status)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ, **(env or {})))
    return out


def test_flags_env_and_prefixed_output(tmp_path):
    script = child_script(tmp_path, """
        print("args", " ".join(ARGS))
        print("xla", os.environ["XLA_FLAGS"])
        print("platforms", os.environ["JAX_PLATFORMS"])
        sys.stderr.write("to stderr\\n")
    """)
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/nowhere --xla_force_host_platform_device_count=8"}
    out = launch(["-n", "2", "--devices-per-process", "3", "--port", "12345", "--",
                  sys.executable, script, "--own-flag"], env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    for i in range(2):
        assert (f"[{i}] args --own-flag --coordinator 127.0.0.1:12345 --num-processes 2 "
                f"--process-id {i}") in lines
        assert (f"[{i}] xla --xla_dump_to=/tmp/nowhere "
                "--xla_force_host_platform_device_count=3") in lines
        assert f"[{i}] to stderr" in lines
        assert f"[{i}] platforms {os.environ.get('JAX_PLATFORMS', 'cpu')}" in lines
    # a JAX_PLATFORMS already set is kept
    out = launch(["-n", "1", "--", sys.executable, script], env={"JAX_PLATFORMS": "tpu"})
    assert "[0] platforms tpu" in out.stdout.splitlines()


def test_free_port_and_slurm_environment(tmp_path):
    script = child_script(tmp_path, """
        keys = ["SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                "SLURM_STEP_NODELIST", "SLURM_STEP_NUM_NODES"]
        print("slurm", " ".join(os.environ.get(k, "-") for k in keys), "argc", len(ARGS))
    """)
    out = launch(["-n", "2", "--slurm", "--", sys.executable, script])
    assert out.returncode == 0, out.stdout + out.stderr
    rows = sorted(l.split()[2:] for l in out.stdout.splitlines() if " slurm " in l)
    assert len(rows) == 2
    for i, (job, ntasks, procid, localid, nodes, num_nodes, _, argc) in enumerate(rows):
        assert (ntasks, procid, localid, nodes, num_nodes, argc) == \
            ("2", str(i), str(i), "localhost", "1", "0")  # no flags appended
        # jax's SLURM cluster derives the port from the job id: a port in the ephemeral range
        assert 61440 <= int(job) % 4096 + 61440 <= 65535
    assert rows[0][0] == rows[1][0]


def test_exit_code_of_the_first_failure_stops_the_others(tmp_path):
    script = child_script(tmp_path, """
        if PID == 1:
            time.sleep(0.5)
            sys.exit(3)
        time.sleep(120)
    """)
    status = tmp_path / "status.json"
    t0 = time.monotonic()
    out = launch(["-n", "2", "--", sys.executable, script], status=status)
    assert time.monotonic() - t0 < 30
    assert out.returncode == 3, out.stdout + out.stderr
    assert "launch_local: process 1 died: exit code 3" in out.stdout
    outcome = json.loads(status.read_text())
    assert outcome["process"] == 1 and outcome["exit_code"] == 3
    assert outcome["returncodes"] == [-signal.SIGTERM, 3]  # process 0 was stopped by SIGTERM


def test_sigkill_is_reported_and_a_child_ignoring_sigterm_is_killed(tmp_path):
    script = child_script(tmp_path, """
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if PID == 1:
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(120)
    """)
    status = tmp_path / "status.json"
    t0 = time.monotonic()
    out = launch(["-n", "2", "--grace", "1", "--", sys.executable, script], status=status)
    assert time.monotonic() - t0 < 30
    assert out.returncode == 128 + signal.SIGKILL, out.stdout + out.stderr
    assert "launch_local: process 1 died: killed by SIGKILL" in out.stdout
    assert "SIGKILL" in out.stdout.splitlines()[-1]
    outcome = json.loads(status.read_text())
    assert (outcome["process"], outcome["signal"]) == (1, "SIGKILL")
    assert outcome["returncodes"] == [-signal.SIGKILL, -signal.SIGKILL]


def test_all_succeed_after_one_finishes_early(tmp_path):
    script = child_script(tmp_path, """
        time.sleep(0.1 if PID == 0 else 1.0)
        print("done", PID)
    """)
    out = launch(["-n", "3", "--", sys.executable, script])
    assert out.returncode == 0, out.stdout + out.stderr
    assert {f"[{i}] done {i}" for i in range(3)} <= set(out.stdout.splitlines())


def run_until_ready(args, n, timeout=HARD_TIMEOUT):
    """Start the launcher; return (process, lines so far, reader thread) once every child
    printed 'ready'."""
    proc = subprocess.Popen([sys.executable, LAUNCHER] + args, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, ready = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if sum(l.endswith("] ready") for l in lines) == n:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not ready.wait(timeout):
        proc.kill()
        pytest.fail("children never became ready:\n" + "\n".join(lines))
    return proc, lines, reader


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_are_forwarded_to_every_process(tmp_path, sig):
    script = child_script(tmp_path, """
        def handle(signum, frame):
            print("got", signal.Signals(signum).name, flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
        print("ready", flush=True)
        time.sleep(120)
    """)
    proc, lines, reader = run_until_ready(["-n", "2", "--", sys.executable, script], 2)
    proc.send_signal(sig)
    try:
        rc = proc.wait(timeout=30)
    finally:
        proc.kill()
    reader.join(timeout=5)
    assert rc == 0, "\n".join(lines)
    for i in range(2):
        assert f"[{i}] got {sig.name}" in lines


def test_forwarded_sigterm_that_kills_reports_143(tmp_path):
    script = child_script(tmp_path, """
        print("ready", flush=True)
        time.sleep(120)
    """)
    proc, lines, reader = run_until_ready(["-n", "2", "--", sys.executable, script], 2)
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=30)
    finally:
        proc.kill()
    reader.join(timeout=5)
    assert rc == 128 + signal.SIGTERM, "\n".join(lines)
    assert any("died: killed by SIGTERM" in l for l in lines)


def test_usage_errors(tmp_path):
    assert launch(["-n", "2", "echo", "hi"]).returncode == 2  # no --
    assert launch(["-n", "0", "--", "true"]).returncode == 2


def test_two_jax_processes_join_through_the_flags():
    """2 processes x 2 CPU devices: one JAX job of 4 devices (process_allgather, a device
    barrier and a coordination-service barrier)."""
    worker = os.path.join(REPO, "tests", "parallel", "mp_worker.py")
    out = launch(["-n", "2", "--devices-per-process", "2", "--", sys.executable, worker,
                  "allgather"], env={"PYTHONPATH": REPO}, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    done = [json.loads(l.split("RESULT ", 1)[1]) for l in out.stdout.splitlines()
            if "RESULT " in l and '"done"' in l]
    assert sorted(d["process"] for d in done) == [0, 1]
    for d in done:
        assert (d["process_count"], d["device_count"], d["local_device_count"]) == (2, 4, 2)
        assert d["gathered"] == [1, 11]
