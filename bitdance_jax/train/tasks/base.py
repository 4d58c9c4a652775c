"""The task contract: what the trainer asks of every kind of training run, with the shared defaults."""
from __future__ import annotations

from typing import Any

from bitdance_jax.data import pipeline as data_lib
from bitdance_jax.data.sources import make_source


class Task:
    """One kind of training run. The trainer owns the loop, the optimizer, the mesh and the
    checkpoints; a task owns the params, the loss, the data it reads, samples and export.

    Subclasses set ``kind`` and ``tokens_per_example`` and implement ``init``, ``loss``,
    ``sample_grid`` and ``export``; the rest has defaults here.
    """
    kind: str = ""
    tokens_per_example: int = 0

    def __init__(self, config, workdir: str | None = None, tokenizer=None):
        """``tokenizer``: the frozen image tokenizer where the task has one (default: loaded
        from ``config.tokenizer_dir``; the compile tool passes one of abstract params)."""
        self.config = config
        self.workdir = workdir

    # -- params and loss (traced inside the jitted step) ---------------------------------
    def init(self, rng) -> Any:
        """Fresh params (may carry logical-axis boxes; the trainer unboxes them)."""
        raise NotImplementedError

    def frozen(self) -> dict:
        """Arrays the loss reads but never trains (e.g. a tokenizer encoding images)."""
        return {}

    def abstract_batch(self, global_batch: int) -> dict:
        """ShapeDtypeStructs of one global batch as the task's dataset yields it."""
        raise NotImplementedError

    def loss(self, params, frozen, batch, rng, step) -> tuple[Any, dict]:
        """(scalar loss, dict of scalar terms); ``step`` is the traced step counter."""
        raise NotImplementedError

    def params_from_checkpoint(self, meta: dict, params) -> Any:
        """The part of a loaded directory's params this task trains (``config.init_from``)."""
        return params

    def pretrained_params(self) -> Any:
        """Params a new run starts from when ``config.init_from`` is empty (e.g. a pretrained
        backbone plus fresh new parts); None: ``init``."""
        return None

    # -- input ---------------------------------------------------------------------------
    def train_source(self):
        """Random-access records the dataset reads (``len`` fixes the epoch length)."""
        return make_source(self.config.data)

    def train_dataset(self, source, data_cfg, *, global_batch: int, num_steps: int, seed: int):
        """This process's Grain iterator of batches (its rows of each global batch)."""
        return data_lib.make_train_dataset(source, data_cfg, global_batch=global_batch,
                                           num_steps=num_steps, seed=seed)

    # -- outputs -------------------------------------------------------------------------
    def sample_grid(self, ema_params, source, path: str, seed: int) -> str:
        """Write a PNG of samples from the EMA params; returns its path."""
        raise NotImplementedError

    def export(self, ema_params, dst: str) -> str:
        """Write a loadable, self-describing directory of the EMA params."""
        raise NotImplementedError
