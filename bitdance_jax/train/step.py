"""The jitted training step: loss and gradients, the optimizer update, EMA, and the guard that freezes the state at the first non-finite step."""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from bitdance_jax.train.optimizer import AdamWRecipe

LossFn = Callable[..., tuple[Any, dict]]  # (params, frozen, batch, rng, step) -> (loss, terms)


def train_step(state: dict, frozen, batch: dict, *, loss_fn: LossFn,
               recipe: AdamWRecipe, ema_decay: float) -> tuple[dict, dict]:
    """(state, frozen, batch) -> (state, metrics). A non-finite loss or gradient norm keeps
    the old params, EMA and optimizer state and clears ``ok`` for good, so the host can save
    the last good state (the host reads ``ok`` one step late; the device never waits)."""
    rng = jax.random.fold_in(state["rng"], state["step"])
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], frozen, batch, rng, state["step"])
    grad_norm = optax.tree.norm(grads)
    ok = state["ok"] & jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, ema, opt_state = recipe.fused_update(grads, grad_norm, ok, state["params"],
                                                 state["ema"], state["opt_state"], ema_decay)
    new_state = {"step": state["step"] + ok.astype(jnp.int32), "rng": state["rng"], "ok": ok,
                 "params": params, "ema": ema, "opt_state": opt_state}
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": recipe.schedule(state["step"]), **aux}
    return new_state, jax.tree.map(lambda m: m.astype(jnp.float32), metrics)


def jit_train_step(*, loss_fn: LossFn, recipe: AdamWRecipe, ema_decay: float, state_shardings,
                   frozen_shardings, batch_shardings, metrics_sharding):
    """``train_step`` jitted with explicit in/out shardings and the state donated."""
    return jax.jit(
        functools.partial(train_step, loss_fn=loss_fn, recipe=recipe, ema_decay=ema_decay),
        in_shardings=(state_shardings, frozen_shardings, batch_shardings),
        out_shardings=(state_shardings, metrics_sharding), donate_argnums=(0,))
