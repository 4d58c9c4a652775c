"""Optimizer of the BitDance recipe: AdamW with a masked weight decay, a warmup-constant-cosine
learning rate, global-norm clipping, and an exponential moving average of the params.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import optax

# Params whose path contains one of these names get no weight decay (the input projection,
# the class embedding and the query tokens), besides every 1-D param (norms, biases).
DEFAULT_NO_DECAY_NAMES = ("proj_in", "cls_embedding", "query_token")
# A path segment with exactly this name holds params stacked on a leading layer axis
# (``nn.scan``): that axis does not count towards the 1-D rule.
STACKED_LAYERS_NAME = "layers"


def lr_schedule(base_lr: float, *, warmup_steps: int, decay_start: int, total_steps: int,
                min_lr: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0, constant, then cosine from ``decay_start`` to ``min_lr`` at the end.

    ``decay_start <= 0`` (or past the end) keeps the rate constant after warmup.
    """
    warmup_steps, decay_start, total_steps = int(warmup_steps), int(decay_start), int(total_steps)
    decays = 0 < decay_start < total_steps

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        warm = base_lr * step / max(warmup_steps, 1)
        if decays:
            frac = (step - decay_start) / max(total_steps - decay_start, 1)
            cosine = min_lr + (base_lr - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * jnp.clip(frac, 0.0, 1.0)))
            after = jnp.where(step >= decay_start, cosine, base_lr)
        else:
            after = jnp.asarray(base_lr, jnp.float32)
        return jnp.where(step < warmup_steps, warm, after) if warmup_steps > 0 else after

    return schedule


def path_names(path) -> list[str]:
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
    return names


def weight_decay_mask(params, no_decay_names: Sequence[str] = DEFAULT_NO_DECAY_NAMES):
    """True where a param is decayed: >= 2-D (per layer, for stacked layers) and no path
    segment names a no-decay module."""
    def decays(path, leaf):
        names = path_names(path)
        if jnp.ndim(leaf) - (STACKED_LAYERS_NAME in names) < 2:
            return False
        return not any(bad in name for name in names for bad in no_decay_names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(*, schedule: optax.Schedule, b1: float = 0.9, b2: float = 0.95,
                   eps: float = 1e-8, weight_decay: float = 0.05, clip_norm: float = 1.0,
                   no_decay_names: Sequence[str] = DEFAULT_NO_DECAY_NAMES
                   ) -> optax.GradientTransformation:
    """Clip by global norm (``clip_norm <= 0`` disables), then decoupled-decay AdamW."""
    mask = lambda params: weight_decay_mask(params, no_decay_names)
    adamw = optax.adamw(learning_rate=schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mask=mask)
    if clip_norm and clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
    return adamw


def ema_update(ema, params, decay: float):
    """ema <- decay * ema + (1 - decay) * params, computed in float32."""
    return jax.tree.map(
        lambda e, p: (decay * e.astype(jnp.float32)
                      + (1.0 - decay) * p.astype(jnp.float32)).astype(e.dtype), ema, params)


def opt_state_shardings(abstract_opt_state, param_shardings, replicated):
    """Each optimizer leaf shaped like a param (mu, nu ...) takes that param's sharding; the
    rest (counts, scalars) is ``replicated``."""
    by_path = {tuple(path_names(p)): s
               for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}

    def pick(path, leaf):
        names = tuple(path_names(path))
        for k in range(len(names)):
            s = by_path.get(names[k:])
            if s is not None and len(s.spec) <= len(leaf.shape):
                return s
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)
