"""Optimizer of the BitDance recipe: AdamW with a masked weight decay, a warmup-constant-cosine
learning rate, global-norm clipping, and an exponential moving average of the params.
"""
from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class AdamWRecipe:
    """Hyperparameters of the recipe: clip by global norm (``clip_norm <= 0`` disables), then
    decoupled-decay AdamW with the decay masked by ``weight_decay_mask``.

    ``transformation()`` is the optax chain (its state is what the trainer builds, shards and
    checkpoints); ``fused_update`` does the same arithmetic on that same state in one
    elementwise pass per leaf, since on a ~260M-param model the chain's separate passes over
    params, moments and EMA cost more memory traffic than the arithmetic."""
    schedule: optax.Schedule
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.05
    clip_norm: float = 1.0
    no_decay_names: Sequence[str] = DEFAULT_NO_DECAY_NAMES

    @property
    def clips(self) -> bool:
        return bool(self.clip_norm and self.clip_norm > 0)

    def transformation(self) -> optax.GradientTransformation:
        adamw = optax.adamw(learning_rate=self.schedule, b1=self.b1, b2=self.b2, eps=self.eps,
                            weight_decay=self.weight_decay,
                            mask=lambda params: weight_decay_mask(params, self.no_decay_names))
        if self.clips:
            return optax.chain(optax.clip_by_global_norm(self.clip_norm), adamw)
        return adamw

    def fused_update(self, grads, grad_norm, ok, params, ema, opt_state, ema_decay: float):
        """(params, ema, opt_state) after one step, or the old ones where ``ok`` is False.

        ``grad_norm``: ``optax.tree.norm(grads)``, computed once by the caller. Follows the
        chain's order of operations (clip, moments, bias corrections, ``mu_hat / (sqrt(nu_hat)
        + eps)``, ``+ wd * param``, ``* -lr``, add) so that it matches it to float32 rounding."""
        adam, decay_state, schedule_state = opt_state[1] if self.clips else opt_state
        count = optax.safe_increment(adam.count)
        # The chain's bias corrections and step size, as scalars (optax computes them so too).
        mu_correction = 1 - self.b1 ** count
        nu_correction = 1 - self.b2 ** count
        step_size = -1 * self.schedule(schedule_state.count)
        mask = weight_decay_mask(params, self.no_decay_names)

        keep = lambda new, old: jnp.where(ok, new.astype(old.dtype), old)

        def clip(g):
            if not self.clips:
                return g
            return jax.lax.select(grad_norm < self.clip_norm, g,
                                  (g / grad_norm.astype(g.dtype)) * self.clip_norm)

        def leaf(g, p, m, v, e, decays):
            # XLA:CPU fuses single-output loops only, so each new leaf is its own loop. The
            # barrier keeps the mu and nu loops from sharing a materialised clipped gradient
            # (an extra write and read of the leaf): each clips inline.
            m = keep((1 - self.b1) * (clip(g) ** 1) + self.b1 * m, m)
            v = keep((1 - self.b2) * (clip(jax.lax.optimization_barrier(g)) ** 2) + self.b2 * v, v)
            u = (m / mu_correction.astype(m.dtype)) / (
                jnp.sqrt(v / nu_correction.astype(v.dtype)) + self.eps)
            if decays and self.weight_decay != 0.0:
                u = u + self.weight_decay * p
            p = keep((p + jnp.array(step_size, u.dtype) * u).astype(p.dtype), p)
            e = keep((ema_decay * e.astype(jnp.float32)
                      + (1.0 - ema_decay) * p.astype(jnp.float32)).astype(e.dtype), e)
            return p, m, v, e

        out = jax.tree.map(leaf, grads, params, adam.mu, adam.nu, ema, mask)
        pick = lambda i: jax.tree.map(lambda _, o: o[i], params, out)
        adam = adam._replace(count=jnp.where(ok, count, adam.count), mu=pick(1), nu=pick(2))
        schedule_state = schedule_state._replace(
            count=jnp.where(ok, optax.safe_increment(schedule_state.count), schedule_state.count))
        adamw_state = (adam, decay_state, schedule_state)
        opt_state = (opt_state[0], adamw_state) if self.clips else adamw_state
        return pick(0), pick(3), opt_state


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
