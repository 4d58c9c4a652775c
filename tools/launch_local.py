#!/usr/bin/env python3
"""Run N processes of a multi-process JAX program on this machine, the way a pod runs them.

    python tools/launch_local.py -n 2 --devices-per-process 2 -- \\
        python -m bitdance_jax.train --config configs/digits_bitdance.py --workdir /tmp/run

Process I runs ``<command> --coordinator 127.0.0.1:PORT --num-processes N --process-id I``
(with ``--slurm``: the command unchanged, under the SLURM_* variables ``srun`` would set, one
node, the port derived from SLURM_JOB_ID as jax does). Every process gets
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (added to any XLA_FLAGS already set),
``JAX_PLATFORMS=cpu`` unless JAX_PLATFORMS is set, and ``PYTHONUNBUFFERED=1``; each runs in
its own process group (a signal to it reaches its subprocesses too).

Output: every line of process I (stdout and stderr) is printed live as ``[I] line``.

Signals: SIGTERM and SIGINT to the launcher are forwarded to every process (a trainer saves
and exits); a second SIGINT kills them (SIGKILL).

Failure: when a process exits non-zero or is killed by a signal, the launcher prints
``launch_local: process I died: exit code C`` or ``... killed by SIGNAME``, sends SIGTERM to
the others, SIGKILL after ``--grace`` seconds, and exits with the code of the first process
that died: its exit code, or 128 + the signal number (as a shell reports it: 137 = SIGKILL,
143 = SIGTERM). 0 when every process exits 0. ``--status-file`` also writes the outcome as
JSON: {"exit_code", "process", "returncode", "signal", "returncodes"} (returncode as
subprocess gives it: -S for a signal S).

Standard library only.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
SLURM_PORT_BASE = 65535 - 2 ** 12 + 1  # jax: port = SLURM_JOB_ID % 4096 + this


def free_port(low: int | None = None, high: int | None = None) -> int:
    """A TCP port free on 127.0.0.1 now (any, or the first free one in [low, high])."""
    candidates = [0] if low is None else range(low, high + 1)
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in {low}..{high}")


def merge_xla_flags(existing: str, devices: int) -> str:
    kept = [f for f in existing.split() if not f.startswith(DEVICE_COUNT_FLAG)]
    return " ".join(kept + [f"{DEVICE_COUNT_FLAG}={devices}"])


def child_env(base: dict, index: int, num: int, devices: int, port: int, slurm: bool) -> dict:
    env = dict(base)
    env["XLA_FLAGS"] = merge_xla_flags(env.get("XLA_FLAGS", ""), devices)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONUNBUFFERED"] = "1"
    if slurm:
        env.update(SLURM_JOB_ID=str(port - SLURM_PORT_BASE + 4096), SLURM_NTASKS=str(num),
                   SLURM_PROCID=str(index), SLURM_LOCALID=str(index), SLURM_NODEID="0",
                   SLURM_STEP_NODELIST="localhost", SLURM_NODELIST="localhost",
                   SLURM_STEP_NUM_NODES="1", SLURM_JOB_NUM_NODES="1")
    return env


def describe(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit code {returncode}"


def exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class Launcher:
    def __init__(self, command, num, devices, port, grace, slurm, out=sys.stdout):
        self.command, self.num, self.devices = list(command), num, devices
        self.port, self.grace, self.slurm, self.out = port, grace, slurm, out
        self.procs: list[subprocess.Popen] = []
        self.pumps: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.exited: queue.Queue = queue.Queue()
        self.signals: collections.deque = collections.deque()  # appended by signal handlers

    def say(self, text: str):
        with self.lock:
            self.out.write(f"launch_local: {text}\n")
            self.out.flush()

    def _pump(self, i: int, stream):
        prefix = f"[{i}] ".encode()
        out = getattr(self.out, "buffer", None)
        for line in iter(stream.readline, b""):
            if not line.endswith(b"\n"):
                line += b"\n"
            with self.lock:
                if out is not None:
                    out.write(prefix + line)
                    out.flush()
                else:
                    self.out.write((prefix + line).decode("utf-8", "replace"))
                    self.out.flush()
        stream.close()

    def _reap(self, i: int, proc: subprocess.Popen):
        proc.wait()
        self.exited.put(i)

    def signal_all(self, sig: int, only_running: bool = True):
        for p in self.procs:
            if only_running and p.poll() is not None:
                continue
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def start(self):
        base = dict(os.environ)
        for i in range(self.num):
            cmd = self.command if self.slurm else self.command + [
                "--coordinator", f"127.0.0.1:{self.port}", "--num-processes", str(self.num),
                "--process-id", str(i)]
            env = child_env(base, i, self.num, self.devices, self.port, self.slurm)
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            self.procs.append(proc)
            pump = threading.Thread(target=self._pump, args=(i, proc.stdout), daemon=True)
            pump.start()
            self.pumps.append(pump)
            threading.Thread(target=self._reap, args=(i, proc), daemon=True).start()

    def run(self) -> dict:
        """Start, wait, stop the rest on a failure; the outcome (see the module docstring)."""
        self.start()
        first = None      # (index, returncode) of the first process that failed
        deadline = None   # SIGKILL the rest at this time
        interrupts = 0
        remaining = set(range(self.num))
        while remaining:
            sig = self.signals.popleft() if self.signals else None
            if sig is not None:
                interrupts += sig == signal.SIGINT
                if sig == signal.SIGINT and interrupts > 1:
                    self.say("second SIGINT: killing every process")
                    self.signal_all(signal.SIGKILL)
                else:
                    self.say(f"forwarding {signal.Signals(sig).name} to every process")
                    self.signal_all(sig)
            try:
                i = self.exited.get(timeout=0.05)
            except queue.Empty:
                i = None
            if i is not None:
                remaining.discard(i)
                rc = self.procs[i].returncode
                if rc != 0 and first is None:
                    first = (i, rc)
                    self.say(f"process {i} died: {describe(rc)}")
                    if remaining:
                        self.say(f"stopping {_plural(sorted(remaining))} (SIGTERM, SIGKILL "
                                 f"after {self.grace:g} s)")
                        self.signal_all(signal.SIGTERM)
                        deadline = time.monotonic() + self.grace
            if deadline is not None and remaining and time.monotonic() > deadline:
                self.say(f"{_plural(sorted(remaining))} still running after "
                         f"{self.grace:g} s: SIGKILL")
                self.signal_all(signal.SIGKILL)
                deadline = None
        for pump in self.pumps:  # the last lines (a subprocess left behind may hold the pipe)
            pump.join(timeout=2.0)
        codes = [p.returncode for p in self.procs]
        if first is None:
            return {"exit_code": 0, "process": None, "returncode": 0, "signal": None,
                    "returncodes": codes}
        i, rc = first
        code = exit_code(rc)
        self.say(f"exit {code} (process {i}: {describe(rc)})")
        return {"exit_code": code, "process": i, "returncode": rc,
                "signal": describe(rc)[len("killed by "):] if rc < 0 else None,
                "returncodes": codes}


def _plural(ids) -> str:
    return ("process " if len(ids) == 1 else "processes ") + ", ".join(map(str, ids))


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python tools/launch_local.py", description=__doc__.split("\n\n")[0],
        usage="%(prog)s -n N --devices-per-process D [--port P] [--slurm] -- COMMAND ...")
    parser.add_argument("-n", "--num-processes", type=int, required=True)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds between SIGTERM and SIGKILL when stopping the others")
    parser.add_argument("--slurm", action="store_true",
                        help="pass SLURM_* environment variables instead of flags")
    parser.add_argument("--status-file", default=None, help="write the outcome as JSON")
    if "--" not in argv:
        parser.error("put the command after --")
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    args.command = argv[split + 1:]
    if not args.command:
        parser.error("no command after --")
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("-n and --devices-per-process must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    port = args.port
    if port is None:
        port = free_port(SLURM_PORT_BASE, 65535) if args.slurm else free_port()
    elif args.slurm and port < SLURM_PORT_BASE:
        print(f"launch_local: --slurm needs a port >= {SLURM_PORT_BASE}", file=sys.stderr)
        return 2
    launcher = Launcher(args.command, args.num_processes, args.devices_per_process, port,
                        args.grace, args.slurm)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: launcher.signals.append(signum))
    try:
        outcome = launcher.run()
    except BaseException:
        launcher.signal_all(signal.SIGKILL)
        raise
    if args.status_file:
        with open(args.status_file, "w") as f:
            json.dump(outcome, f)
    return outcome["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
