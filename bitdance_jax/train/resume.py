"""Relaunching in a workdir that holds checkpoints with a config that differs from the saved one.

A resumed run is only the continuation of the saved one when everything that decides its batches
and its math is unchanged; the trainer refuses such changes (the override flag lets them through,
with a warning) and warns on the rest (logging, sampling, checkpoint cadence). The previous
``config.json`` is kept beside the new one whenever it changes.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

log = logging.getLogger("bitdance_jax.train")

CONFIG_FILE = "config.json"

# Top-level fields (and every field below them) whose change breaks exact resume: the model and
# its numerics, the frozen tokenizer, the loss, the batch, the schedule length and the data order.
EXACT_RESUME_FIELDS = ("kind", "seed", "global_batch_size", "per_device_batch_size", "num_steps",
                       "epochs", "compute_dtype", "matmul_precision", "init_from", "model",
                       "tokenizer", "tokenizer_dir", "tokenizer_from_stage", "tokenizer_loss",
                       "llm", "loss", "data", "optim")
# Data fields that only change how fast batches arrive, never which.
HARMLESS_DATA_FIELDS = ("data.num_threads", "data.prefetch")
# Grain's saved iterator state has one layout per worker count: a checkpoint written with one
# cannot be read with another, whatever the override flag says.
WORKER_COUNT = "data.worker_count"


def flatten(tree, prefix: str = "") -> dict:
    """Nested dicts -> {"a.b.c": leaf}."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def config_changes(saved: dict, new: dict) -> dict[str, tuple]:
    """{field: (saved value, new value)} of every field that differs (missing: None)."""
    saved, new = flatten(saved), flatten(new)
    return {k: (saved.get(k), new.get(k)) for k in sorted(set(saved) | set(new))
            if saved.get(k) != new.get(k)}


def breaks_exact_resume(field: str) -> bool:
    if field in HARMLESS_DATA_FIELDS:
        return False
    return field.split(".", 1)[0] in EXACT_RESUME_FIELDS


def has_checkpoints(workdir: str) -> bool:
    ckpt = os.path.join(workdir, "checkpoints")
    return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))


def _describe(changes: dict) -> str:
    return "; ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changes.items())


def check_resume_config(workdir: str, config_json: str, *, allow_config_change: bool) -> dict:
    """Compare ``config_json`` (the new config, as written to ``config.json``) with the one saved
    in ``workdir``. Returns the changes; raises ``ValueError`` for a change that breaks exact
    resume unless ``allow_config_change``. Every process calls it (all of them must refuse)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not (has_checkpoints(workdir) and os.path.exists(path)):
        return {}
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the saved config {path} ({type(e).__name__}); restore it "
                         f"or remove {workdir} to start over") from None
    if not isinstance(saved, dict):
        raise ValueError(f"the saved config {path} is not a JSON object")
    changes = config_changes(saved, json.loads(config_json))
    if WORKER_COUNT in changes:
        a, b = changes[WORKER_COUNT]
        raise ValueError(f"{WORKER_COUNT} changed from {a} to {b} since the checkpoints in "
                         f"{workdir} were written: the saved data iterator state only restores "
                         f"with the same worker count; relaunch with "
                         f"--config.{WORKER_COUNT}={a}")
    breaking = {k: v for k, v in changes.items() if breaks_exact_resume(k)}
    if breaking and not allow_config_change:
        raise ValueError(f"the config differs from the one the checkpoints in {workdir} were "
                         f"trained with, in fields that break exact resume ({_describe(breaking)}); "
                         f"relaunch with the saved config ({path}), pass --allow_config_change to "
                         f"resume anyway, or use another workdir")
    if breaking:
        log.warning("resuming with a changed config (--allow_config_change): %s",
                    _describe(breaking))
    rest = {k: v for k, v in changes.items() if k not in breaking}
    if rest:
        log.warning("resuming with changed settings: %s", _describe(rest))
    return changes


def write_config(workdir: str, config_json: str, changes: dict) -> None:
    """Write ``config.json``; a changed one keeps its predecessor as ``config.previous-<k>.json``."""
    path = os.path.join(workdir, CONFIG_FILE)
    if changes and os.path.exists(path):
        k = 1
        while os.path.exists(os.path.join(workdir, f"config.previous-{k}.json")):
            k += 1
        shutil.copyfile(path, os.path.join(workdir, f"config.previous-{k}.json"))
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        f.write(config_json)
    os.replace(tmp, path)
