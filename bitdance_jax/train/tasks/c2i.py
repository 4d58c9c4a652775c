"""The BitDance training task: the AR model and its diffusion head over the binary latents of a
frozen tokenizer, from images (encoded inside the step) or from a pre-encoded latent cache."""
from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from bitdance_jax.checkpointing import fingerprint
from bitdance_jax.data import latent_cache
from bitdance_jax.data.sources import make_source
from bitdance_jax import images as image_lib
from bitdance_jax.nn.precision import compute_dtype, lax_precision
from bitdance_jax.c2i.config import BitDanceConfig
from bitdance_jax.c2i.loss import bitdance_loss
from bitdance_jax.c2i.model import from_unscanned, init_params
from bitdance_jax.tokenizer.model import quantize_signs
from bitdance_jax.tokenizer.api import load_tokenizer
from bitdance_jax.train.tasks.base import Task

log = logging.getLogger(__name__)


# ``config.model`` fields that choose numerics, not the architecture (not in BitDanceConfig).
NUMERICS_FIELDS = ("precision", "matmul_precision", "attention")


def architecture_fields(model_config) -> dict:
    """``config.model`` without its numerics fields: BitDanceConfig keyword arguments."""
    return {k: v for k, v in model_config.to_dict().items() if k not in NUMERICS_FIELDS}


def model_config_from(config, tokenizer) -> BitDanceConfig:
    """``config.model`` plus the sizes the tokenizer and the image size fix."""
    f = tokenizer.downsample_factor
    if config.data.image_size % f:
        raise ValueError(f"image_size {config.data.image_size} is not a multiple of the "
                         f"tokenizer's downsampling factor {f}")
    return BitDanceConfig(**architecture_fields(config.model),
                          latent_dim=tokenizer.config.z_channels,
                          grid_size=config.data.image_size // f)


class BitDanceTask(Task):
    kind = "bitdance"

    def __init__(self, config, workdir: str | None = None, tokenizer=None):
        if tokenizer is None and not config.tokenizer_dir:
            raise ValueError("config.tokenizer_dir must name a trained or ported tokenizer "
                             "directory (train one with configs/*_tokenizer.py or port ae_d16c32)")
        super().__init__(config, workdir)
        self.tokenizer = tokenizer or load_tokenizer(config.tokenizer_dir)
        self.model_config = model_config_from(config, self.tokenizer)
        m = config.model
        self.dtype = compute_dtype(m.precision)
        lax_precision(m.matmul_precision)  # validates
        self.numerics = dict(precision=m.matmul_precision, attention_impl=m.attention)
        self.tokens_per_example = self.model_config.num_tokens
        self.from_images = not (config.data.source == "latent_cache" or config.data.cache_latents)

    # -- data ------------------------------------------------------------------------
    @functools.cached_property
    def tokenizer_digest(self) -> str:
        """Digest of the frozen tokenizer's params: what the latents (and export) pair with."""
        return fingerprint.tree_digest(self.tokenizer.params)

    def _encode_uint8(self, images: np.ndarray) -> np.ndarray:
        return self.tokenizer.encode(image_lib.from_uint8(images))

    def train_source(self):
        """The configured source; with ``data.cache_latents``, its latents (encoded once)."""
        c = self.config.data
        source = make_source(c)
        if c.source != "latent_cache" and not c.cache_latents:
            return source
        if c.source != "latent_cache":
            cache_dir = c.cache_dir or os.path.join(self.workdir, "latent_cache")
            source = latent_cache.build_class_cache(
                source, self._encode_uint8, cache_dir, image_size=c.image_size,
                num_classes=self.model_config.num_classes,
                tokenizer_config=self.tokenizer.config.to_dict(),
                tokenizer_digest=self.tokenizer_digest, with_flips=c.random_flip,
                crops=c.cache_crops, min_crop_frac=c.min_crop_frac)
        else:
            self._check_cache_tokenizer(source.meta.get("tokenizer_params"), c.cache_dir)
        if source.num_crops == 1 and c.min_crop_frac < 1.0:
            log.warning("training from cached latents with a single crop per image: the random "
                        "crops of data.min_crop_frac=%s are not applied (set data.cache_crops > 1)",
                        c.min_crop_frac)
        return source

    def _check_cache_tokenizer(self, cached: str | None, cache_dir: str) -> None:
        """A given cache must hold latents of ``tokenizer_dir``'s tokenizer, the one exported."""
        if cached is None:
            log.warning("latent cache %s records no tokenizer digest (built before they were "
                        "recorded): cannot check it was encoded by %s", cache_dir,
                        self.config.tokenizer_dir)
        elif cached != self.tokenizer_digest:
            raise ValueError(f"latent cache {cache_dir} was encoded by another tokenizer "
                             f"({cached}) than {self.config.tokenizer_dir} "
                             f"({self.tokenizer_digest}); rebuild the cache or set "
                             "config.tokenizer_dir to the tokenizer that encoded it")

    # -- model -----------------------------------------------------------------------
    def init(self, rng):
        return init_params(self.model_config, rng)

    def frozen(self):
        return {"tokenizer": self.tokenizer.params} if self.from_images else {}

    def abstract_batch(self, global_batch: int) -> dict:
        """The pipeline's batch (``data.pipeline.TrainRecords``): images or cached latents."""
        b, mc = global_batch, self.model_config
        out = {"label": jax.ShapeDtypeStruct((b,), jnp.int32),
               "index": jax.ShapeDtypeStruct((b,), jnp.int32)}
        if self.from_images:
            s = self.config.data.image_size
            out["image"] = jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8)
        else:
            g = mc.grid_size
            out["latents"] = jax.ShapeDtypeStruct((b, g, g, mc.latent_dim), jnp.int8)
        return out

    def loss(self, params, frozen, batch, rng, step):
        if "latents" in batch:
            latents = batch["latents"].astype(jnp.float32)
        else:
            images = image_lib.from_uint8(batch["image"])
            h = self.tokenizer.model.apply({"params": frozen["tokenizer"]}, images,
                                           method="encode_pre")
            latents = jax.lax.stop_gradient(quantize_signs(h.astype(jnp.float32)))
        lc = self.config.loss
        loss = bitdance_loss(params, latents, batch["label"], rng, config=self.model_config,
                             bit_flip_rate=lc.bit_flip_rate, label_drop=lc.label_drop,
                             dtype=self.dtype, **self.numerics)
        return loss, {}

    def params_from_checkpoint(self, meta, params):
        if "model" not in params or "head" not in params:
            raise ValueError(f"{self.config.init_from} holds no BitDance model params "
                             "(expected 'model' and 'head')")
        # directories hold the unscanned layout; train in the configured one
        return from_unscanned({"model": params["model"], "head": params["head"]},
                              self.model_config)

    # -- samples / export ------------------------------------------------------------
    def sample_class_ids(self) -> np.ndarray:
        s = self.config.sample
        classes = list(s.classes) or list(range(min(self.model_config.num_classes, 10)))
        return np.repeat(np.asarray(classes, np.int32), s.per_class)

    def sample_images(self, ema_params, class_ids, seed: int) -> np.ndarray:
        """uint8 [B,H,W,3] class-conditional samples with the jitted sampler."""
        from bitdance_jax.c2i.sampler import Sampler
        from bitdance_jax.parallel.sharding import make_mesh
        s = self.config.sample
        params = jax.device_get({"model": ema_params["model"], "head": ema_params["head"]})
        mesh = make_mesh(devices=jax.local_devices())  # process 0 samples on its own devices
        latents = Sampler(self.model_config, dtype=self.dtype, mesh=mesh, **self.numerics).sample(
            params, class_ids, seed=seed, cfg_scale=s.cfg_scale, num_sampling_steps=s.num_steps)
        return image_lib.to_uint8(self.tokenizer.decode(latents))

    def sample_grid(self, ema_params, source, path, seed):
        """One row per class (``sample.per_class`` columns); the images and their classes
        are also written next to the PNG (``.npz``) for scoring."""
        del source
        ids = self.sample_class_ids()
        images = self.sample_images(ema_params, ids, seed)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        np.savez(os.path.splitext(path)[0] + ".npz", images=images, labels=ids)
        return image_lib.save_png(image_lib.make_grid(images, self.config.sample.per_class), path)

    def export(self, ema_params, dst):
        from bitdance_jax.c2i.io import save_model
        params = {"model": ema_params["model"], "head": ema_params["head"],
                  "tokenizer": jax.device_get(self.tokenizer.params)}
        return save_model(dst, self.model_config, params, self.tokenizer.config,
                          default_cfg_scale=self.config.sample.cfg_scale, overwrite=True,
                          source="bitdance_jax.train")
