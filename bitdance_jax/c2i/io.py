"""The class-conditional directory format (``kind: bitdance_c2i``): its one writer and
reader, used by loading, porting and training.

``bitdance.json`` holds the model config, the tokenizer config, the default guidance and
where the weights came from; ``params`` holds {"model", "head", "tokenizer"} in the
unscanned layer layout."""
from __future__ import annotations

import dataclasses

from bitdance_jax.c2i import config as c2i_config
from bitdance_jax.c2i.config import BitDanceConfig, released_name
from bitdance_jax.c2i.model import to_unscanned
from bitdance_jax.checkpointing import fingerprint, param_dir
from bitdance_jax.tokenizer.model import TokenizerConfig

KIND = "bitdance_c2i"


def save_model(dst: str, config: BitDanceConfig, params, tokenizer_config: TokenizerConfig,
               *, default_cfg_scale: float | None = None, overwrite: bool = False,
               source: str = "", weights: str | None = None) -> str:
    """Write a (trained) model with its tokenizer: params {"model", "head", "tokenizer"} in
    the layer layout of ``config``. The directory always holds the unscanned layout (and says
    ``scan_layers: false``), so it loads whatever layout the writer trained with.
    ``default_cfg_scale`` None: the released model's guidance, else 4.6 (``default_cfg_scale``
    of ``c2i.config``). The metadata records the tokenizer's params digest
    (``tokenizer_params``, ``fingerprint.tree_digest``): the key of the latent cache it
    trained on. ``weights``: which weights of a training checkpoint a port took ("ema" or
    "model"), recorded as ``"weights"``."""
    params = to_unscanned(params, config)
    config = dataclasses.replace(config, scan_layers=False)
    name = released_name(config)
    if default_cfg_scale is None:
        default_cfg_scale = c2i_config.default_cfg_scale(config)
    extra = {"tokenizer": tokenizer_config.to_dict(), "source": source,
             "tokenizer_params": fingerprint.tree_digest(params["tokenizer"]),
             "released_name": name, "default_cfg_scale": float(default_cfg_scale)}
    if weights is not None:
        extra["weights"] = weights
    return param_dir.save_param_dir(dst, KIND, config.to_dict(), params, overwrite=overwrite,
                                     extra=extra)


def load(path: str) -> tuple[dict, BitDanceConfig, dict]:
    """``(meta, config, params)`` of a class-conditional directory (a local path)."""
    meta = param_dir.read_meta(path)
    if meta.get("kind") != KIND:
        raise param_dir.CheckpointError(f"{path} holds a '{meta.get('kind')}' checkpoint, not a "
                                         f"class-conditional BitDance model ('{KIND}')")
    _, params = param_dir.load_param_dir(path, KIND)
    return meta, BitDanceConfig.from_dict(meta["config"]), params

