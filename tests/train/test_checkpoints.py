"""Training checkpoints without a training run: the keep option and the fallback from a corrupt
latest step (a tiny state saved and restored by the trainer's own functions)."""
import jax
import pytest

from bitdance_jax.configs.common import base_config
from bitdance_jax.train import checkpoints


def config(**kw):
    c = base_config("tokenizer")
    c.checkpoint.update(dict(every_steps=1, keep=2, async_save=False))
    c.update_from_flattened_dict(kw)
    return c


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_below_one_is_refused(tmp_path, keep):
    """Orbax reads max_to_keep=0 as keep none: after any save nothing would be on disk."""
    with pytest.raises(ValueError, match=r"checkpoint\.keep must be a whole number >= 1"):
        checkpoints.make_checkpoint_manager(str(tmp_path), config(**{"checkpoint.keep": keep}))


def _saved_steps(tmp_path, steps):
    import jax.numpy as jnp
    c = config(**{"checkpoint.keep": 5})
    mngr = checkpoints.make_checkpoint_manager(str(tmp_path), c)
    for step in steps:
        state = {"w": jnp.full((4, 3), float(step)), "step": jnp.asarray(step)}
        checkpoints.save_checkpoint(mngr, step, state, {"next": step}, force=True)
    mngr.wait_until_finished()
    abstract = {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32),
                "step": jax.ShapeDtypeStruct((), jnp.int32)}
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                             abstract)
    return c, mngr, abstract, shardings


def _corrupt(step_dir):
    """Truncate every array file of a step (what a preemption mid-write leaves)."""
    import os
    hit = 0
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            if "state" in root and os.path.getsize(path) > 0 and not name.endswith(".json"):
                with open(path, "r+b") as f:
                    f.truncate(max(0, os.path.getsize(path) // 3))
                hit += 1
    assert hit, f"no array file found under {step_dir}"


def test_a_corrupt_latest_step_falls_back_to_an_older_one(tmp_path, caplog):
    """Issue 19 case 4: a truncated file in checkpoints/<latest> raised an uncaught tensorstore
    Exception although step 1 was intact. Now the resume takes step 1, warns naming step 2,
    and moves step 2 aside so it can be saved again."""
    import logging
    import os
    import numpy as np
    _, mngr, abstract, shardings = _saved_steps(tmp_path, [1, 2])
    _corrupt(os.path.join(str(mngr.directory), "2"))
    with caplog.at_level(logging.WARNING, logger="bitdance_jax.train"):
        step, state, data_state = checkpoints.restore_latest(mngr, abstract, shardings)
    assert step == 1 and data_state == {"next": 1}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.ones((4, 3)))
    assert "checkpoint step 2" in caplog.text and "does not restore" in caplog.text
    assert mngr.all_steps() == [1]
    assert os.path.isdir(os.path.join(str(tmp_path), checkpoints.CORRUPT_DIR, "2"))
    mngr.close()


def test_no_step_restoring_is_a_one_line_error(tmp_path):
    import os
    _, mngr, abstract, shardings = _saved_steps(tmp_path, [1, 2])
    for step in (1, 2):
        _corrupt(os.path.join(str(mngr.directory), str(step)))
    with pytest.raises(ValueError, match=r"no checkpoint in .* restores \(steps 2, 1; step 2: "
                                         r".*\); remove .* to start this run from step 0") as e:
        checkpoints.restore_latest(mngr, abstract, shardings)
    assert "\n" not in str(e.value)
    mngr.close()
