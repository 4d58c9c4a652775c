"""User-facing tokenizer: load and save a tokenizer directory, encode and decode images."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bitdance_jax import hub
from bitdance_jax.nn.precision import PrecisionLike
from bitdance_jax.tokenizer import io as tokenizer_io
from bitdance_jax.tokenizer.io import KIND, save_tokenizer  # noqa: F401  (public names)
from bitdance_jax.tokenizer.model import (BinaryAutoencoder, TokenizerConfig,  # noqa: F401
                                          abstract_tokenizer_params, bits_to_indices,
                                          quantize_signs)


class Tokenizer:
    """A loaded binary tokenizer. Images are float NHWC in [-1, 1]. ``dtype``/``precision``:
    the numerics policy (``nn.precision``; float32 by default)."""

    def __init__(self, config: TokenizerConfig, params, dtype=jnp.float32, chunk_size: int = 16,
                 precision: PrecisionLike = None):
        self.config = config
        self.params = params
        self.chunk_size = chunk_size
        self.model = BinaryAutoencoder(config, dtype=dtype, precision=precision)
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


def load_tokenizer(path: str, dtype=jnp.float32, precision: PrecisionLike = None) -> Tokenizer:
    """Load a ported (or trained) tokenizer directory, or a Hub id ``hf:owner/name``."""
    config, params = tokenizer_io.load(hub.resolve(path))
    return Tokenizer(config, params, dtype=dtype, precision=precision)
