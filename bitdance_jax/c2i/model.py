"""Class-conditional BitDance (ImageNet models): the autoregressive transformer over binary
latent tokens and its training loss.

The sequence is ``cls_token_num`` class-embedding tokens, ``parallel_num - 1`` learned query
tokens, then the input projection of every latent token but the last ``parallel_num``.
Attention is block-causal: causal between AR steps, bidirectional inside the block of
``parallel_num`` slots one step predicts (P = 1 is plain causal attention). The hidden state
of each predicted token (normed, plus a per-position embedding) conditions the binary
diffusion head (``bitdance_jax.diffusion_head``).

Parameters are split in two trees, ``model`` (``BitDanceBackbone``, torch names of the
reference's top-level modules) and ``head`` (``DiffusionNet``, torch ``head.net.*``).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bitdance_jax.nn import flow
from bitdance_jax.nn import patching
from bitdance_jax.porting import convention as porting
from bitdance_jax.nn.diffusion_head import DiffusionNet, HeadConfig
from bitdance_jax.nn.layers import RMSNorm, dense, embed, swiglu

Dtype = Any
PARALLEL_MODES = ("patch", "standard")
# Rematerialisation of each transformer block when training: what the backward pass keeps.
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.checkpoint_dots}
ROPE_BASE = 10000.0
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class BitDanceConfig:
    """Architecture and training schedule of a class-conditional BitDance model.

    ``parallel_num`` tokens are predicted per AR step (1 = the reference's model.py, no query
    tokens and an MLP head; > 1 = model_parallel.py). ``parallel_mode='patch'`` orders the
    latents in p x p patches (p = sqrt(parallel_num)); ``'standard'`` keeps raster order.

    ``remat`` ("none", "full", "dots") and ``scan_layers`` trade memory and compile time,
    never results. ``scan_layers`` also changes the param layout: the blocks' params are
    stacked under ``layers`` (leading axis, logical name "layers") instead of ``layers_<i>``
    (see ``stack_layer_params``); ported and saved directories always hold ``layers_<i>``.
    """
    dim: int
    n_layer: int
    n_head: int
    diff_layers: int
    diff_dim: int
    diff_adanln_layers: int
    latent_dim: int = 32
    grid_size: int = 16
    cls_token_num: int = 64
    num_classes: int = 1000
    parallel_num: int = 1
    parallel_mode: str = "patch"
    diff_batch_mul: int = 4
    time_shift: float = 1.0
    P_mean: float = -0.8
    P_std: float = 0.8
    remat: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        for name in ("dim", "n_layer", "n_head", "diff_layers", "diff_dim", "diff_adanln_layers",
                     "latent_dim", "grid_size", "cls_token_num", "num_classes", "diff_batch_mul"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        patching.patch_side(self.parallel_num)
        if self.parallel_mode not in PARALLEL_MODES:
            raise ValueError(f"parallel_mode must be one of {PARALLEL_MODES}, got {self.parallel_mode!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")
        if not isinstance(self.scan_layers, (bool, np.bool_)):
            raise ValueError(f"scan_layers must be a bool, got {self.scan_layers!r}")
        if self.dim % self.n_head or (self.dim // self.n_head) % 4:
            raise ValueError(f"dim {self.dim} / n_head {self.n_head} must give a head size "
                             "divisible by 4 (2D rotary embedding)")
        if self.num_tokens % self.parallel_num:
            raise ValueError(f"{self.num_tokens} latent tokens do not split into steps of "
                             f"{self.parallel_num}")
        if self.grid_size % self.token_patch:
            raise ValueError(f"grid {self.grid_size} does not split into {self.token_patch}x"
                             f"{self.token_patch} patches")
        self.head_config  # validates the head

    # --- derived sizes
    @property
    def num_tokens(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def num_steps(self) -> int:
        """AR steps of the sampler."""
        return self.num_tokens // self.parallel_num

    @property
    def seq_len(self) -> int:
        """Slots of the full sequence: class tokens + queries + all but the last P latents."""
        return self.cls_token_num + self.num_tokens - 1

    @property
    def prefix_len(self) -> int:
        """Slots fed at AR step 0: class tokens and query tokens."""
        return self.cls_token_num + self.parallel_num - 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        return -(-hidden // 256) * 256

    @property
    def token_patch(self) -> int:
        """Patch side of the token order (1 = raster)."""
        return patching.patch_side(self.parallel_num) if self.parallel_mode == "patch" else 1

    @property
    def head_config(self) -> HeadConfig:
        return HeadConfig(ch_target=self.latent_dim, ch_cond=self.dim, ch_latent=self.diff_dim,
                          depth_latent=self.diff_layers, depth_adanln=self.diff_adanln_layers,
                          parallel_num=self.parallel_num, variant="imagenet",
                          time_shift=self.time_shift, P_mean=self.P_mean, P_std=self.P_std,
                          diff_batch_mul=self.diff_batch_mul)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BitDanceConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown BitDanceConfig keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_reference_kwargs(cls, kwargs: Mapping[str, Any]) -> "BitDanceConfig":
        """Config from the reference ``BitDance(**kwargs)`` (no ``parallel_num``: model.py)."""
        kwargs = dict(kwargs)
        if int(kwargs.pop("patch_size", 1)) != 1:
            raise ValueError("only patch_size 1 (one latent cell per token) is supported")
        schedule = kwargs.pop("time_schedule", "logit_normal")
        if schedule != "logit_normal":
            raise ValueError(f"time_schedule {schedule!r} is not supported (only 'logit_normal')")
        resolution, down = int(kwargs.pop("resolution")), int(kwargs.pop("down_size"))
        if resolution % down:
            raise ValueError(f"resolution {resolution} is not a multiple of down_size {down}")
        for ignored in ("grad_checkpointing", "trained_vae", "drop_rate", "perturb_schedule",
                        "perturb_rate", "perturb_rate_max", "class_dropout_prob"):
            kwargs.pop(ignored, None)
        if "parallel_num" not in kwargs:
            kwargs["parallel_num"] = 1
        return cls.from_dict({**kwargs, "grid_size": resolution // down})


# Released ImageNet architectures (reference model.py / model_parallel.py presets + the
# flags of its README: 256px, 16x down, 32-bit latents, 64 class tokens, patch order).
MODEL_SIZES = {
    "B": dict(dim=768, n_layer=24, n_head=12, diff_layers=6, diff_dim=768, diff_adanln_layers=2),
    "L": dict(dim=1024, n_layer=32, n_head=16, diff_layers=8, diff_dim=1024, diff_adanln_layers=2),
    "H": dict(dim=1280, n_layer=40, n_head=20, diff_layers=12, diff_dim=1280, diff_adanln_layers=3)}
RELEASED_MODELS: dict[str, BitDanceConfig] = {
    f"BitDance-{size}-{p}x": BitDanceConfig(**dims, latent_dim=32, grid_size=16, cls_token_num=64,
                                            num_classes=1000, parallel_num=p, parallel_mode="patch",
                                            diff_batch_mul=4)
    for size, dims in MODEL_SIZES.items() for p in (1, 4, 16)}
# Classifier-free guidance of the reference README per released model.
DEFAULT_CFG_SCALES = {"BitDance-B-1x": 3.2, "BitDance-B-4x": 3.9, "BitDance-B-16x": 6.1,
                      "BitDance-L-1x": 4.0, "BitDance-H-1x": 4.55}


def released_name(config: BitDanceConfig) -> str | None:
    """Name of the released architecture ``config`` has (schedule values aside), if any."""
    arch = dataclasses.replace(config, diff_batch_mul=4, time_shift=1.0, P_mean=-0.8, P_std=0.8,
                               remat="none", scan_layers=False)
    return next((name for name, c in RELEASED_MODELS.items() if c == arch), None)


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

    With ``cache=(k, v)`` ([B, seq_len, H, D] each) the new keys/values are written at slot
    ``start`` and the queries attend over the whole cache (the mask hides unwritten slots).
    """
    n_head: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, start=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        b, length, dim = x.shape
        head_dim = dim // self.n_head
        qkv = dense(3 * dim, ("embed", "heads"), name="wqkv", **kw)(x)
        q, k, v = (a.reshape(b, length, self.n_head, head_dim) for a in jnp.split(qkv, 3, -1))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k_cache, v_cache = cache
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, start, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, start, 0, 0))
            cache = (k, v)
        q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_HIGHEST).astype(jnp.float32)
        logits = jnp.where(mask[None, None], logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=_HIGHEST).reshape(b, length, dim)
        return dense(dim, ("heads", "embed"), name="wo", **kw)(out), cache


class FeedForward(nn.Module):
    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        h = swiglu(dense(2 * self.hidden, ("embed", "mlp"), name="w1", **kw)(x))
        return dense(x.shape[-1], ("mlp", "embed"), name="w2", **kw)(h)


class TransformerBlock(nn.Module):
    n_head: int
    ffn_hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, start=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn, cache = Attention(self.n_head, name="attention", **kw)(
            RMSNorm(name="attention_norm", **kw)(x), cos, sin, mask, cache, start)
        h = x + attn
        return h + FeedForward(self.ffn_hidden, name="feed_forward", **kw)(
            RMSNorm(name="ffn_norm", **kw)(h)), cache


class MLPConnector(nn.Module):
    """Input projection of binary latents: w2(silu(a) * b), (a, b) = w1(x), with biases."""
    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hidden = int(self.dim * 1.5)
        h = swiglu(dense(2 * hidden, ("latent", "mlp"), name="w1", **kw)(x))
        return dense(self.dim, ("mlp", "embed"), name="w2", **kw)(h)


class BitDanceBackbone(nn.Module):
    """The AR transformer (everything but the diffusion head and the tokenizer).

    ``__call__(tokens, class_ids)``: teacher-forced hidden states for the head [B, h*w, dim]
    from latents in token order [B, h*w, C]. ``prefill``/``step`` run the sampler's AR steps
    on an explicit KV cache (``init_cache``); they need ``scan_layers=False`` (the sampler
    runs ``inference_config`` on unstacked params).
    """
    config: BitDanceConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # 1001 rows do not split over a mesh axis: shard the (cls_token_num * dim) width
        self.cls_embedding = embed(cfg.num_classes + 1, cfg.cls_token_num * cfg.dim,
                                   axes=(None, "embed"), **kw)
        if cfg.parallel_num > 1:
            self.query_token = self.param(
                "query_token", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                            (None, None, "embed")),
                (1, cfg.parallel_num - 1, cfg.dim), self.param_dtype)
        self.proj_in = MLPConnector(cfg.dim, **kw)
        self.emb_norm = RMSNorm(**kw)
        block = TransformerBlock
        if cfg.remat != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            self.layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                                  in_axes=(nn.broadcast,) * 3, length=cfg.n_layer,
                                  metadata_params={nn.PARTITION_NAME: "layers"}
                                  )(cfg.n_head, cfg.ffn_hidden, **kw)
        else:
            self.layers = [block(cfg.n_head, cfg.ffn_hidden, **kw) for _ in range(cfg.n_layer)]
        self.norm = RMSNorm(**kw)
        self.pos_for_diff = embed(cfg.num_tokens, cfg.dim, axes=(None, "embed"), **kw)

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
        new_caches = []
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, cos, sin, mask, None if caches is None else caches[i], start)
            new_caches.append(cache)
        return self.norm(x), (None if caches is None else tuple(new_caches))

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


def inference_config(config: BitDanceConfig) -> BitDanceConfig:
    """The config the KV-cache sampler runs: unscanned layers (params ``layers_<i>``), no remat."""
    return dataclasses.replace(config, remat="none", scan_layers=False)


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


def init_cache(config: BitDanceConfig, batch: int, dtype: Dtype = jnp.float32):
    """Zero KV cache: per layer (k, v) [batch, seq_len, n_head, head_dim]."""
    shape = (batch, config.seq_len, config.n_head, config.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layer))


# ----------------------------------------------------------------------------- params / loss

def example_inputs(config: BitDanceConfig, batch: int = 1):
    return (jnp.zeros((batch, config.num_tokens, config.latent_dim), jnp.float32),
            jnp.zeros((batch,), jnp.int32))


def abstract_backbone_params(config: BitDanceConfig, param_dtype: Dtype = jnp.float32):
    """Boxed abstract params of ``BitDanceBackbone(config)`` (no allocation)."""
    return porting.abstract_params(BitDanceBackbone(config, param_dtype=param_dtype),
                                   *example_inputs(config))


def init_params(config: BitDanceConfig, rng, param_dtype: Dtype = jnp.float32) -> dict:
    """Fresh {"model", "head"} params (boxed with logical axis names)."""
    from bitdance_jax.nn.diffusion_head import example_inputs as head_inputs
    k_model, k_head = jax.random.split(rng)
    model = BitDanceBackbone(config, param_dtype=param_dtype).init(
        k_model, *example_inputs(config))["params"]
    head = DiffusionNet(config.head_config, param_dtype=param_dtype).init(
        k_head, *head_inputs(config.head_config))["params"]
    return {"model": model, "head": head}


def head_apply(config: BitDanceConfig, head_params, dtype: Dtype = jnp.float32):
    """net_fn(x, t, c) of the diffusion head taking [N, P, C] inputs for every P (the 1x
    MLP head has no token axis: it is squeezed and restored here)."""
    net = DiffusionNet(config.head_config, dtype=dtype, param_dtype=jnp.float32)

    def net_fn(x, t, c):
        if config.head_config.uses_mlp_encoder:
            out = net.apply({"params": head_params}, x[:, 0], t, c[:, 0])
            return out[:, None]
        return net.apply({"params": head_params}, x, t, c)
    return net_fn


def flip_bits(rng, tokens, rate):
    """Training perturbation of the input latents: each sign flips where u1 < rate * u2
    (u1, u2 uniform), i.e. with a per-element probability uniform in [0, rate]."""
    k1, k2 = jax.random.split(rng)
    u1 = jax.random.uniform(k1, tokens.shape)
    u2 = jax.random.uniform(k2, tokens.shape)
    return jnp.where(u1 < rate * u2, -tokens, tokens)


def _is_zero(rate) -> bool:
    """A rate known (untraced) to be zero: skip the random draws."""
    return isinstance(rate, (int, float)) and rate == 0


def bitdance_loss(params, latents, class_ids, rng=None, *, config: BitDanceConfig,
                  t_raw=None, noise=None, bit_flip_rate: float = 0.0, label_drop: float = 0.1,
                  dtype: Dtype = jnp.float32):
    """Flow-matching loss of a class-conditional BitDance model (scalar).

    ``latents`` [B, h, w, C] in {-1, +1} (NHWC grid), ``class_ids`` [B]. With ``rng`` the
    input latents get bit flips (``bit_flip_rate``) and labels are dropped to the null class
    with probability ``label_drop``; ``t_raw`` [B*h*w/P*diff_batch_mul] and ``noise`` (the
    tiled target's shape) default to draws from ``rng``. Without ``rng`` (evaluation) there
    is no perturbation and ``t_raw``/``noise`` must be given. The rates may be traced
    (e.g. a schedule).
    """
    cfg = config
    if latents.ndim != 4 or latents.shape[1:] != (cfg.grid_size, cfg.grid_size, cfg.latent_dim):
        raise ValueError(f"latents must be [B, {cfg.grid_size}, {cfg.grid_size}, {cfg.latent_dim}] "
                         f"(NHWC), got {latents.shape}")
    if rng is None and (t_raw is None or noise is None):
        raise ValueError("without rng, pass the draws t_raw and noise explicitly")
    target = patching.patchify(latents.astype(jnp.float32), cfg.token_patch)
    inputs = target
    if rng is not None:
        k_flip, k_drop, k_t, k_noise = jax.random.split(rng, 4)
        if not _is_zero(bit_flip_rate):
            inputs = flip_bits(k_flip, inputs, bit_flip_rate)
        if not _is_zero(label_drop):
            drop = jax.random.uniform(k_drop, class_ids.shape) < label_drop
            class_ids = jnp.where(drop, cfg.num_classes, class_ids)
    backbone = BitDanceBackbone(cfg, dtype=dtype, param_dtype=jnp.float32)
    hidden = backbone.apply({"params": params["model"]}, inputs, class_ids)
    cond = hidden.reshape(-1, cfg.parallel_num, cfg.dim)
    target = target.reshape(-1, cfg.parallel_num, cfg.latent_dim)
    cond = jnp.tile(cond, (cfg.diff_batch_mul, 1, 1))
    target = jnp.tile(target, (cfg.diff_batch_mul, 1, 1))
    if t_raw is None:
        t_raw = jax.random.normal(k_t, target.shape[:1], jnp.float32)
    if noise is None:
        noise = jax.random.normal(k_noise, target.shape, jnp.float32)
    noise = jnp.asarray(noise).reshape(target.shape)
    return flow.flow_matching_loss(head_apply(cfg, params["head"], dtype), target, cond,
                                   jnp.asarray(t_raw), noise, P_mean=cfg.P_mean, P_std=cfg.P_std,
                                   time_shift=cfg.time_shift)
