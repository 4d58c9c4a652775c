"""Child program of the multi-process tests: ``python tests/parallel/mp_worker.py CASE [flags]``.

Run under ``tools/launch_local.py`` (which appends --coordinator/--num-processes/--process-id)
with the repository root on PYTHONPATH. Prints ``RESULT {json}`` lines for the test to read.
"""
import argparse
import json
import os
import signal
import sys
import time


def result(**kw):
    print("RESULT " + json.dumps(kw), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("case")
    parser.add_argument("--timeout", type=float, default=3.0)
    from bitdance_jax.parallel import distributed
    distributed.add_arguments(parser)
    args = parser.parse_args()
    t0 = time.monotonic()
    distributed.initialize_from(args)
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    me = jax.process_index()
    result(event="initialized", process=me, seconds=time.monotonic() - t0)

    if args.case == "allgather":
        gathered = multihost_utils.process_allgather(np.array([me * 10 + 1], np.int32))
        multihost_utils.sync_global_devices("allgather_test")
        distributed.barrier("after_allgather", timeout_s=60)
        result(event="done", process=me, process_count=jax.process_count(),
               device_count=jax.device_count(), local_device_count=jax.local_device_count(),
               gathered=np.asarray(gathered).ravel().tolist())
    elif args.case == "barrier_missing":
        # process 1 never arrives at "missing"; process 0 must get an error naming it
        distributed.barrier("start", timeout_s=60)
        if me == 0:
            t = time.monotonic()
            try:
                distributed.barrier("missing", timeout_s=args.timeout)
            except distributed.DistributedError as e:
                result(event="barrier_error", process=me, seconds=time.monotonic() - t,
                       message=str(e))
            else:
                result(event="barrier_passed", process=me)
        distributed.barrier("end", timeout_s=60)
        result(event="done", process=me)
    elif args.case == "run_once":
        def build():
            if os.environ.get("MP_WORKER_FAIL"):
                raise OSError("disk full")
            return "built"
        try:
            out = distributed.run_once("build", build, timeout_s=30)
            result(event="run_once", process=me, value=out)
        except Exception as e:
            result(event="run_once_error", process=me, type=type(e).__name__, message=str(e))
        distributed.barrier("end", timeout_s=60)
        result(event="done", process=me)
    elif args.case == "kill_partner":
        # both meet; process 1 (or --victim) kills itself; the other waits in a collective
        victim = int(os.environ.get("MP_WORKER_VICTIM", "1"))
        distributed.barrier("start", timeout_s=60)
        multihost_utils.sync_global_devices("start_devices")
        result(event="ready", process=me, time=time.time())
        if me == victim:
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
        where = os.environ.get("MP_WORKER_WAIT_IN", "collective")
        if where == "collective":
            while True:  # keeps calling collectives; one of them never completes
                multihost_utils.process_allgather(np.array([me], np.int32))
                time.sleep(0.1)
        elif where == "barrier":
            distributed.barrier("never", timeout_s=3600)
        elif where == "exit":
            time.sleep(2)  # leave main: the jax.distributed shutdown barrier waits
            result(event="leaving", process=me, time=time.time())
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
