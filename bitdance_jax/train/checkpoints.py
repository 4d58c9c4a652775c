"""Training checkpoints: the Orbax CheckpointManager holding the train state and the Grain iterator state."""
from __future__ import annotations

import logging
import os
import shutil

import jax
import orbax.checkpoint as ocp

from bitdance_jax.parallel import distributed

log = logging.getLogger("bitdance_jax.train")

CORRUPT_DIR = "corrupt_checkpoints"  # beside checkpoints/: steps that failed to restore


def make_checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
    cc = config.checkpoint
    # Orbax reads max_to_keep=0 as "keep none": a preempted run would restart from step 0.
    if isinstance(cc.keep, bool) or not isinstance(cc.keep, int) or cc.keep < 1:
        raise ValueError(f"checkpoint.keep must be a whole number >= 1 (how many of the latest "
                         f"checkpoints stay on disk), got {cc.keep!r}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cc.keep, save_interval_steps=max(1, cc.every_steps),
        enable_async_checkpointing=cc.async_save, create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options)


def save_checkpoint(mngr, step: int, state, data_state, force: bool = False) -> bool:
    return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(data_state)),
                     force=force)


def restore_checkpoint(mngr, step: int, abstract_state, state_shardings):
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract_state, state_shardings)
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                     data=ocp.args.JsonRestore()))
    return out["state"], out["data"]


def _reason(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 300 else text[:297] + "..."


def restore_latest(mngr, abstract_state, state_shardings):
    """``(step, state, data_state)`` of the newest checkpoint that restores, None when there is
    none. A newer step that fails (a truncated or corrupt file) is named in a warning and moved
    to ``<workdir>/corrupt_checkpoints/<step>``, so that the run can save that step again; when
    no step restores, a one-line ``ValueError`` says what to remove."""
    failed = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            state, data_state = restore_checkpoint(mngr, step, abstract_state, state_shardings)
        except Exception as e:  # tensorstore raises plain Exception / ValueError
            failed.append((step, _reason(e)))
            log.warning("checkpoint step %d in %s does not restore (%s); trying an older one",
                        step, mngr.directory, failed[-1][1])
            continue
        if failed:
            _set_aside(mngr, [s for s, _ in failed])
            log.warning("resuming from step %d; the unreadable step(s) %s were moved to %s", step,
                        ", ".join(str(s) for s, _ in failed), _corrupt_dir(mngr))
        return step, state, data_state
    if failed:
        newest, reason = failed[0]
        raise ValueError(f"no checkpoint in {mngr.directory} restores (steps "
                         f"{', '.join(str(s) for s, _ in failed)}; step {newest}: {reason}); "
                         f"remove {mngr.directory} to start this run from step 0")
    return None


def _corrupt_dir(mngr) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(str(mngr.directory))), CORRUPT_DIR)


def _set_aside(mngr, steps) -> None:
    """Move unreadable step folders out of the manager's sight (process 0; the others wait)."""
    if distributed.is_main():
        dst_root = _corrupt_dir(mngr)
        os.makedirs(dst_root, exist_ok=True)
        for step in steps:
            dst = os.path.join(dst_root, str(step))
            if os.path.lexists(dst):
                shutil.rmtree(dst)
            os.replace(os.path.join(str(mngr.directory), str(step)), dst)
    distributed.barrier("checkpoints.set_aside_corrupt")
    mngr.reload()
