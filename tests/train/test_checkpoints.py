"""Training checkpoints without a training run: the keep option and the fallback from a corrupt
latest step (a tiny state saved and restored by the trainer's own functions)."""
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
