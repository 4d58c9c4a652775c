"""Flow-matching math of the BitDance heads: time schedule, x-prediction loss, SDE sampler.

Interpolant z_t = (1 - t) e + t x (t = 1 is data). The net predicts x; velocities are
(x_pred - z) / max(1 - t, 0.05). All random draws are arguments, so the recorded draws of the
reference can be replayed and callers choose their own PRNG handling.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

NetFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
MIN_ONE_MINUS_T = 0.05
LAST_T = 0.95


def shift_time(t, shift: float):
    """SANA time shift s: t -> (1/s) / (1/s + 1/t - 1), float32; maps 0 to 0 (1/0 = inf).

    Works on numpy and jax arrays alike (operators only).
    """
    inv = np.float32(1.0 / shift)
    return inv / (inv + (1 / t - 1))


def sample_t(t_raw: jax.Array, P_mean: float, P_std: float, time_shift: float) -> jax.Array:
    """Logit-normal training times sigmoid(t_raw * P_std + P_mean), shifted if time_shift != 1
    (the sampler's grid is always shifted, even by 1, as in the reference)."""
    t = jax.nn.sigmoid(t_raw.astype(jnp.float32) * jnp.float32(P_std) + jnp.float32(P_mean))
    if time_shift != 1.0:
        t = shift_time(t, time_shift)
    return t


def _per_row(t: jax.Array, like: jax.Array) -> jax.Array:
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


def _velocity(x_pred, z, t_rows):
    return (x_pred - z) / jnp.maximum(1 - t_rows, jnp.float32(MIN_ONE_MINUS_T))


def flow_matching_loss(net_fn: NetFn, target: jax.Array, cond: jax.Array, t_raw: jax.Array,
                       noise: jax.Array, *, P_mean: float, P_std: float, time_shift: float,
                       reduce: str = "mean") -> jax.Array:
    """Velocity MSE of the x-predicting ``net_fn(z, t, cond)``.

    ``t_raw`` [B] and ``noise`` (shape of ``target``) are the N(0, 1) draws.
    ``reduce='mean'``: scalar mean (ImageNet heads); ``'channels'``: mean over the last axis
    only, e.g. [B, P] (text-to-image head).
    """
    if reduce not in ("mean", "channels"):
        raise ValueError(f"reduce must be 'mean' or 'channels', got {reduce!r}")
    if noise.shape != target.shape or t_raw.shape != target.shape[:1]:
        raise ValueError(f"noise must match target {target.shape} and t_raw be "
                         f"[{target.shape[0]}]; got noise {noise.shape}, t_raw {t_raw.shape}")
    x = target.astype(jnp.float32)
    t = sample_t(t_raw, P_mean, P_std, time_shift)
    t_rows = _per_row(t, x)
    z = (1 - t_rows) * noise.astype(jnp.float32) + t_rows * x
    v = jax.lax.stop_gradient(_velocity(x, z, t_rows))
    z = jax.lax.stop_gradient(z)
    v_pred = _velocity(net_fn(z, t, cond), z, t_rows).astype(jnp.float32)
    sq = (v - v_pred) ** 2
    return jnp.mean(sq) if reduce == "mean" else jnp.mean(sq, axis=-1)


def sampling_times(num_steps: int, shift: float, last_step_size: float = MIN_ONE_MINUS_T):
    """(t per SDE step, dt per SDE step, t of the final Euler step), float32 numpy.

    Grid = shift(linspace(0, 1 - last_step_size, steps + 1)) with torch's float32 linspace
    arithmetic; the step times are the float32 running sum of the grid differences.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    end = np.float32(1 - last_step_size)
    idx = np.arange(num_steps + 1)
    step = np.float32(end / np.float32(num_steps))
    halfway = (num_steps + 1) // 2
    grid = np.where(idx < halfway, step * idx.astype(np.float32),
                    end - step * (num_steps - idx).astype(np.float32)).astype(np.float32)
    with np.errstate(divide="ignore"):
        grid = shift_time(grid, shift).astype(np.float32)
    dt = (grid[1:] - grid[:-1]).astype(np.float32)
    t = np.float32(0.0)
    step_times = []
    for d in dt:
        step_times.append(t)
        t = np.float32(t + d)
    return np.asarray(step_times, np.float32), dt, np.float32(1 - last_step_size)


def euler_maruyama(net_fn: NetFn, cond: jax.Array, noise: jax.Array, *, num_steps: int,
                   guided: bool, cfg_scale=1.0, time_shift: float,
                   last_step_size: float = MIN_ONE_MINUS_T, return_trajectory: bool = False):
    """SDE sampler of the heads: ``num_steps`` Euler-Maruyama steps then one Euler step.

    ``guided`` (static: the caller decides once) makes rows [:N/2] of ``cond`` conditional
    and [N/2:] unconditional: the state is one [N/2] batch shown to the net twice and
    v = v_u + cfg (v_c - v_u), ``cfg_scale`` may be traced. Unguided, all N rows evolve
    independently and ``cfg_scale`` is unused. ``noise`` [num_steps + 1, N, ...]: draw 0 is
    the initial state, draw k the noise of step k; when guided only rows [:N/2] are used.
    Returns the [N, ...] sample (guided: both halves equal) and, with ``return_trajectory``,
    the state after every step [num_steps + 1, N, ...].
    """
    n = cond.shape[0]
    if noise.shape[:2] != (num_steps + 1, n):
        raise ValueError(f"noise must be [num_steps + 1 = {num_steps + 1}, N = {n}, ...], "
                         f"got {noise.shape}")
    if guided and n % 2:
        raise ValueError(f"classifier-free guidance needs an even number of rows, got {n}")
    step_t, step_dt, last_t = sampling_times(num_steps, time_shift, last_step_size)
    cfg = jnp.asarray(cfg_scale, jnp.float32)
    half = n // 2

    def mirror(a):
        """Guided: the first half twice (the state rows the net sees); else unchanged."""
        return jnp.concatenate([a[:half], a[:half]], axis=0) if guided else a

    def velocity(x, t):
        t_rows = jnp.full((n,), t, jnp.float32)
        v = _velocity(net_fn(x, t_rows, cond), x, _per_row(t_rows, x)).astype(jnp.float32)
        if not guided:
            return v
        v_c, v_u = v[:half], v[half:]
        v_g = v_u + cfg * (v_c - v_u)
        return jnp.concatenate([v_g, v_g], axis=0)

    noise = jnp.asarray(noise, jnp.float32)
    step_t, step_dt = jnp.asarray(step_t), jnp.asarray(step_dt)

    def sde_step(i, x):
        t, dt = step_t[i], step_dt[i]
        v = velocity(x, t)
        score = (t * v - x) / ((1 - t) ** 2 + t * (1 - t))
        drift = v + (1 - t) * score
        return x + drift * dt + jnp.sqrt(2 * (1 - t) * dt) * mirror(noise[i + 1])

    def final_step(x):
        return x + velocity(x, jnp.float32(last_t)) * jnp.float32(last_step_size)

    x0 = mirror(noise[0])
    if not return_trajectory:  # no trajectory buffer in the sampling hot path
        return final_step(jax.lax.fori_loop(0, num_steps, sde_step, x0))

    def recorded_step(i, carry):
        x, traj = carry
        x = sde_step(i, x)
        return x, traj.at[i].set(x)

    traj = jnp.zeros((num_steps + 1,) + x0.shape, jnp.float32)
    x, traj = jax.lax.fori_loop(0, num_steps, recorded_step, (x0, traj))
    x = final_step(x)
    return x, traj.at[num_steps].set(x)
