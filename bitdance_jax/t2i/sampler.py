"""The jitted text-to-image sampler: prompt prefill, then per image step the head's SDE and
the fed-back block, through the shared next-patch loop (``sampling.next_patch``)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bitdance_jax.nn.flow import euler_maruyama
from bitdance_jax.sampling import next_patch
from bitdance_jax.t2i import qwen3


def prompt_bucket(length: int) -> int:
    """Prompt slots are padded to a multiple of 64 so one compilation serves many prompts."""
    return max(64, -(-length // 64) * 64)


@functools.lru_cache(maxsize=16)   # bounded: each entry holds compiled programs
def sampler(llm, head, projector, time_shift: float, num_sampling_steps: int, guided: bool,
            trace: bool, progress: next_patch.ProgressHook | None):
    """One jitted sampling loop per (modules, step counts, guided or not, trace, progress
    hook); shapes (prompt bucket, grid, batch) and the noise's kind (keyed or recorded)
    specialise it further through ``jit``'s own cache.

    ``run(params, ids, lengths, block_ids, pos, noise, guidance_scale)``: ``noise`` a
    ``KeyedNoise`` over the B conditional rows or a ``RecordedNoise`` of draws
    [image_steps, head_steps + 1, B, P, z]; with guidance the unconditional rows reuse them.
    """

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
            return out.last_hidden_state, out.kv_cache

        def embed(x):
            return llm.apply({"params": params["llm"]}, x, method="embed")

        def prefill():
            cache = qwen3.init_kv_cache(llm.config, n, cache_len, dtype=llm.dtype)
            prompt_mask = valid[:, None, :] & (slots[None, None, :] <= jnp.arange(bucket)[None, :, None])
            cache = llm_call(cache, embed(ids), 0, jnp.broadcast_to(jnp.arange(bucket), (n, bucket)),
                             prompt_mask).kv_cache
            queries = jnp.broadcast_to(embed(block_ids)[None], (n, p_num, pos.shape[-1]))
            hidden, cache = block_call(cache, queries, 0)
            return hidden + pos[0][None], cache

        def feed(cache, bits, step):
            fed = projector.apply({"params": params["projector"]}, bits) + pos[step - 1][None]
            hidden, cache = block_call(cache, fed, step)
            return hidden + pos[step][None], cache

        def draw(cond, step):
            draws = next_patch.head_draws(noise, step, num_sampling_steps, p_num,
                                          head.config.ch_target)
            if guided:
                draws = jnp.concatenate([draws, draws], axis=1)
            net = lambda x, t, c: head.apply({"params": params["head"]}, x, t, c)
            return euler_maruyama(net, cond, draws, num_steps=num_sampling_steps, guided=guided,
                                  cfg_scale=guidance_scale, time_shift=time_shift)

        tokens, recorded = next_patch.sample_steps(image_steps, prefill, feed, draw,
                                                   keep_rows=batch, record=trace,
                                                   on_step=progress)
        return (tokens,) + (recorded if trace else (None, None))

    return run
