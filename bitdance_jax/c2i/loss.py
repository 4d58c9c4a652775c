"""The class-conditional training loss: bit-flip and label-drop perturbations, then the head's flow-matching loss on every predicted token."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from bitdance_jax.c2i.config import BitDanceConfig
from bitdance_jax.c2i.model import BitDanceBackbone, head_apply
from bitdance_jax.nn import flow, patching
from bitdance_jax.nn.precision import PrecisionLike

Dtype = Any


def flip_bits(rng, tokens, rate):
    """Training perturbation of the input latents: each sign flips where u1 < rate * u2
    (u1, u2 uniform), i.e. with a per-element probability uniform in [0, rate]."""
    k1, k2 = jax.random.split(rng)
    u1 = jax.random.uniform(k1, tokens.shape)
    u2 = jax.random.uniform(k2, tokens.shape)
    return jnp.where(u1 < rate * u2, -tokens, tokens)


def _is_zero(rate) -> bool:
    """A rate known (untraced) to be zero: skip the random draws."""
    return isinstance(rate, (int, float)) and rate == 0


def bitdance_loss(params, latents, class_ids, rng=None, *, config: BitDanceConfig,
                  t_raw=None, noise=None, bit_flip_rate: float = 0.0, label_drop: float = 0.1,
                  dtype: Dtype = jnp.float32, precision: PrecisionLike = None,
                  attention_impl: str = "auto"):
    """Flow-matching loss of a class-conditional BitDance model (scalar).

    ``latents`` [B, h, w, C] in {-1, +1} (NHWC grid), ``class_ids`` [B]. With ``rng`` the
    input latents get bit flips (``bit_flip_rate``) and labels are dropped to the null class
    with probability ``label_drop``; ``t_raw`` [B*h*w/P*diff_batch_mul] and ``noise`` (the
    tiled target's shape) default to draws from ``rng``. Without ``rng`` (evaluation) there
    is no perturbation and ``t_raw``/``noise`` must be given. The rates may be traced
    (e.g. a schedule). ``dtype``/``precision``: the numerics policy (``nn.precision``); the
    loss itself is float32 either way.
    """
    cfg = config
    if latents.ndim != 4 or latents.shape[1:] != (cfg.grid_size, cfg.grid_size, cfg.latent_dim):
        raise ValueError(f"latents must be [B, {cfg.grid_size}, {cfg.grid_size}, {cfg.latent_dim}] "
                         f"(NHWC), got {latents.shape}")
    if rng is None and (t_raw is None or noise is None):
        raise ValueError("without rng, pass the draws t_raw and noise explicitly")
    target = patching.patchify(latents.astype(jnp.float32), cfg.token_patch)
    inputs = target
    if rng is not None:
        k_flip, k_drop, k_t, k_noise = jax.random.split(rng, 4)
        if not _is_zero(bit_flip_rate):
            inputs = flip_bits(k_flip, inputs, bit_flip_rate)
        if not _is_zero(label_drop):
            drop = jax.random.uniform(k_drop, class_ids.shape) < label_drop
            class_ids = jnp.where(drop, cfg.num_classes, class_ids)
    numerics = dict(precision=precision, attention_impl=attention_impl)
    backbone = BitDanceBackbone(cfg, dtype=dtype, param_dtype=jnp.float32, **numerics)
    hidden = backbone.apply({"params": params["model"]}, inputs, class_ids)
    cond = hidden.reshape(-1, cfg.parallel_num, cfg.dim)
    target = target.reshape(-1, cfg.parallel_num, cfg.latent_dim)
    cond = jnp.tile(cond, (cfg.diff_batch_mul, 1, 1))
    target = jnp.tile(target, (cfg.diff_batch_mul, 1, 1))
    if t_raw is None:
        t_raw = jax.random.normal(k_t, target.shape[:1], jnp.float32)
    if noise is None:
        noise = jax.random.normal(k_noise, target.shape, jnp.float32)
    noise = jnp.asarray(noise).reshape(target.shape)
    return flow.flow_matching_loss(head_apply(cfg, params["head"], dtype, **numerics), target, cond,
                                   jnp.asarray(t_raw), noise, P_mean=cfg.P_mean, P_std=cfg.P_std,
                                   time_shift=cfg.time_shift)
