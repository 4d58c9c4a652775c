"""The class-conditional directory format (``kind: bitdance_c2i``): its one writer and
reader, used by loading, porting and training.

``bitdance.json`` holds the model config, the tokenizer config, the default guidance and
where the weights came from; ``params`` holds {"model", "head", "tokenizer"} in the
unscanned layer layout. A quantized directory (``"quantization": "int8"`` or ``"fp8"``)
holds each model and head kernel as ``{"qvalue", "scale"}`` (``nn.quant.to_plain``)."""
from __future__ import annotations

import dataclasses

from bitdance_jax.c2i import config as c2i_config
from bitdance_jax.c2i.config import BitDanceConfig, released_name
from flax import linen as nn
from flax import traverse_util

from bitdance_jax.c2i.model import abstract_backbone_params, to_unscanned
from bitdance_jax.checkpointing import fingerprint, param_dir
from bitdance_jax.nn import quant
from bitdance_jax.nn.diffusion_head import DiffusionNet, example_inputs as head_inputs
from bitdance_jax.nn.params import abstract_params
from bitdance_jax.tokenizer.model import TokenizerConfig, abstract_tokenizer_params

KIND = "bitdance_c2i"


def save_model(dst: str, config: BitDanceConfig, params, tokenizer_config: TokenizerConfig,
               *, default_cfg_scale: float | None = None, overwrite: bool = False,
               source: str = "", weights: str | None = None,
               quantize: str | None = None) -> str:
    """Write a (trained) model with its tokenizer: params {"model", "head", "tokenizer"} in
    the layer layout of ``config``. The directory always holds the unscanned layout (and says
    ``scan_layers: false``), so it loads whatever layout the writer trained with.
    ``default_cfg_scale`` None: the released model's guidance, else 4.6 (``default_cfg_scale``
    of ``c2i.config``). The metadata records the tokenizer's params digest
    (``tokenizer_params``, ``fingerprint.tree_digest``): the key of the latent cache it
    trained on. ``weights``: which weights of a training checkpoint a port took ("ema" or
    "model"), recorded as ``"weights"``. ``quantize``: the mode the model and head kernels
    of ``params`` were quantized in (``quantize_params``), recorded as ``"quantization"``."""
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
    if quant.check_mode(quantize) is not None:
        extra["quantization"] = quantize
        params = quant.to_plain(params)
    return param_dir.save_param_dir(dst, KIND, config.to_dict(), params, overwrite=overwrite,
                                     extra=extra)


def abstract_c2i_params(config: BitDanceConfig, tokenizer_config: TokenizerConfig,
                        quantize: str | None = None) -> dict:
    """Boxed abstract {"model", "head", "tokenizer"} of an (unscanned) directory; ``quantize``:
    with the model and head kernels quantized (the tokenizer stays float32)."""
    config = dataclasses.replace(config, scan_layers=False)
    head = DiffusionNet(config.head_config)
    example = head_inputs(config.head_config)
    return {"model": abstract_backbone_params(config, quantize=quantize),
            "head": abstract_params(head, *example) if quantize is None
            else quant.abstract_quantized(head, quantize, *example),
            "tokenizer": abstract_tokenizer_params(tokenizer_config)}


def quantize_params(params, config: BitDanceConfig, tokenizer_config: TokenizerConfig,
                    quantize: str) -> dict:
    """Float {"model", "head", "tokenizer"} (unscanned) -> the model and head kernels
    quantized, one tensor at a time (``nn.quant``)."""
    abstract = nn.unbox(abstract_c2i_params(config, tokenizer_config, quantize))
    return quant.quantize_tree(to_unscanned(params, config), abstract)


def load(path: str, quantize: str | None = None) -> tuple[dict, BitDanceConfig, dict]:
    """``(meta, config, params)`` of a class-conditional directory (a local path).

    A quantized directory restores its kernels as stored (``quantize`` None or its own mode,
    ``meta["quantization"]`` says which); a float one with ``quantize`` is quantized as it
    is read, one tensor at a time."""
    meta = param_dir.read_meta(path)
    if meta.get("kind") != KIND:
        raise param_dir.CheckpointError(f"{path} holds a '{meta.get('kind')}' checkpoint, not a "
                                         f"class-conditional BitDance model ('{KIND}')")
    stored = meta.get("quantization")
    try:
        quant.check_mode(stored)
    except ValueError as e:
        raise param_dir.CheckpointError(f"{path}: {e}") from e
    if stored is not None and quant.check_mode(quantize) not in (None, stored):
        raise param_dir.CheckpointError(
            f"{path} holds {stored} weights, not {quantize}: load it with quantize={stored!r} "
            "(or None), or port the float weights again with the other quantization")
    config = BitDanceConfig.from_dict(meta["config"])
    mode = stored or quantize
    if mode is None:
        _, params = param_dir.load_param_dir(path, KIND)
        return meta, config, params
    tok_config = TokenizerConfig(**meta["tokenizer"])
    abstract = nn.unbox(abstract_c2i_params(config, tok_config, mode))
    if stored is not None:
        _, params = param_dir.load_param_dir(path, KIND)
        return meta, config, quant.from_plain(params, abstract)
    flat_q = traverse_util.flatten_dict(abstract, is_leaf=lambda _, v: quant.is_quantized(v))
    target = nn.unbox(abstract_c2i_params(config, tok_config))
    _, params = param_dir.load_param_dir_leafwise(
        path, KIND, target, lambda key, value: quant.quantize_leaf(value, flat_q[key]))
    return {**meta, "quantization": mode}, config, params
