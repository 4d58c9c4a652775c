"""Class-conditional BitDance (ImageNet models): the autoregressive transformer over binary
latent tokens (2D RoPE, block-causal attention, KV-cache prefill and steps).

The sequence is ``cls_token_num`` class-embedding tokens, ``parallel_num - 1`` learned query
tokens, then the input projection of every latent token but the last ``parallel_num``.
Attention is block-causal: causal between AR steps, bidirectional inside the block of
``parallel_num`` slots one step predicts (P = 1 is plain causal attention). The hidden state
of each predicted token (normed, plus a per-position embedding) conditions the binary
diffusion head (``bitdance_jax.nn.diffusion_head``).

Parameters are split in two trees, ``model`` (``BitDanceBackbone``, torch names of the
reference's top-level modules) and ``head`` (``DiffusionNet``, torch ``head.net.*``).
"""
from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bitdance_jax.nn import kv_cache, patching, quant
from bitdance_jax.c2i.config import REMAT_POLICIES, BitDanceConfig
from bitdance_jax.nn.attention import attention
from bitdance_jax.nn.diffusion_head import DiffusionNet
from bitdance_jax.nn.layers import RMSNorm, dense, embed, swiglu
from bitdance_jax.nn.params import abstract_params
from bitdance_jax.nn.precision import PrecisionLike

Dtype = Any
ROPE_BASE = 10000.0


# ----------------------------------------------------------------------------- position / mask

@functools.lru_cache(maxsize=32)
def rope_tables(config: BitDanceConfig) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) [seq_len, head_dim/2] of the 2D rotary embedding, float32.

    Rotation pair k < head_dim/4 turns by X * f_k, pair head_dim/4 + k by Y * f_k, with
    X = col + 1.5, Y = row + 1.5 of the token's grid cell; class and query slots sit at 0;
    slot prefix_len + n carries latent token n (token order), the last P tokens never enter.
    """
    quarter = config.head_dim // 4
    half = config.head_dim // 2
    freqs = (np.float32(1.0) / np.power(np.float32(ROPE_BASE),
                                        np.arange(0, half, 2, dtype=np.float32)[:quarter]
                                        / np.float32(half))).astype(np.float32)
    rows, cols = patching.token_cells(config.grid_size, config.grid_size, config.token_patch)
    xy = np.stack([cols, rows], axis=-1).astype(np.float32) + np.float32(1.5)
    angles = (xy[:, :, None] * freqs[None, None, :]).reshape(len(xy), half)
    angles = np.concatenate([np.zeros((config.prefix_len, half), np.float32),
                             angles[:config.num_tokens - config.parallel_num]], axis=0)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@functools.lru_cache(maxsize=32)
def block_causal_mask(seq_len: int, cls_token_num: int, parallel_num: int) -> np.ndarray:
    """Boolean [seq_len, seq_len] (True = may attend): causal, plus full attention inside the
    blocks [cls-1 + kP, cls-1 + (k+1)P) of the slots one AR step feeds (P = 1: causal)."""
    slots = np.arange(seq_len)
    first = cls_token_num - 1
    block = np.where(slots >= first, (slots - first) // parallel_num, -1 - slots)
    return (slots[None, :] <= slots[:, None]) | (block[None, :] == block[:, None])


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs (x[2k], x[2k+1]) of x [B, L, H, D] in float32."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    a, b = xf[..., 0], xf[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


# ----------------------------------------------------------------------------- modules

class Attention(nn.Module):
    """Multi-head attention with 2D RoPE and an explicit boolean mask.

    With ``cache=(k, v)`` (one layer of the stacked cache, [B, seq_len, H, D] each) the
    queries attend over it with the new keys/values at slot ``start`` (the mask hides
    unwritten slots); the new entries are returned for the caller to store.
    """
    n_head: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, start=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                  use_bias=False)
        b, length, dim = x.shape
        head_dim = dim // self.n_head
        qkv = dense(3 * dim, ("embed", "heads"), name="wqkv", **kw)(x)
        q, k, v = (a.reshape(b, length, self.n_head, head_dim) for a in jnp.split(qkv, 3, -1))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_entries = None
        if cache is not None:
            new_entries = (k, v)
            k, v = kv_cache.view_with(cache, k, v, start)
        out = attention(q, k, v, mask, implementation=self.attention_impl,
                        precision=self.precision).reshape(b, length, dim)
        return dense(dim, ("heads", "embed"), name="wo", **kw)(out), new_entries


class FeedForward(nn.Module):
    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                  use_bias=False)
        h = swiglu(dense(2 * self.hidden, ("embed", "mlp"), name="w1", **kw)(x))
        return dense(x.shape[-1], ("mlp", "embed"), name="w2", **kw)(h)


class TransformerBlock(nn.Module):
    """Pre-norm block; the residual stream ``x`` stays float32 whatever ``dtype``."""
    n_head: int
    ffn_hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, start=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        attn, cache = Attention(self.n_head, name="attention", attention_impl=self.attention_impl,
                                **kw)(RMSNorm(name="attention_norm", param_dtype=self.param_dtype)(x),
                                      cos, sin, mask, cache, start)
        h = x + attn
        return h + FeedForward(self.ffn_hidden, name="feed_forward", **kw)(
            RMSNorm(name="ffn_norm", param_dtype=self.param_dtype)(h)), cache


class MLPConnector(nn.Module):
    """Input projection of binary latents: w2(silu(a) * b), (a, b) = w1(x), with biases."""
    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        hidden = int(self.dim * 1.5)
        h = swiglu(dense(2 * hidden, ("latent", "mlp"), name="w1", **kw)(x))
        return dense(self.dim, ("mlp", "embed"), name="w2", **kw)(h)


class BitDanceBackbone(nn.Module):
    """The AR transformer (everything but the diffusion head and the tokenizer).

    ``__call__(tokens, class_ids)``: teacher-forced hidden states for the head [B, h*w, dim]
    from latents in token order [B, h*w, C]. ``prefill``/``step`` run the sampler's AR steps
    on an explicit KV cache (``init_cache``); they need ``scan_layers=False`` (the sampler
    runs ``inference_config`` on unstacked params).

    ``dtype`` is the matmul input dtype (bfloat16: the bf16-mixed policy, see
    ``nn.precision``), ``precision`` the matmul precision, ``attention_impl`` one of
    ``nn.attention.IMPLEMENTATIONS``. Every Linear and embedding starts N(0, 0.02) with zero
    biases (the reference's init).
    """
    config: BitDanceConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    attention_impl: str = "auto"

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        block_kw = dict(kw, attention_impl=self.attention_impl)
        # 1001 rows do not split over a mesh axis: shard the (cls_token_num * dim) width
        self.cls_embedding = embed(cfg.num_classes + 1, cfg.cls_token_num * cfg.dim,
                                   axes=(None, "embed"), param_dtype=self.param_dtype)
        if cfg.parallel_num > 1:
            self.query_token = self.param(
                "query_token", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                            (None, None, "embed")),
                (1, cfg.parallel_num - 1, cfg.dim), self.param_dtype)
        self.proj_in = MLPConnector(cfg.dim, **kw)
        self.emb_norm = RMSNorm(param_dtype=self.param_dtype)
        block = TransformerBlock
        if cfg.remat != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            self.layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                                  in_axes=(nn.broadcast,) * 3, length=cfg.n_layer,
                                  metadata_params={nn.PARTITION_NAME: "layers"}
                                  )(cfg.n_head, cfg.ffn_hidden, **block_kw)
        else:
            self.layers = [block(cfg.n_head, cfg.ffn_hidden, **block_kw)
                           for _ in range(cfg.n_layer)]
        self.norm = RMSNorm(param_dtype=self.param_dtype)
        self.pos_for_diff = embed(cfg.num_tokens, cfg.dim, axes=(None, "embed"),
                                  param_dtype=self.param_dtype)

    def _check_class_ids(self, class_ids):
        if class_ids.ndim != 1:
            raise ValueError(f"class_ids must be [B], got shape {class_ids.shape}")

    def _prefix(self, class_ids):
        """Class tokens then query tokens [B, prefix_len, dim] (before emb_norm)."""
        cfg = self.config
        self._check_class_ids(class_ids)
        b = class_ids.shape[0]
        parts = [self.cls_embedding(class_ids).reshape(b, cfg.cls_token_num, cfg.dim)]
        if cfg.parallel_num > 1:
            parts.append(jnp.broadcast_to(self.query_token, (b,) + self.query_token.shape[1:])
                         .astype(parts[0].dtype))
        return jnp.concatenate(parts, axis=1)

    def embed_sequence(self, tokens, class_ids):
        """Input of the first transformer layer [B, seq_len, dim]."""
        cfg = self.config
        if tokens.ndim != 3 or tokens.shape[1:] != (cfg.num_tokens, cfg.latent_dim):
            raise ValueError(f"tokens must be [B, {cfg.num_tokens}, {cfg.latent_dim}], got {tokens.shape}")
        x = jnp.concatenate([self._prefix(class_ids),
                             self.proj_in(tokens[:, :-cfg.parallel_num])], axis=1)
        return self.emb_norm(x)

    def _layers(self, x, cos, sin, mask, caches=None, start=None):
        if self.config.scan_layers:
            if caches is not None:
                raise ValueError("the KV-cache path needs scan_layers=False: use "
                                 "inference_config(config) and unstack_layer_params")
            x, _ = self.layers(x, jnp.asarray(cos), jnp.asarray(sin), jnp.asarray(mask))
            return self.norm(x), None
        for i, layer in enumerate(self.layers):
            view = None if caches is None else kv_cache.layer_view(caches, i)
            x, new_entries = layer(x, cos, sin, mask, view, start)
            if caches is not None:
                caches = kv_cache.write(caches, i, *new_entries, start)
        return self.norm(x), caches

    def __call__(self, tokens, class_ids):
        cfg = self.config
        cos, sin = rope_tables(cfg)
        mask = block_causal_mask(cfg.seq_len, cfg.cls_token_num, cfg.parallel_num)
        x, _ = self._layers(self.embed_sequence(tokens, class_ids), cos, sin, mask)
        return x[:, -cfg.num_tokens:] + self.pos_for_diff.embedding.astype(x.dtype)

    def prefill(self, class_ids, caches):
        """AR step 0: class + query slots. Returns (head conditioning [B, P, dim], caches)."""
        cfg = self.config
        cos, sin = (t[:cfg.prefix_len] for t in rope_tables(cfg))
        mask = block_causal_mask(cfg.seq_len, cfg.cls_token_num, cfg.parallel_num)[:cfg.prefix_len]
        x, caches = self._layers(self.emb_norm(self._prefix(class_ids)), cos, sin, mask, caches, 0)
        pos = self.pos_for_diff.embedding[:cfg.parallel_num].astype(x.dtype)
        return x[:, -cfg.parallel_num:] + pos, caches

    def step(self, tokens, step, caches):
        """AR step ``step`` >= 1 (may be traced): feed the P tokens of the previous step."""
        cfg = self.config
        p = cfg.parallel_num
        start = p * (step - 1) + cfg.prefix_len
        cos, sin = (jax.lax.dynamic_slice_in_dim(jnp.asarray(t), start, p) for t in rope_tables(cfg))
        mask = jax.lax.dynamic_slice_in_dim(
            jnp.asarray(block_causal_mask(cfg.seq_len, cfg.cls_token_num, p)), start, p)
        x, caches = self._layers(self.emb_norm(self.proj_in(tokens)), cos, sin, mask, caches, start)
        pos = jax.lax.dynamic_slice_in_dim(self.pos_for_diff.embedding, step * p, p)
        return x + pos.astype(x.dtype), caches


def stack_layer_params(params: Mapping[str, Any], n_layer: int) -> dict:
    """Backbone params with ``layers_0 .. layers_<n_layer-1>`` -> the ``scan_layers`` layout
    (one ``layers`` subtree, each leaf stacked on a new leading axis). Other entries stay."""
    missing = [f"layers_{i}" for i in range(n_layer) if f"layers_{i}" not in params]
    if missing or "layers" in params:
        raise ValueError(f"not an unscanned backbone tree of {n_layer} layers "
                         f"(missing {missing[:3]}{', has layers' if 'layers' in params else ''})")
    blocks = [params[f"layers_{i}"] for i in range(n_layer)]
    out = {k: v for k, v in params.items() if not re.fullmatch(r"layers_\d+", k)}
    if len(out) + n_layer != len(params):
        raise ValueError(f"params hold more than {n_layer} layers")
    out["layers"] = jax.tree.map(
        lambda *xs: (np.stack if isinstance(xs[0], np.ndarray) else jnp.stack)(xs), *blocks)
    return out


def unstack_layer_params(params: Mapping[str, Any]) -> dict:
    """Inverse of ``stack_layer_params``: the stacked ``layers`` subtree -> ``layers_<i>``."""
    if "layers" not in params:
        raise ValueError("not a scan_layers backbone tree: no 'layers' entry")
    stacked = params["layers"]
    n_layer = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n_layer):
        out[f"layers_{i}"] = jax.tree.map(lambda a: a[i], stacked)
    return out


def from_unscanned(params: Mapping[str, Any], config: BitDanceConfig) -> dict:
    """{"model", "head", ...} params of the unscanned layout (ported / saved dirs, sampler)
    -> the layout ``config`` trains with."""
    if not config.scan_layers:
        return dict(params)
    return {**params, "model": stack_layer_params(params["model"], config.n_layer)}


def to_unscanned(params: Mapping[str, Any], config: BitDanceConfig) -> dict:
    """Inverse of ``from_unscanned``: params in ``config``'s layout -> unscanned."""
    if not config.scan_layers:
        return dict(params)
    return {**params, "model": unstack_layer_params(params["model"])}


def init_cache(config: BitDanceConfig, batch: int, dtype: Dtype = jnp.float32) -> kv_cache.KVCache:
    """Zero KV cache in the shared layout (``nn.kv_cache``): [layers, batch, seq_len, heads, head_dim]."""
    return kv_cache.init_kv_cache(config.n_layer, batch, config.seq_len, config.n_head,
                                  config.head_dim, dtype)


# ----------------------------------------------------------------------------- params / loss

def example_inputs(config: BitDanceConfig, batch: int = 1):
    return (jnp.zeros((batch, config.num_tokens, config.latent_dim), jnp.float32),
            jnp.zeros((batch,), jnp.int32))


def abstract_backbone_params(config: BitDanceConfig, param_dtype: Dtype = jnp.float32,
                             quantize: str | None = None):
    """Boxed abstract params of ``BitDanceBackbone(config)`` (no allocation); ``quantize``:
    with its kernels quantized (``nn.quant``)."""
    module = BitDanceBackbone(config, param_dtype=param_dtype)
    if quantize is None:
        return abstract_params(module, *example_inputs(config))
    return quant.abstract_quantized(module, quantize, *example_inputs(config))


def init_params(config: BitDanceConfig, rng, param_dtype: Dtype = jnp.float32) -> dict:
    """Fresh {"model", "head"} params (boxed with logical axis names)."""
    from bitdance_jax.nn.diffusion_head import example_inputs as head_inputs
    k_model, k_head = jax.random.split(rng)
    model = BitDanceBackbone(config, param_dtype=param_dtype).init(
        k_model, *example_inputs(config))["params"]
    head = DiffusionNet(config.head_config, param_dtype=param_dtype).init(
        k_head, *head_inputs(config.head_config))["params"]
    return {"model": model, "head": head}


def head_apply(config: BitDanceConfig, head_params, dtype: Dtype = jnp.float32,
               precision: PrecisionLike = None, attention_impl: str = "auto",
               quantize: str | None = None):
    """net_fn(x, t, c) of the diffusion head taking [N, P, C] inputs for every P (the 1x
    MLP head has no token axis: it is squeezed and restored here). ``quantize``: the mode
    of the kernels in ``head_params`` (``nn.quant``)."""
    net = quant.quantized(DiffusionNet(config.head_config, dtype=dtype, param_dtype=jnp.float32,
                                       precision=precision, attention_impl=attention_impl),
                          quantize)

    def net_fn(x, t, c):
        if config.head_config.uses_mlp_encoder:
            out = net.apply({"params": head_params}, x[:, 0], t, c[:, 0])
            return out[:, None]
        return net.apply({"params": head_params}, x, t, c)
    return net_fn


