"""User-facing tokenizer: port released weights, load a ported directory, encode/decode."""
from __future__ import annotations

import functools
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bitdance_jax import checkpoint, porting
from bitdance_jax.tokenizer import (BinaryAutoencoder, TokenizerConfig, bits_to_indices,
                                    quantize_signs)

KIND = "tokenizer"


def infer_tokenizer_config(state_dict: Mapping[str, np.ndarray], prefix: str = "",
                           num_codebooks: int | None = None) -> TokenizerConfig:
    """Read the ddconfig off a tokenizer state_dict's keys and shapes.

    ``num_codebooks`` (bit groups for indices and the entropy loss) is not stored in the
    weights; by default each group holds 8 bits (ae_d16c32: 4 groups).
    """
    def shape(key):
        return porting.key_shape(state_dict, prefix + key, "a BitDance tokenizer")

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = sorted({int(m.group(1)) for k in state_dict
                     if (m := re.match(re.escape(prefix) + r"encoder\.down\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))):
        raise porting.PortingError(f"not a BitDance tokenizer: encoder levels {levels}")
    num_res_blocks = len({int(m.group(1)) for k in state_dict
                          if (m := re.match(re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\.", k))})
    ch_mult = [shape(f"encoder.down.{l}.block.0.conv1.weight")[0] // ch for l in levels]
    z_channels = shape("encoder.conv_out.weight")[0]
    out_ch = shape("decoder.conv_out.weight")[0]
    gan_decoder = shape("decoder.conv_in.weight")[1] == 2 * z_channels
    if num_codebooks is None:
        num_codebooks = max(1, z_channels // 8)
    return TokenizerConfig(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                           z_channels=z_channels, in_channels=in_channels, out_ch=out_ch,
                           num_codebooks=num_codebooks, gan_decoder=gan_decoder)


def abstract_tokenizer_params(config: TokenizerConfig, param_dtype=jnp.float32):
    """Param shapes of the tokenizer without allocating it."""
    f = config.downsample_factor
    model = BinaryAutoencoder(config, param_dtype=param_dtype)
    images = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
    noise = jax.ShapeDtypeStruct((1, 1, 1, config.z_channels), jnp.float32) \
        if config.gan_decoder else None
    return porting.abstract_params(model, images, noise)


def port_tokenizer_state_dict(state_dict: Mapping[str, np.ndarray], config: TokenizerConfig,
                              prefix: str = "", what: str = "tokenizer checkpoint") -> dict:
    """Strictly port ``encoder.*``/``decoder.*`` (under ``prefix``) to Flax params."""
    sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return porting.convert_state_dict(
        sub, abstract_tokenizer_params(config),
        ignore=lambda k: k.startswith("quantize."),  # GFQ buffers: no params
        what=what)


class Tokenizer:
    """A loaded binary tokenizer. Images are float NHWC in [-1, 1]."""

    def __init__(self, config: TokenizerConfig, params, dtype=jnp.float32, chunk_size: int = 16):
        self.config = config
        self.params = params
        self.chunk_size = chunk_size
        self.model = BinaryAutoencoder(config, dtype=dtype)
        self._encode_pre = jax.jit(functools.partial(self.model.apply, method="encode_pre"))
        self._decode = jax.jit(functools.partial(self.model.apply, method="decode"))

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def _check_images(self, images) -> np.ndarray:
        images = np.asarray(images, np.float32)
        f, c = self.downsample_factor, self.config.in_channels
        if images.ndim != 4 or images.shape[-1] != c:
            raise ValueError(f"images must be [B,H,W,{c}] (NHWC), got shape {images.shape}")
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"image size {images.shape[1]}x{images.shape[2]} is not a multiple "
                             f"of the tokenizer's downsampling factor {f}")
        return images

    def _chunked(self, fn, x, *extra):
        outs = []
        for i in range(0, x.shape[0], self.chunk_size):
            outs.append(np.asarray(fn({"params": self.params}, x[i:i + self.chunk_size],
                                      *[e[i:i + self.chunk_size] for e in extra])))
        return np.concatenate(outs, axis=0)

    def encode_pre_quant(self, images) -> np.ndarray:
        """Encoder output before the sign [B,H/f,W/f,z] (float)."""
        return self._chunked(self._encode_pre, self._check_images(images))

    def encode(self, images) -> np.ndarray:
        """Images -> binary latents in {-1,+1}, [B,H/f,W/f,z]."""
        return np.asarray(quantize_signs(jnp.asarray(self.encode_pre_quant(images))))

    def encode_indices(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(bits, indices [B,H/f,W/f,num_codebooks]) with little-endian bits per group."""
        bits = self.encode(images)
        if self.config.bits_per_group > 31:
            raise ValueError(f"{self.config.bits_per_group} bits per group do not fit int32 "
                             "indices; use a config with more codebooks")
        return bits, np.asarray(bits_to_indices(jnp.asarray(bits), self.config.num_codebooks))

    def decode(self, bits, noise=None, seed: int = 0) -> np.ndarray:
        """Binary latents [B,h,w,z] -> images [B,h*f,w*f,out_ch] (float, about [-1,1]).

        The GAN decoder draws its N(0,1) noise from ``seed`` unless ``noise`` is given.
        """
        bits = np.asarray(bits, np.float32)
        z = self.config.z_channels
        if bits.ndim != 4 or bits.shape[-1] != z:
            raise ValueError(f"latents must be [B,h,w,{z}] (NHWC, {z} channels), got {bits.shape}")
        if not self.config.gan_decoder:
            return self._chunked(self._decode, bits)
        if noise is None:
            noise = np.asarray(jax.random.normal(jax.random.key(seed), bits.shape, jnp.float32))
        return self._chunked(self._decode, bits, np.asarray(noise, np.float32))


def save_tokenizer(dst: str, config: TokenizerConfig, params, *, source: str | None = None,
                   overwrite: bool = False) -> str:
    extra = {"source": source} if source else None
    return checkpoint.save_param_dir(dst, KIND, config.to_dict(), params, overwrite=overwrite,
                                     extra=extra)


def load_tokenizer(path: str, dtype=jnp.float32) -> Tokenizer:
    """Load a ported (or trained) tokenizer directory."""
    meta = checkpoint.read_meta(path)
    if meta.get("kind") == KIND:
        cfg_dict = meta["config"]
        _, params = checkpoint.load_param_dir(path, KIND)
    elif "tokenizer" in meta:  # a model directory that embeds its tokenizer
        cfg_dict = meta["tokenizer"]
        _, all_params = checkpoint.load_param_dir(path)
        params = all_params["tokenizer"]
    else:
        raise checkpoint.CheckpointError(f"{path} holds no tokenizer (kind '{meta.get('kind')}')")
    return Tokenizer(TokenizerConfig(**cfg_dict), params, dtype=dtype)
