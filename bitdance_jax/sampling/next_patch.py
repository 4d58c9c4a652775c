"""The one next-patch sampling loop of every BitDance family.

An AR step draws the P binary tokens of one patch: the backbone's hidden states of the step
condition the diffusion head, whose Euler-Maruyama sample gives the tokens by its sign; the
tokens are fed back into the KV cache (``nn.kv_cache``), which yields the next step's
conditioning. Step 0 comes from a prefill (class and query slots, or the prompt and query
block). A family supplies three functions and the loop does the rest:

* ``prefill() -> (cond [rows, P, D], cache)``
* ``feed(cache, bits [rows, P, C], step) -> (cond, cache)``: the previous step's tokens in,
  the conditioning of AR step ``step`` out;
* ``draw(cond, step) -> pred [rows, P, C]``: the head's sample before the sign, with that
  step's guidance and noise (``step`` is the Python int 0 at step 0, traced afterwards, so a
  family may sample its first step differently).

Guidance is decided once by the caller (a static ``guided``) and only its value is traced;
noise is drawn inside the program from keys of (seed, sample index), so a sample never
depends on the batch it shares (``KeyedNoise``), or replayed from recorded draws in tests
(``RecordedNoise``). Progress goes through ``ProgressHook``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class LoopState:
    """The carry of the AR loop (a pytree): what the next step needs and what was drawn."""
    cond: jax.Array            # head conditioning of the step drawn next [rows, P, D]
    cache: Any                 # the backbone's KV cache
    bits: jax.Array            # tokens of the last drawn step [rows, P, C]
    tokens: jax.Array          # every step's tokens [steps, keep_rows, P, C]
    conds: jax.Array | None    # with ``record``: every step's conditioning [steps, rows, P, D]
    preds: jax.Array | None    # with ``record``: the head's samples before the sign


def sample_steps(num_steps: int, prefill: Callable, feed: Callable, draw: Callable, *,
                 keep_rows: int, record: bool = False, on_step: Callable | None = None):
    """Run ``num_steps`` AR steps; returns (tokens [keep_rows, num_steps * P, C] in step
    order, (conds, preds) or None). ``keep_rows``: the leading rows returned (the
    conditional ones when guidance doubled the batch). ``on_step(step)``, a host callback,
    is called after each step (``ProgressHook``)."""
    def advance(state: LoopState, step, cond, cache, pred) -> LoopState:
        """The state after AR step ``step`` drew ``pred`` from ``cond``."""
        bits = jnp.sign(pred)
        state = state.replace(cond=cond, cache=cache, bits=bits,
                              tokens=state.tokens.at[step].set(bits[:keep_rows]))
        if record:
            state = state.replace(conds=state.conds.at[step].set(cond),
                                  preds=state.preds.at[step].set(pred))
        if on_step is not None:
            jax.debug.callback(on_step, step)
        return state

    def body(step, state: LoopState) -> LoopState:
        cond, cache = feed(state.cache, state.bits, step)
        return advance(state, step, cond, cache, draw(cond, step))

    cond, cache = prefill()
    pred = draw(cond, 0)
    _, p, c = pred.shape
    steps_of = lambda a, dtype: jnp.zeros((num_steps,) + a.shape, dtype) if record else None
    empty = LoopState(cond=cond, cache=cache, bits=jnp.sign(pred),
                      tokens=jnp.zeros((num_steps, keep_rows, p, c), jnp.float32),
                      conds=steps_of(cond, cond.dtype), preds=steps_of(pred, jnp.float32))
    state = advance(empty, 0, cond, cache, pred)
    state = jax.lax.fori_loop(1, num_steps, body, state)
    out = jnp.moveaxis(state.tokens, 0, 1).reshape(keep_rows, num_steps * p, c)
    return out, ((state.conds, state.preds) if record else None)


# ----------------------------------------------------------------------------- noise

@flax.struct.dataclass
class KeyedNoise:
    """Draws of sample ``g``: ``fold_in(fold_in(key(seed), stream), g)``, then
    ``fold_in(., step)`` per AR step. Stream 0 serves the conditional rows; a family that
    needs separate draws for its unconditional rows uses stream 1."""
    seed: jax.Array             # int32 []
    sample_indices: jax.Array   # int32 [B]

    def rows(self, step, shape: tuple[int, ...], stream: int = 0) -> jax.Array:
        """[B, *shape] N(0, 1) draws of AR step ``step``."""
        root = jax.random.fold_in(jax.random.key(self.seed), stream)
        return jax.vmap(lambda g: jax.random.normal(
            jax.random.fold_in(jax.random.fold_in(root, g), step), shape))(self.sample_indices)


@flax.struct.dataclass
class RecordedNoise:
    """Draws given up front: ``draws[step]`` [head_steps + 1, B, P, C] (the reference's
    recorded noise in the golden tests)."""
    draws: jax.Array

    def step_draws(self, step) -> jax.Array:
        return self.draws[step]


def head_draws(noise: KeyedNoise | RecordedNoise, step, head_steps: int, p: int, c: int,
               stream: int = 0) -> jax.Array:
    """The head's draws [head_steps + 1, B, P, C] of AR step ``step``."""
    if isinstance(noise, RecordedNoise):
        return noise.step_draws(step)
    return jnp.moveaxis(noise.rows(step, (head_steps + 1, p, c), stream), 0, 1)


# ----------------------------------------------------------------------------- progress

class ProgressHook:
    """Where a running loop reports its steps. A compiled program calls the hook (a host
    callback, fixed when it is compiled); ``with hook.reporting(fn):`` routes those calls to
    ``fn(step)`` for one run, so one program serves any listener (a tqdm bar, a web page)."""

    def __init__(self):
        self._listeners: list[Callable[[int], None]] = []

    def __call__(self, step) -> None:
        if self._listeners:
            self._listeners[-1](int(step))

    @contextlib.contextmanager
    def reporting(self, fn: Callable[[int], None]):
        self._listeners.append(fn)
        try:
            yield
        finally:
            jax.effects_barrier()   # every callback of the run has arrived
            self._listeners.remove(fn)
