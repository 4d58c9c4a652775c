"""Qwen3 decoder-only language model (the T2I backbone) in functional Flax.

Same math as Hugging Face's ``Qwen3ForCausalLM``: RMSNorm pre-norm blocks, grouped-query
attention with a per-head RMSNorm on queries and keys before rotate-half RoPE, SiLU-gated
MLP, separate (untied) LM head. Submodule names mirror the HF state_dict through the
porting convention (``model/layers_0/self_attn/q_proj`` <-> ``model.layers.0.self_attn.q_proj``).

Attention always takes an explicit boolean mask ``[B, Lq, Lk]`` (True = attend), so the
same code serves the causal prompt pass and the block-bidirectional image steps. The KV
cache is a preallocated pytree passed in and returned (static shapes under ``jit``).

Numerics: ``dtype`` is the matmul input dtype (bfloat16 = the bf16-mixed policy of
``nn.precision``): the residual stream, norms and attention softmax stay float32.
Initialisation is Hugging Face's (Linear and embeddings N(0, 0.02), zero biases, norms 1).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from bitdance_jax.nn import kv_cache as kv_cache_lib
from bitdance_jax.nn.attention import attention
from bitdance_jax.nn.layers import RMSNorm, dense, embed as embedding_layer
from bitdance_jax.nn.precision import PrecisionLike

Dtype = Any
KVCache = kv_cache_lib.KVCache  # {"k": [layers, B, S, kv_heads, head_dim], "v": same}


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")

    @classmethod
    def from_hf_dict(cls, d: dict) -> "Qwen3Config":
        """From a HF ``config.json`` dict (unknown keys ignored; no RoPE scaling supported).

        RoPE theta is ``rope_theta`` (transformers 4) or ``rope_parameters.rope_theta``
        (transformers 5).
        """
        if d.get("rope_scaling"):
            raise ValueError(f"rope_scaling {d['rope_scaling']} is not supported")
        rope = d.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope_parameters {rope} are not supported (only plain RoPE)")
        theta = rope.get("rope_theta", d.get("rope_theta", 1_000_000.0))
        if d.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"Qwen3 config lacks {missing}")
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rope_theta=float(theta),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            attention_bias=bool(d.get("attention_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)))

    @classmethod
    def from_json(cls, path: str) -> "Qwen3Config":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"missing Qwen3 config file {path}")
        with open(path) as f:
            return cls.from_hf_dict(json.load(f))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The public Qwen/Qwen3-14B architecture; ``vocab_size`` is the released BitDance-14B-16x
# one (Qwen3's tokenizer plus the <|res_*|> and <|query_*|> tokens).
QWEN3_14B = Qwen3Config(vocab_size=151940, hidden_size=5120, intermediate_size=17408,
                        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=8,
                        head_dim=128)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float):
    """cos/sin tables ``[..., L, head_dim]`` for integer ``positions`` (float32, HF layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on ``x [B, L, H, D]`` with ``cos/sin [B, L, D]``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def causal_mask(batch: int, length: int) -> jax.Array:
    """Ordinary causal mask ``[B, L, L]``."""
    mask = jnp.tril(jnp.ones((length, length), jnp.bool_))
    return jnp.broadcast_to(mask, (batch, length, length))


def cache_mask(batch: int, query_positions: jax.Array, cache_len: int, *,
               visible_until: jax.Array | int | None = None) -> jax.Array:
    """Mask ``[B, Lq, cache_len]`` for queries attending into a preallocated cache.

    Causal by default (key slot <= the query's position); ``visible_until`` instead makes
    every slot below it visible to every query (a bidirectional block over all the past).
    """
    slots = jnp.arange(cache_len)
    if visible_until is None:
        mask = slots[None, :] <= query_positions[:, None]
    else:
        mask = jnp.broadcast_to(slots < visible_until, (query_positions.shape[0], cache_len))
    return jnp.broadcast_to(mask, (batch,) + mask.shape)


def init_kv_cache(config: Qwen3Config, batch: int, length: int, dtype=jnp.float32) -> KVCache:
    return kv_cache_lib.init_kv_cache(config.num_hidden_layers, batch, length,
                                      config.num_key_value_heads, config.head_dim, dtype)


class Qwen3Attention(nn.Module):
    config: Qwen3Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache=None, cache_index=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                  use_bias=cfg.attention_bias)
        b, l, _ = x.shape
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = dense(h * d, ("embed", "heads"), name="q_proj", **kw)(x).reshape(b, l, h, d)
        k = dense(kv * d, ("embed", "heads"), name="k_proj", **kw)(x).reshape(b, l, kv, d)
        v = dense(kv * d, ("embed", "heads"), name="v_proj", **kw)(x).reshape(b, l, kv, d)
        norm_kw = dict(eps=cfg.rms_norm_eps, param_dtype=self.param_dtype)
        # per-head norms and RoPE in float32, then the attention inputs in the compute dtype
        q = apply_rope(RMSNorm(name="q_norm", **norm_kw)(q), cos, sin).astype(self.dtype)
        k = apply_rope(RMSNorm(name="k_norm", **norm_kw)(k), cos, sin).astype(self.dtype)
        if layer_cache is not None:
            k, v = k.astype(layer_cache[0].dtype), v.astype(layer_cache[1].dtype)
            k_all, v_all = kv_cache_lib.view_with(layer_cache, k, v, cache_index)
        else:
            k_all, v_all = k, v
        # Query head i uses kv head i // (h // kv) (grouped-query attention).
        out = attention(q, k_all.astype(self.dtype), v_all.astype(self.dtype), mask,
                        implementation=self.attention_impl, precision=self.precision)
        out = dense(cfg.hidden_size, ("heads", "embed"), name="o_proj", **kw)(out.reshape(b, l, h * d))
        return out, (k, v)


class Qwen3MLP(nn.Module):
    config: Qwen3Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                  use_bias=False)
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        return dense(cfg.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(nn.silu(gate) * up)


class Qwen3DecoderLayer(nn.Module):
    config: Qwen3Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache=None, cache_index=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        norm_kw = dict(eps=self.config.rms_norm_eps, param_dtype=self.param_dtype)
        attn_out, new_kv = Qwen3Attention(self.config, name="self_attn",
                                          attention_impl=self.attention_impl, **kw)(
            RMSNorm(name="input_layernorm", **norm_kw)(x), cos, sin, mask, layer_cache, cache_index)
        x = x + attn_out
        x = x + Qwen3MLP(self.config, name="mlp", **kw)(
            RMSNorm(name="post_attention_layernorm", **norm_kw)(x))
        return x, new_kv


@dataclasses.dataclass
class Qwen3Output:
    last_hidden_state: jax.Array          # after the final norm
    kv_cache: KVCache | None
    hidden_states: tuple | None = None    # (embeddings, after layer 0, ...) when requested


jax.tree_util.register_dataclass(Qwen3Output, data_fields=["last_hidden_state", "kv_cache",
                                                           "hidden_states"], meta_fields=[])


class Qwen3Model(nn.Module):
    """The transformer trunk (HF ``model.*``).

    Give ``input_ids`` or ``inputs_embeds`` ``[B, L, D]``; ``positions [B, L]`` default to
    ``cache_index + arange(L)``; ``attention_mask [B, L, Lk]`` defaults to causal without
    a cache (with a cache the caller must give it: Lk is the cache length). With
    ``kv_cache`` the new keys/values are written at ``cache_index`` and the updated cache
    is returned. The hidden states (residual stream) are float32.
    """
    config: Qwen3Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    attention_impl: str = "auto"

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                  attention_impl=self.attention_impl)
        # setup() names submodules after their attributes: embed_tokens, layers_<i>, norm.
        self.embed_tokens = embedding_layer(cfg.vocab_size, cfg.hidden_size,
                                            param_dtype=self.param_dtype)
        self.layers = [Qwen3DecoderLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(eps=cfg.rms_norm_eps, param_dtype=self.param_dtype)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def __call__(self, input_ids=None, inputs_embeds=None, positions=None, attention_mask=None,
                 kv_cache: KVCache | None = None, cache_index=0,
                 output_hidden_states: bool = False) -> Qwen3Output:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = (self.embed_tokens(input_ids) if inputs_embeds is None
             else inputs_embeds.astype(jnp.float32))
        b, l, _ = x.shape
        if positions is None:
            positions = jnp.broadcast_to(cache_index + jnp.arange(l), (b, l))
        if attention_mask is None:
            if kv_cache is not None:
                raise ValueError("a KV-cache call needs an explicit attention_mask [B, L, cache_len]")
            attention_mask = causal_mask(b, l)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        hidden = [x] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            layer_cache = None if kv_cache is None else kv_cache_lib.layer_view(kv_cache, i)
            x, (k, v) = layer(x, cos, sin, attention_mask, layer_cache, cache_index)
            if kv_cache is not None:  # write only the new entries into the stacked cache
                kv_cache = kv_cache_lib.write(kv_cache, i, k, v, cache_index)
            if output_hidden_states:
                hidden.append(x)
        return Qwen3Output(self.norm(x), kv_cache, tuple(hidden) if hidden else None)


class Qwen3ForCausalLM(nn.Module):
    """``model`` trunk plus the LM head (HF ``lm_head``; tied to the embedding if configured)."""
    config: Qwen3Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    attention_impl: str = "auto"

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        self.model = Qwen3Model(self.config, attention_impl=self.attention_impl, **kw)
        if not self.config.tie_word_embeddings:
            self.lm_head = dense(self.config.vocab_size, ("embed", "vocab"), use_bias=False, **kw)

    def __call__(self, *args, **kwargs) -> tuple[jax.Array, Qwen3Output]:
        """Returns ``(logits, trunk output)``; arguments as ``Qwen3Model``."""
        out = self.model(*args, **kwargs)
        return self.logits(out.last_hidden_state), out

    def logits(self, hidden):
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def trunk(self, *args, **kwargs) -> Qwen3Output:
        """The trunk alone (what the T2I pipeline calls: no vocab projection)."""
        return self.model(*args, **kwargs)

    def embed(self, input_ids):
        return self.model.embed(input_ids)


def abstract_qwen3_params(config: Qwen3Config, param_dtype=jnp.float32):
    """Boxed param shapes (with logical axes) of ``Qwen3ForCausalLM``, nothing allocated."""
    model = Qwen3ForCausalLM(config, param_dtype=param_dtype)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)

    def init(rng, ids):
        return model.init(rng, ids)["params"]
    return jax.eval_shape(init, jax.random.key(0), ids)
