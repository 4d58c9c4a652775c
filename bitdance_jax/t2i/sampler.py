"""The jitted text-to-image sampling loop: prompt prefill, then per image step the head's SDE and the fed-back block, under one ``lax.scan``."""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from bitdance_jax.nn.flow import euler_maruyama
from bitdance_jax.t2i import qwen3

NoiseSource = Callable[[tuple[int, ...]], Any]


def seeded_noise(seed: int) -> NoiseSource:
    """N(0, 1) draws from ``jax.random.key(seed)``."""
    return lambda shape: jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def prompt_bucket(length: int) -> int:
    """Prompt slots are padded to a multiple of 64 so one compilation serves many prompts."""
    return max(64, -(-length // 64) * 64)


PROGRESS_BARS: list = []  # the bar the running sample_latents call advances (innermost last)


def _advance_progress(_step):
    if PROGRESS_BARS:
        PROGRESS_BARS[-1].update(1)


@functools.lru_cache(maxsize=None)
def sampler(llm, head, projector, time_shift: float, num_sampling_steps: int, guided: bool,
             trace: bool, progress: bool):
    """One jitted sampling loop per (modules, step counts, guidance on/off); shapes (prompt
    bucket, grid, batch) specialise it further through ``jit``'s own cache."""

    @jax.jit
    def run(params, ids, lengths, block_ids, pos, noise, guidance_scale):
        n, bucket = ids.shape
        image_steps, p_num, _ = pos.shape
        batch = n // 2 if guided else n
        cache_len = bucket + p_num * image_steps  # queries block + all fed-back blocks but the last
        slots = jnp.arange(cache_len)
        valid = (slots[None] < lengths[:, None]) | (slots[None] >= bucket)  # [N, S]

        def llm_call(cache, embeds, start, positions, mask):
            return llm.apply({"params": params["llm"]}, inputs_embeds=embeds, positions=positions,
                             attention_mask=mask, kv_cache=cache, cache_index=start,
                             method="trunk")

        def block_call(cache, embeds, block):
            """Block ``block`` (0 = the query tokens) sees all valid slots up to its end."""
            start = bucket + block * p_num
            mask = valid & (slots[None] < start + p_num)
            mask = jnp.broadcast_to(mask[:, None], (n, p_num, cache_len))
            positions = lengths[:, None] + block * p_num + jnp.arange(p_num)[None]
            out = llm_call(cache, embeds, start, positions, mask)
            return out.kv_cache, out.last_hidden_state

        def embed(x):
            return llm.apply({"params": params["llm"]}, x, method="embed")

        cache = qwen3.init_kv_cache(llm.config, n, cache_len, dtype=llm.dtype)
        prompt_mask = (valid[:, None, :] & (slots[None, None, :] <= jnp.arange(bucket)[None, :, None]))
        cache = llm_call(cache, embed(ids), 0, jnp.broadcast_to(jnp.arange(bucket), (n, bucket)),
                         prompt_mask).kv_cache
        cache, hidden = block_call(cache, jnp.broadcast_to(embed(block_ids)[None], (n, p_num, pos.shape[-1])), 0)

        def head_step(hidden, step):
            cond = hidden + pos[step][None]
            draws = noise[step]
            if guided:
                draws = jnp.concatenate([draws, draws], axis=1)
            net = lambda x, t, c: head.apply({"params": params["head"]}, x, t, c)
            pred = euler_maruyama(net, cond, draws, num_steps=draws.shape[0] - 1,
                                  cfg_scale=guidance_scale if guided else 1.0,
                                  time_shift=time_shift)
            return cond, pred

        def body(carry, step):
            cache, hidden = carry
            cond, pred = head_step(hidden, step)
            bits = jnp.sign(pred)
            fed = projector.apply({"params": params["projector"]}, bits) + pos[step][None]
            cache, hidden = block_call(cache, fed.astype(hidden.dtype), step + 1)
            if progress:
                jax.debug.callback(_advance_progress, step)
            return (cache, hidden), (bits[:batch], cond if trace else None, pred if trace else None)

        (cache, hidden), (bits, conds, preds) = jax.lax.scan(
            body, (cache, hidden), jnp.arange(image_steps - 1))
        last_cond, last_pred = head_step(hidden, image_steps - 1)
        if progress:
            jax.debug.callback(_advance_progress, image_steps - 1)
        bits = jnp.concatenate([bits, jnp.sign(last_pred)[None, :batch]], axis=0)
        tokens = bits.transpose(1, 0, 2, 3).reshape(batch, image_steps * p_num, -1)
        if not trace:
            return tokens, None, None
        return (tokens, jnp.concatenate([conds, last_cond[None]]),
                jnp.concatenate([preds, last_pred[None]]))

    return run
