"""Access to the golden fixtures (tests/fixtures/golden, a copy of the reference's outputs): the manifest's cases, their arrays and tolerances. ``BITDANCE_GOLDEN`` points elsewhere."""
from __future__ import annotations

import json
import os
from functools import lru_cache

import numpy as np

# Models compared with the fixtures run full float32 matmuls on every backend (JAX's default
# may be one bf16 pass on TPU or TF32 on GPU).
MATMUL_PRECISION = "highest"

GOLDEN_DIR = os.environ.get(
    "BITDANCE_GOLDEN",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "golden"))


def path(*parts: str) -> str:
    return os.path.join(GOLDEN_DIR, *parts)


@lru_cache(maxsize=None)
def manifest() -> dict:
    with open(path("manifest.json")) as f:
        return json.load(f)


def case(name: str) -> dict:
    for c in manifest()["cases"]:
        if c["name"] == name:
            return c
    raise KeyError(f"no golden case {name!r}")


@lru_cache(maxsize=None)
def arrays(name: str) -> dict[str, np.ndarray]:
    with np.load(path(case(name)["file"])) as data:
        return {k: data[k] for k in data.files}


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(np.asarray(x), 1, -1)


def check(case_name: str, array_name: str, ours, report: dict | None = None) -> float:
    """Assert ``ours`` matches the golden array within the manifest's tolerance.

    Returns the max abs error (0 for exact arrays); ``report`` collects it per array.
    """
    spec = case(case_name)["arrays"][array_name]
    golden = arrays(case_name)[array_name]
    ours = np.asarray(ours)
    assert ours.shape == golden.shape, f"{case_name}/{array_name}: shape {ours.shape} vs {golden.shape}"
    if spec.get("compare") == "exact":
        mismatch = int(np.sum(ours.astype(golden.dtype) != golden))
        assert mismatch == 0, f"{case_name}/{array_name}: {mismatch} of {golden.size} entries differ"
        err = 0.0
    else:
        err_arr = np.abs(ours.astype(np.float64) - golden.astype(np.float64))
        bound = spec["atol"] + spec["rtol"] * np.abs(golden.astype(np.float64))
        worst = float(np.max(err_arr - bound)) if err_arr.size else 0.0
        err = float(err_arr.max()) if err_arr.size else 0.0
        assert worst <= 0, (f"{case_name}/{array_name}: max abs err {err:.3g} exceeds "
                            f"atol {spec['atol']} + rtol {spec['rtol']}")
    if report is not None:
        report[f"{case_name}/{array_name}"] = err
    print(f"[golden] {case_name}/{array_name}: max abs err {err:.3g}")
    return err
