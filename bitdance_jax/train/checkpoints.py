"""Training checkpoints: the Orbax CheckpointManager holding the train state and the Grain iterator state."""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


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
