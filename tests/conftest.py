"""Shared test setup: CPU with 8 simulated devices, the golden marker, a compilation cache."""
import os
import sys

import pytest

# Tests run on CPU; sharding tests see 8 simulated devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """Training tests compile the same programs again and again: share them through a
    persistent cache for the module (``pytestmark = pytest.mark.usefixtures(...)``)."""
    import jax
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update(keys[0], str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update(keys[1], 0.0)
    jax.config.update(keys[2], 0)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


def pytest_collection_modifyitems(items):
    """Tests of modules that read the golden fixtures are marked ``golden``."""
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and "golden" in vars(module):
            item.add_marker(pytest.mark.golden)
