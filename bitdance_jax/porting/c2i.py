"""Porting the released class-conditional ``.pt`` checkpoints: architecture inference from shapes and strict conversion."""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import numpy as np

from bitdance_jax.c2i import io as c2i_io
from bitdance_jax.c2i.config import MODEL_SIZES, RELEASED_MODELS, BitDanceConfig, inference_config
from bitdance_jax.c2i.model import abstract_backbone_params, from_unscanned
from bitdance_jax.nn import quant
from bitdance_jax.porting.head import infer_head_config, port_head_state_dict
from bitdance_jax.porting import convention as porting
from bitdance_jax.porting.tokenizer import infer_tokenizer_config, port_tokenizer_state_dict

TOKENIZER_NUM_CODEBOOKS = 4    # what the reference builds its VAE with
HEAD_PREFIX = "head.net."
VAE_PREFIX = "vae."
# Values the weights do not show; defaults are the reference's ImageNet training flags.
SCHEDULE_KEYS = ("parallel_mode", "diff_batch_mul", "time_shift", "P_mean", "P_std")


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    return porting.key_shape(sd, key, "a class-conditional BitDance checkpoint")


def weight_fields(sd: Mapping[str, Any]) -> dict[str, int]:
    """The ``BitDanceConfig`` fields the weights show (all but n_head and the schedule)."""
    dim = _shape(sd, "emb_norm.weight")[0]
    classes, cls_width = _shape(sd, "cls_embedding.weight")
    if cls_width % dim:
        raise porting.PortingError(f"cls_embedding width {cls_width} is not a multiple of dim {dim}")
    num_tokens = _shape(sd, "pos_for_diff.weight")[0]
    grid = math.isqrt(num_tokens)
    if grid * grid != num_tokens:
        raise porting.PortingError(f"pos_for_diff has {num_tokens} rows: not a square latent grid")
    parallel_num = _shape(sd, "query_token")[1] + 1 if "query_token" in sd else 1
    head_sd = {k[len("head."):]: v for k, v in sd.items() if k.startswith(HEAD_PREFIX)}
    head = infer_head_config(head_sd, "imagenet", prefix="net.", parallel_num=parallel_num)
    return dict(dim=dim, n_layer=len({m.group(1) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))}),
                diff_layers=head.depth_latent, diff_dim=head.ch_latent,
                diff_adanln_layers=head.depth_adanln,
                latent_dim=_shape(sd, "proj_in.w1.weight")[1], grid_size=grid,
                cls_token_num=cls_width // dim, num_classes=classes - 1, parallel_num=parallel_num)


def infer_config(sd: Mapping[str, Any], **overrides) -> BitDanceConfig:
    """Architecture of a class-conditional checkpoint from its keys and shapes.

    Not visible in the weights, hence taken from ``overrides`` or defaulted: ``n_head``
    (default dim // 64, the released models' head size) and the schedule values
    (``parallel_mode='patch'``, ``diff_batch_mul=4``, ``time_shift=1``, ``P_mean=-0.8``,
    ``P_std=0.8``).
    """
    known = set(SCHEDULE_KEYS) | {"n_head"}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown overrides {sorted(unknown)}; allowed: {sorted(known)}")
    fields = weight_fields(sd)
    fields["n_head"] = max(1, fields["dim"] // 64)
    fields.update(overrides)
    try:
        return BitDanceConfig(**fields)
    except ValueError as e:
        raise porting.PortingError(f"checkpoint gives an invalid architecture: {e}") from e


def settings_from_args(args) -> dict[str, Any]:
    """Head count and schedule values from the ``args`` (argparse.Namespace) a reference
    training checkpoint may carry: ``--model BitDance-B|L|H`` fixes n_head."""
    if args is None:
        return {}
    found = {k: getattr(args, k) for k in SCHEDULE_KEYS if hasattr(args, k)}
    size = str(getattr(args, "model", "")).removeprefix("BitDance-")
    if size in MODEL_SIZES:
        found["n_head"] = MODEL_SIZES[size]["n_head"]
    return found


def port_model_state_dict(sd: Mapping[str, Any], config: BitDanceConfig) -> dict:
    """Strictly port backbone and head (``vae.*`` keys are left to the tokenizer), in the
    layer layout of ``config`` (``scan_layers``)."""
    sd = {k: np.asarray(v) for k, v in sd.items()}
    model = porting.convert_state_dict(
        {k: v for k, v in sd.items() if not k.startswith((HEAD_PREFIX, VAE_PREFIX))},
        abstract_backbone_params(inference_config(config)), what="BitDance transformer weights")
    head = port_head_state_dict(sd, config.head_config, prefix=HEAD_PREFIX)
    return from_unscanned({"model": model, "head": head}, config)


def _as_config(config) -> BitDanceConfig | None:
    if config is None or isinstance(config, BitDanceConfig):
        return config
    if isinstance(config, str):
        if config not in RELEASED_MODELS:
            raise ValueError(f"unknown model {config!r}; known: {sorted(RELEASED_MODELS)}")
        return RELEASED_MODELS[config]
    return BitDanceConfig.from_dict(config)


def port_imagenet_checkpoint(src_pt: str, dst: str, use_ema: bool = True,
                             tokenizer_pt: str | None = None, *, config=None,
                             overwrite: bool = False, loaded: Mapping | None = None,
                             quantize: str | None = None, **overrides) -> str:
    """Port a reference ImageNet checkpoint ``{"model", "ema"}`` into a self-describing dir.

    The architecture is inferred from the weights, with head count and schedule from the
    file's ``args`` when present (``overrides`` win; see ``infer_config``);
    ``config`` (a ``BitDanceConfig``, its dict or a released name such as
    ``"BitDance-B-4x"``) states what the file must be and fails on any other architecture.
    The tokenizer comes from ``tokenizer_pt`` (``ae_d16c32.pt``) when given, as the
    reference's sampler does, else from the file's ``vae.*`` keys. ``loaded``: the file's
    content when the caller has already read it (saves a second read of a large file).
    ``quantize`` ("int8", "fp8"): write weight-only quantized model and head kernels.
    """
    ckpt = porting.load_torch_file(src_pt) if loaded is None else loaded
    if not isinstance(ckpt, Mapping) or not ({"model", "ema"} & set(ckpt)):
        raise porting.PortingError(f"{src_pt} is not a class-conditional BitDance training "
                                   "checkpoint ({'model', 'ema'} dict)")
    which = "ema" if use_ema else "model"
    if which not in ckpt:
        raise porting.PortingError(f"{src_pt} has no {which!r} weights (try "
                                   f"{'--no-ema' if use_ema else 'the EMA weights'})")
    sd = porting.tensors_to_numpy(ckpt[which])
    overrides = {**settings_from_args(ckpt.get("args")), **overrides}
    expected = _as_config(config)
    if expected is not None:
        diff = {k: (getattr(expected, k), v) for k, v in weight_fields(sd).items()
                if getattr(expected, k) != v}
        if diff:
            raise porting.PortingError(f"{src_pt} holds another architecture than the config "
                                       f"says ((config, checkpoint) per field): {diff}")
        overrides = {**{k: getattr(expected, k) for k in SCHEDULE_KEYS + ("n_head",)}, **overrides}
    cfg = infer_config(sd, **overrides)
    params = port_model_state_dict(sd, cfg)

    if tokenizer_pt is not None:
        tok = porting.load_torch_file(tokenizer_pt)
        tok_sd = porting.tensors_to_numpy(tok.get("state_dict", tok) if isinstance(tok, Mapping) else {})
        tok_prefix, what = "", f"tokenizer {tokenizer_pt}"
    elif any(k.startswith(VAE_PREFIX) for k in sd):
        tok_sd, tok_prefix, what = sd, VAE_PREFIX, f"vae.* weights of {src_pt}"
    else:
        raise porting.PortingError(f"{src_pt} has no vae.* weights: pass tokenizer_pt "
                                   "(e.g. ae_d16c32.pt)")
    tok_cfg = infer_tokenizer_config(tok_sd, tok_prefix, num_codebooks=TOKENIZER_NUM_CODEBOOKS)
    if tok_cfg.z_channels != cfg.latent_dim:
        raise porting.PortingError(f"{what}: {tok_cfg.z_channels} latent channels, the model "
                                   f"uses {cfg.latent_dim}")
    params["tokenizer"] = port_tokenizer_state_dict(tok_sd, tok_cfg, prefix=tok_prefix, what=what)
    if quant.check_mode(quantize) is not None:
        params = c2i_io.quantize_params(params, cfg, tok_cfg, quantize)
    return c2i_io.save_model(dst, cfg, params, tok_cfg, overwrite=overwrite, source=str(src_pt),
                             weights=which, quantize=quantize)
