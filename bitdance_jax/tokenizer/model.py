"""The binary tokenizer: conv encoder, sign quantizer over bit groups, adaptive-GN decoder.

NHWC throughout. Module and param names mirror the released PyTorch state_dict through
the porting convention (``down_0/block_1/conv1`` <-> ``down.0.block.1.conv1``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from bitdance_jax.nn.layers import conv, dense, group_norm, torch_linear_init
from bitdance_jax.nn.params import abstract_params
from bitdance_jax.nn.precision import PrecisionLike, lax_precision

Dtype = Any


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """``ddconfig`` of the reference plus the quantizer's grouping and decoder variant."""
    ch: int = 256
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 4
    z_channels: int = 32
    in_channels: int = 3
    out_ch: int = 3
    num_codebooks: int = 4
    gan_decoder: bool = False

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if self.z_channels % self.num_codebooks:
            raise ValueError(f"z_channels {self.z_channels} not divisible by num_codebooks "
                             f"{self.num_codebooks}")
        for m in (1,) + self.ch_mult:
            if (self.ch * m) % 32:
                raise ValueError(f"GroupNorm(32) needs channel counts divisible by 32; "
                                 f"ch {self.ch} x mult {m} is not")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def bits_per_group(self) -> int:
        return self.z_channels // self.num_codebooks

    @classmethod
    def from_ddconfig(cls, ddconfig: dict, **kw) -> "TokenizerConfig":
        unknown = set(ddconfig) - {"double_z", "z_channels", "in_channels", "out_ch", "ch",
                                   "ch_mult", "num_res_blocks", "resolution"}
        if unknown:
            raise ValueError(f"unknown ddconfig keys: {sorted(unknown)}")
        if ddconfig.get("double_z"):
            raise ValueError("double_z=True is not a binary tokenizer config")
        fields = {k: ddconfig[k] for k in ("ch", "ch_mult", "num_res_blocks", "z_channels",
                                           "in_channels", "out_ch") if k in ddconfig}
        return cls(**fields, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        return d


# The released ImageNet tokenizer (ae_d16c32: 16x down, 32 bits, 4 groups of 8 bits).
AE_D16C32 = TokenizerConfig()


class ResBlock(nn.Module):
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        h = nn.swish(group_norm(name="norm1", param_dtype=self.param_dtype)(x))
        h = conv(self.out_channels, 3, use_bias=False, name="conv1", **kw)(h)
        h = nn.swish(group_norm(name="norm2", param_dtype=self.param_dtype)(h))
        h = conv(self.out_channels, 3, use_bias=False, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, use_bias=False, name="nin_shortcut", **kw)(x)
        return x + h


class DownLevel(nn.Module):
    """One encoder resolution level: residual blocks, then an optional stride-2 conv."""
    out_channels: int
    num_blocks: int
    downsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        for i in range(self.num_blocks):
            x = ResBlock(self.out_channels, name=f"block_{i}", **kw)(x)
        if self.downsample:
            x = conv(self.out_channels, 3, stride=2, name="downsample", **kw)(x)
        return x


class Encoder(nn.Module):
    config: TokenizerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        h = conv(c.ch, 3, use_bias=False, name="conv_in", **kw)(x)
        last = len(c.ch_mult) - 1
        for level, mult in enumerate(c.ch_mult):
            h = DownLevel(c.ch * mult, c.num_res_blocks, level < last, name=f"down_{level}", **kw)(h)
        for i in range(c.num_res_blocks):
            h = ResBlock(h.shape[-1], name=f"mid_block_{i}", **kw)(h)
        h = nn.swish(group_norm(name="norm_out", param_dtype=self.param_dtype)(h))
        return conv(c.z_channels, 1, name="conv_out", **kw)(h)


def depth_to_space(x: jax.Array, block: int = 2) -> jax.Array:
    """NHWC depth-to-space in DCR order: out[2h+i, 2w+j, c] = in[h, w, (2i+j)*C + c]."""
    b, h, w, c4 = x.shape
    c = c4 // (block * block)
    x = x.reshape(b, h, w, block, block, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * block, w * block, c)


class Upsampler(nn.Module):
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x):
        x = conv(4 * x.shape[-1], 3, name="conv1", dtype=self.dtype, param_dtype=self.param_dtype,
                 precision=self.precision)(x)
        return depth_to_space(x, 2)


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm whose scale/bias are linear maps of the latent's per-channel std and mean.

    The std uses the unbiased variance over H*W, as the reference computes it.
    """
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x, style):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        c = x.shape[-1]
        b, sh, sw, sc = style.shape
        flat = style.reshape(b, sh * sw, sc).astype(jnp.float32)
        std = jnp.sqrt(jnp.var(flat, axis=1, ddof=1) + 1e-6)
        mean = jnp.mean(flat, axis=1)
        # PyTorch's default kernel init (the reference tokenizer is never re-initialised)
        kw["kernel_init"] = torch_linear_init()
        scale = dense(c, ("latent", "conv_out"), name="gamma", **kw)(std)
        bias = dense(c, ("latent", "conv_out"), name="beta", **kw)(mean)
        h = group_norm(use_affine=False, name="gn", param_dtype=self.param_dtype)(x)
        return scale[:, None, None, :] * h + bias[:, None, None, :]


class UpLevel(nn.Module):
    """One decoder level: residual blocks, then an optional 2x upsampler."""
    out_channels: int
    num_blocks: int
    upsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        for i in range(self.num_blocks):
            x = ResBlock(self.out_channels, name=f"block_{i}", **kw)(x)
        if self.upsample:
            x = Upsampler(name="upsample", **kw)(x)
        return x


class Decoder(nn.Module):
    """Decoder; the GAN variant concatenates N(0,1) noise (``noise`` argument) to the latent."""
    config: TokenizerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, z, noise=None):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        style = z
        if c.gan_decoder:
            if noise is None:
                raise ValueError("the GAN decoder needs a noise array shaped like the latent")
            z = jnp.concatenate([z, noise.astype(z.dtype)], axis=-1)
        h = conv(c.ch * c.ch_mult[-1], 3, name="conv_in", **kw)(z)
        for i in range(c.num_res_blocks):
            h = ResBlock(h.shape[-1], name=f"mid_block_{i}", **kw)(h)
        for level in reversed(range(len(c.ch_mult))):
            h = AdaptiveGroupNorm(name=f"adaptive_{level}", **kw)(h, style)
            h = UpLevel(c.ch * c.ch_mult[level], c.num_res_blocks, level > 0,
                        name=f"up_{level}", **kw)(h)
        h = nn.swish(group_norm(name="norm_out", param_dtype=self.param_dtype)(h))
        return conv(c.out_ch, 3, name="conv_out", **kw)(h)


# ---------------------------------------------------------------------------------------
# Binary quantizer (lookup-free, sign per channel, indices per group of bits).

def quantize_signs(h: jax.Array) -> jax.Array:
    """{-1,+1} per channel; exactly zero maps to -1 (as the reference)."""
    return jnp.where(h > 0, 1.0, -1.0).astype(h.dtype)


def bits_to_indices(bits: jax.Array, num_codebooks: int) -> jax.Array:
    """[..., C] signs -> [..., num_codebooks] int32 codes, little endian inside each group."""
    *lead, c = bits.shape
    d = c // num_codebooks
    on = (bits > 0).reshape(*lead, num_codebooks, d).astype(jnp.int32)
    return jnp.sum(on << jnp.arange(d, dtype=jnp.int32), axis=-1)


def indices_to_bits(indices: jax.Array, bits_per_group: int, dtype=jnp.float32) -> jax.Array:
    """Inverse of ``bits_to_indices``: [..., G] codes -> [..., G*d] signs."""
    on = (indices[..., None] >> jnp.arange(bits_per_group, dtype=jnp.int32)) & 1
    signs = jnp.where(on > 0, 1.0, -1.0).astype(dtype)
    return signs.reshape(*indices.shape[:-1], indices.shape[-1] * bits_per_group)


def codebook(bits_per_group: int, dtype=jnp.float32) -> jax.Array:
    """All 2^d codes as {-1,+1} rows: row j has +1 at dim k iff bit k of j is set."""
    return indices_to_bits(jnp.arange(2 ** bits_per_group, dtype=jnp.int32)[:, None],
                           bits_per_group, dtype)


@dataclasses.dataclass
class QuantizerLosses:
    per_sample_entropy: jax.Array
    codebook_entropy: jax.Array
    entropy_aux_loss: jax.Array
    commitment: jax.Array


jax.tree_util.register_dataclass(
    QuantizerLosses,
    data_fields=["per_sample_entropy", "codebook_entropy", "entropy_aux_loss", "commitment"],
    meta_fields=[])


def quantizer_losses(h: jax.Array, num_codebooks: int, *, temperature: float = 0.01,
                     sample_minimization_weight: float = 1.0,
                     batch_maximization_weight: float = 1.0,
                     precision: PrecisionLike = None) -> QuantizerLosses:
    """Entropy and commitment losses of the quantizer on pre-quantization ``h`` [..., C].

    Per group, logits over the 2^d codes are 2<x, code>; the codebook entropy averages
    the code probabilities over every position *and* group. The commitment loss is the
    mean over all elements (the intended behaviour; the reference averages a few batch
    rows only when num_codebooks > 1).
    """
    *lead, c = h.shape
    d = c // num_codebooks
    x = h.astype(jnp.float32).reshape(-1, num_codebooks, d)
    logits = 2.0 * jnp.einsum("ngd,kd->ngk", x, codebook(d), precision=lax_precision(precision))
    logits = logits / temperature
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    probs = jnp.exp(log_probs)
    per_sample = jnp.mean(-jnp.sum(probs * log_probs, axis=-1))
    avg_probs = jnp.mean(probs, axis=(0, 1))
    cb_entropy = -jnp.sum(avg_probs * jnp.log(avg_probs + 1e-5))
    aux = sample_minimization_weight * per_sample - batch_maximization_weight * cb_entropy
    q = jax.lax.stop_gradient(quantize_signs(x))
    commitment = jnp.mean((x - q) ** 2)
    return QuantizerLosses(per_sample, cb_entropy, aux, commitment)


def straight_through(h: jax.Array) -> jax.Array:
    """Forward: signs; backward: identity (h + stop_gradient(q - h), as the reference)."""
    return h + jax.lax.stop_gradient(quantize_signs(h) - h)


class BinaryAutoencoder(nn.Module):
    """Encoder + decoder (the quantizer has no params). Methods: encode_pre, decode."""
    config: TokenizerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        self.encoder = Encoder(self.config, **kw)
        self.decoder = Decoder(self.config, **kw)

    def encode_pre(self, images):
        """Images [B,H,W,3] in [-1,1] -> pre-quantization latent [B,H/f,W/f,z]."""
        return self.encoder(images)

    def decode(self, bits, noise=None):
        return self.decoder(bits, noise)

    def __call__(self, images, noise=None):
        """Training forward: straight-through quantization; returns (recon, h)."""
        h = self.encoder(images)
        return self.decoder(straight_through(h), noise), h


def abstract_tokenizer_params(config: TokenizerConfig, param_dtype=jnp.float32):
    """Param shapes of the tokenizer without allocating it."""
    f = config.downsample_factor
    model = BinaryAutoencoder(config, param_dtype=param_dtype)
    images = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
    noise = jax.ShapeDtypeStruct((1, 1, 1, config.z_channels), jnp.float32) \
        if config.gan_decoder else None
    return abstract_params(model, images, noise)
