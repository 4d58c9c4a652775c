"""The tokenizer training task: reconstruction, the quantizer's entropy and commitment losses, optional perceptual and adversarial terms."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bitdance_jax import images as image_lib
from bitdance_jax.data.augment import center_crop
from bitdance_jax.nn.layers import DTYPES
from bitdance_jax.tokenizer import losses as tokenizer_losses
from bitdance_jax.tokenizer.api import save_tokenizer
from bitdance_jax.tokenizer.model import BinaryAutoencoder, TokenizerConfig, quantizer_losses
from bitdance_jax.train.tasks.base import Task
from bitdance_jax.nn.precision import lax_precision

class TokenizerTask(Task):
    """Binary tokenizer: reconstruction (L1/L2) + the quantizer's entropy and commitment losses,
    with an optional perceptual term (frozen feature network) and adversarial term (a PatchGAN
    trained in the same step: params are then {"tokenizer": ..., "discriminator": ...})."""
    kind = "tokenizer"

    def __init__(self, config, workdir: str | None = None):
        super().__init__(config, workdir)
        self.tok_config = TokenizerConfig(**config.tokenizer.to_dict())
        dtype = DTYPES[config.compute_dtype]
        precision = config.get("matmul_precision", "default")
        lax_precision(precision)  # validates
        self.model = BinaryAutoencoder(self.tok_config, dtype=dtype,
                                       precision=precision)
        self.image_size = config.data.image_size
        f = self.tok_config.downsample_factor
        if self.image_size % f:
            raise ValueError(f"image_size {self.image_size} not a multiple of the tokenizer's "
                             f"downsampling factor {f}")
        self.tokens_per_example = (self.image_size // f) ** 2
        lc = config.tokenizer_loss
        self.discriminator = None
        if lc.adversarial_weight > 0:
            if lc.adversarial_loss not in tokenizer_losses.ADVERSARIAL_LOSSES:
                raise ValueError(f"unknown tokenizer_loss.adversarial_loss "
                                 f"{lc.adversarial_loss!r}; use one of "
                                 f"{tokenizer_losses.ADVERSARIAL_LOSSES}")
            self.discriminator = tokenizer_losses.PatchDiscriminator(
                ch=lc.discriminator_ch, num_layers=lc.discriminator_layers, dtype=dtype)
        self.perceptual_apply = self.perceptual_params = None
        if lc.perceptual_weight > 0:
            self.perceptual_apply, self.perceptual_params = \
                tokenizer_losses.load_feature_network(lc.perceptual_network)

    def _noise(self, rng, batch, size):
        if not self.tok_config.gan_decoder:
            return None
        f = self.tok_config.downsample_factor
        return jax.random.normal(rng, (batch, size // f, size // f, self.tok_config.z_channels))

    def _tokenizer_params(self, params):
        return params["tokenizer"] if self.discriminator is not None else params

    def _init_discriminator(self, rng):
        images = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        return self.discriminator.init(jax.random.fold_in(rng, 1), images)["params"]

    def init(self, rng):
        images = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        tok = self.model.init(rng, images, self._noise(rng, 1, self.image_size))["params"]
        if self.discriminator is None:
            return tok
        return {"tokenizer": tok, "discriminator": self._init_discriminator(rng)}

    def frozen(self):
        return {} if self.perceptual_params is None else {"perceptual": self.perceptual_params}

    def loss(self, params, frozen, batch, rng, step):
        """Total loss and its terms; ``step`` (traced) gates the adversarial terms."""
        lc = self.config.tokenizer_loss
        images = image_lib.from_uint8(batch["image"])
        recon, h = self.model.apply({"params": self._tokenizer_params(params)}, images,
                                    self._noise(rng, images.shape[0], images.shape[1]))
        recon = recon.astype(jnp.float32)
        err = recon - images
        l1, l2 = jnp.mean(jnp.abs(err)), jnp.mean(err ** 2)
        q = quantizer_losses(h, self.tok_config.num_codebooks)
        loss = (lc.l1_weight * l1 + lc.l2_weight * l2 + lc.entropy_weight * q.entropy_aux_loss
                + lc.commitment_weight * q.commitment)
        aux = {"l1": l1, "l2": l2, "entropy_aux": q.entropy_aux_loss,
               "commitment": q.commitment, "codebook_entropy": q.codebook_entropy}
        if self.perceptual_apply is not None:
            feats = self.perceptual_apply(frozen["perceptual"], jnp.concatenate([images, recon]))
            real, fake = zip(*(jnp.split(f, 2, axis=0) for f in feats))
            aux["perceptual"] = tokenizer_losses.perceptual_distance(real, fake)
            loss = loss + lc.perceptual_weight * aux["perceptual"]
        if self.discriminator is not None:
            gen, disc = tokenizer_losses.adversarial_losses(
                self.discriminator, params["discriminator"], images, recon,
                kind=lc.adversarial_loss,
                active=step >= lc.adversarial_start_step)
            aux.update(generator_adversarial=gen, discriminator=disc)
            loss = loss + lc.adversarial_weight * gen + lc.discriminator_weight * disc
        return loss, aux

    def params_from_checkpoint(self, meta, params):
        """The tokenizer part of any checkpoint; a fresh discriminator where one is trained."""
        tok = params.get("tokenizer", params) if meta.get("kind") != "tokenizer" else params
        if self.discriminator is None:
            return tok
        disc = nn.unbox(self._init_discriminator(jax.random.PRNGKey(self.config.seed)))
        return {"tokenizer": tok, "discriminator": disc}

    def sample_grid(self, ema_params, source, path, seed):
        """Top row: real images; bottom row: their reconstructions by the EMA params."""
        n = min(8, len(source))
        real = np.stack([center_crop(source[i]["image"], self.image_size) for i in range(n)])
        x = jnp.asarray(image_lib.from_uint8(real))
        noise = self._noise(jax.random.PRNGKey(seed), n, self.image_size)
        recon, _ = jax.jit(self.model.apply)({"params": self._tokenizer_params(ema_params)}, x,
                                             noise)
        grid = image_lib.make_grid(np.concatenate([real, image_lib.to_uint8(np.asarray(recon))]), n)
        return image_lib.save_png(grid, path)

    def export(self, ema_params, dst):
        """Saves only the tokenizer (not the discriminator) as a tokenizer directory."""
        params = jax.device_get(self._tokenizer_params(ema_params))
        return save_tokenizer(dst, self.tok_config, params, overwrite=True,
                              source="bitdance_jax.train")
