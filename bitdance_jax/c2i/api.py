"""User-facing class-conditional BitDance: load a ported or trained directory, sample images.

    import bitdance_jax as bd
    model = bd.load_model(DIR)
    images = model.sample(class_ids=[207, 360], seed=0, cfg_scale=4.0)   # uint8 [B, H, W, 3]
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from bitdance_jax import hub
from bitdance_jax import images as image_lib
from bitdance_jax.c2i import sampler
from bitdance_jax.c2i import config as c2i_config
from bitdance_jax.c2i import io as c2i_io
from bitdance_jax.c2i.config import BitDanceConfig
from bitdance_jax.c2i.io import KIND, save_model  # noqa: F401  (public names)
from bitdance_jax.nn.precision import PrecisionLike
from bitdance_jax.parallel import sharding
from bitdance_jax.tokenizer.api import Tokenizer
from bitdance_jax.tokenizer.model import TokenizerConfig

DEFAULT_SAMPLING_STEPS = 100   # Euler-Maruyama steps of the head per AR step (reference default)


class BitDanceModel:
    """A loaded class-conditional model with its tokenizer.

    ``default_cfg_scale`` None: the released model's guidance, else 4.6 (with a note).
    ``dtype`` None: the backend's sampling default (bf16-mixed on GPU/TPU, float32 on CPU).
    ``quantize``: the mode of the model and head kernels in ``params`` (``nn.quant``).
    """

    def __init__(self, config: BitDanceConfig, params, tokenizer: Tokenizer, *,
                 default_cfg_scale: float | None = None, dtype=None, mesh=None,
                 decode_chunk: int = 32, precision: PrecisionLike = None,
                 attention_impl: str = "auto", quantize: str | None = None):
        if tokenizer.config.z_channels != config.latent_dim:
            raise ValueError(f"tokenizer has {tokenizer.config.z_channels} latent channels, "
                             f"the model {config.latent_dim}")
        self.config = config
        self.params = {"model": params["model"], "head": params["head"]}
        self.tokenizer = tokenizer
        if default_cfg_scale is None:
            default_cfg_scale = c2i_config.default_cfg_scale(config)
        self.default_cfg_scale = float(default_cfg_scale)
        self.sampler = sampler.Sampler(config, dtype=dtype, mesh=mesh, precision=precision,
                                       attention_impl=attention_impl, quantize=quantize)
        self.decode_chunk = decode_chunk
        self._decode = jax.jit(functools.partial(tokenizer.model.apply, method="decode"))
        self._tokenizer_params = None

    @property
    def image_size(self) -> int:
        return self.config.grid_size * self.tokenizer.downsample_factor

    def sample_latents(self, class_ids: Sequence[int], seed: int = 0, cfg_scale: float | None = None,
                       num_sampling_steps: int = DEFAULT_SAMPLING_STEPS,
                       sample_indices: Sequence[int] | None = None) -> np.ndarray:
        """Binary latents [B, h, w, C] (NHWC). Sample i depends only on (seed, sample_indices[i],
        class, cfg, steps); ``sample_indices`` defaults to 0..B-1."""
        cfg_scale = self.default_cfg_scale if cfg_scale is None else float(cfg_scale)
        return self.sampler.sample(self.params, class_ids, seed=seed, cfg_scale=cfg_scale,
                                   num_sampling_steps=num_sampling_steps,
                                   sample_indices=sample_indices)

    def decode(self, latents) -> np.ndarray:
        """Latents [B, h, w, C] -> uint8 images [B, H, W, 3] (the reference's rounding:
        clamp(127.5 x + 128, 0, 255) truncated). Chunks of ``decode_chunk`` images are split
        over the mesh's data axis."""
        latents = np.asarray(latents, np.float32)
        if self.tokenizer.config.gan_decoder:
            images = self.tokenizer.decode(latents)
        else:
            mesh = self.sampler.mesh
            shards = self.sampler.num_shards
            if self._tokenizer_params is None:
                self._tokenizer_params = jax.device_put(self.tokenizer.params,
                                                        sharding.replicated(mesh))
            chunk = -(-self.decode_chunk // shards) * shards
            images = []
            for i in range(0, len(latents), chunk):
                part = latents[i:i + chunk]
                padded = np.pad(part, ((0, -len(part) % shards),) + ((0, 0),) * 3)
                out = self._decode({"params": self._tokenizer_params},
                                   jax.device_put(padded, NamedSharding(mesh, PartitionSpec("data"))))
                images.append(np.asarray(out)[:len(part)])
            images = np.concatenate(images)
        return image_lib.to_uint8_like_reference(images)

    def sample(self, class_ids: Sequence[int], seed: int = 0, cfg_scale: float | None = None,
               num_sampling_steps: int = DEFAULT_SAMPLING_STEPS,
               sample_indices: Sequence[int] | None = None) -> np.ndarray:
        """uint8 images [B, H, W, 3] of the given ImageNet classes."""
        return self.decode(self.sample_latents(class_ids, seed, cfg_scale, num_sampling_steps,
                                               sample_indices))


def load_model(path: str, dtype=None, mesh=None, precision: PrecisionLike = None,
               attention_impl: str = "auto", quantize: str | None = None) -> BitDanceModel:
    """Load a ported (or trained) class-conditional directory, or a Hub id ``hf:owner/name``
    (downloaded and ported once, see ``bitdance_jax.hub``). ``dtype`` None: bf16-mixed on
    GPU/TPU, float32 on CPU; ``precision``: matmul precision (``nn.precision``);
    ``quantize`` ("int8", "fp8"): weight-only quantized model and head kernels
    (``nn.quant``; a directory ported with ``--quantize`` loads as stored)."""
    meta, config, params = c2i_io.load(hub.resolve(path, quantize=quantize), quantize=quantize)
    # the decoder stays in float32 whatever the transformer's compute dtype
    tokenizer = Tokenizer(TokenizerConfig(**meta["tokenizer"]), params["tokenizer"],
                          precision=precision)
    return BitDanceModel(config, params, tokenizer, default_cfg_scale=c2i_config.default_cfg_scale(meta),
                         dtype=dtype, mesh=mesh, precision=precision,
                         attention_impl=attention_impl, quantize=meta.get("quantization"))
