"""The tokenizer directory format (``kind: tokenizer``): its one writer and reader.

A class-conditional or text-to-image directory embeds a tokenizer too (``"tokenizer"`` in its
metadata and params); ``load`` reads either."""
from __future__ import annotations

from bitdance_jax.checkpointing import param_dir
from bitdance_jax.tokenizer.model import TokenizerConfig

KIND = "tokenizer"


def save_tokenizer(dst: str, config: TokenizerConfig, params, *, source: str | None = None,
                   overwrite: bool = False) -> str:
    extra = {"source": source} if source else None
    return param_dir.save_param_dir(dst, KIND, config.to_dict(), params, overwrite=overwrite,
                                     extra=extra)


def load(path: str) -> tuple[TokenizerConfig, dict]:
    """``(config, params)`` of a tokenizer directory or of a model directory embedding one."""
    meta = param_dir.read_meta(path)
    if meta.get("kind") == KIND:
        cfg_dict = meta["config"]
        _, params = param_dir.load_param_dir(path, KIND)
    elif "tokenizer" in meta:  # a model directory that embeds its tokenizer
        cfg_dict = meta["tokenizer"]
        _, all_params = param_dir.load_param_dir(path)
        params = all_params["tokenizer"]
    else:
        raise param_dir.CheckpointError(f"{path} holds no tokenizer (kind '{meta.get('kind')}')")
    return TokenizerConfig(**cfg_dict), params
