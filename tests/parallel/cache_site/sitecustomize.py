"""Test speed-up for the multi-process tests (on PYTHONPATH of their subprocesses only).

jax writes persistent compilation cache entries from process 0 alone, and the cache keys of
the other processes differ from process 0's, so a relaunched process 1 compiles everything
again. With ``BITDANCE_TEST_CACHE_EVERY_PROCESS=1`` (and ``JAX_COMPILATION_CACHE_DIR``) every
process writes its own entries. It changes no result: a cache hit loads the executable the
same process compiled before. If jax's private hook moves, this does nothing.
"""
import os

if os.environ.get("BITDANCE_TEST_CACHE_EVERY_PROCESS") == "1":
    try:
        from jax._src import compilation_cache, compiler

        def _cache_write(cache_key, compile_time_secs, module_name, backend, executable,
                         host_callbacks):
            if host_callbacks:
                return
            try:
                compilation_cache.put_executable_and_time(
                    cache_key, module_name, executable, backend, int(compile_time_secs))
            except Exception:  # a cache that cannot be written only costs time
                pass

        compiler._cache_write = _cache_write
    except Exception:  # noqa: BLE001 - a speed-up only
        pass
