"""The one KV-cache layout of every autoregressive backbone (class-conditional and Qwen3).

``{"k": [layers, B, S, heads, head_dim], "v": same}``: one stacked buffer per side, so a
sampling loop carries two arrays whatever the depth, and a step writes only its new entries.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

KVCache = dict


def init_kv_cache(num_layers: int, batch: int, length: int, num_heads: int, head_dim: int,
                  dtype=jnp.float32) -> KVCache:
    shape = (num_layers, batch, length, num_heads, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def layer_view(cache: KVCache, layer: int):
    """Layer ``layer``'s (k, v) [B, S, heads, head_dim], as its attention takes them."""
    return cache["k"][layer], cache["v"][layer]


def view_with(layer_cache, k_new, v_new, start):
    """One layer's cached (k, v) [B, S, heads, head_dim] with the new entries at slot
    ``start``: what that layer's attention reads."""
    k_cache, v_cache = layer_cache
    k = jax.lax.dynamic_update_slice_in_dim(k_cache, k_new.astype(k_cache.dtype), start, axis=1)
    v = jax.lax.dynamic_update_slice_in_dim(v_cache, v_new.astype(v_cache.dtype), start, axis=1)
    return k, v


def write(cache: KVCache, layer: int, k_new, v_new, start) -> KVCache:
    """The cache with layer ``layer``'s new entries [B, L, heads, head_dim] at slot ``start``."""
    at = (layer, 0, start, 0, 0)
    return {"k": jax.lax.dynamic_update_slice(cache["k"], k_new[None].astype(cache["k"].dtype), at),
            "v": jax.lax.dynamic_update_slice(cache["v"], v_new[None].astype(cache["v"].dtype), at)}
