"""Run by the quantization tests in a fresh process:
``peak_memory.py WARM_FLOAT_DIR WARM_INT8_DIR DIR:QUANTIZE...`` prints one JSON list, per
``DIR:QUANTIZE`` (QUANTIZE ``-`` for none) the peak RSS in bytes above the level just before
``t2i_io.load(DIR, quantize=QUANTIZE)`` (sampled every 0.5 ms). The warm directories are
loaded first the same ways (imports, first compiles)."""
import gc
import json
import os
import sys
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from bitdance_jax.t2i import io as t2i_io  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_of_load(path: str, quantize: str | None) -> int:
    gc.collect()
    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    before = rss()
    watcher = threading.Thread(target=watch)
    watcher.start()
    loaded = t2i_io.load(path, quantize=quantize)
    stop.set()
    watcher.join()
    peak[0] = max(peak[0], rss())
    del loaded
    return peak[0] - before


def main(warm_float: str, warm_int8: str, *jobs: str) -> None:
    jobs = [(path, None if q == "-" else q) for path, q in (j.rsplit(":", 1) for j in jobs)]
    for warm, quantize in ((warm_float, None), (warm_float, "int8"), (warm_int8, None)):
        t2i_io.load(warm, quantize=quantize)
    print(json.dumps([peak_of_load(path, q) for path, q in jobs]))


if __name__ == "__main__":
    main(*sys.argv[1:])
