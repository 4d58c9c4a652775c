"""What each kind of training run trains: the tokenizer, class-conditional BitDance, text-to-image BitDance."""
from __future__ import annotations

from bitdance_jax.train.tasks.base import Task

KINDS = ("tokenizer", "bitdance", "t2i", "pipeline")


def make_task(config, workdir: str | None = None, tokenizer=None) -> Task:
    """The task for ``config.kind`` (modules import lazily: T2I pulls in the text stack);
    ``tokenizer``: the frozen image tokenizer instead of ``config.tokenizer_dir``'s."""
    if config.kind == "tokenizer":
        from bitdance_jax.train.tasks.tokenizer import TokenizerTask
        return TokenizerTask(config, workdir)
    if config.kind == "bitdance":
        from bitdance_jax.train.tasks.c2i import BitDanceTask
        return BitDanceTask(config, workdir, tokenizer)
    if config.kind == "t2i":
        from bitdance_jax.train.tasks.t2i import T2ITask
        return T2ITask(config, workdir, tokenizer)
    raise ValueError(f"unknown config.kind {config.kind!r}; use one of {KINDS}")
