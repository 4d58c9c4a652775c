"""The ImageNet binary tokenizer ae_d16c32 (16x down, 32 bits in 4 groups of 8) at 256px.

The reference ships this tokenizer trained but not its training recipe; this config trains
the same architecture with reconstruction (L1 + L2) and the quantizer's entropy and
commitment losses. Start from the released weights with --config.init_from=PORTED_DIR.
Add the adversarial term with --config.tokenizer_loss.adversarial_weight=0.1 (a PatchGAN
trained in the same step from adversarial_start_step on) and a perceptual term with
--config.tokenizer_loss.perceptual_weight=1.0 --config.tokenizer_loss.perceptual_network=
module:factory (a frozen feature network, e.g. ported LPIPS VGG; see bitdance_jax.tokenizer.losses).
"""
from bitdance_jax.configs.common import base_config, tokenizer_config


def get_config():
    c = base_config("tokenizer")
    c.tokenizer = tokenizer_config()  # ch 256, ch_mult (1,1,2,2,4), 4 res blocks, z 32, 4 groups
    c.data.source = "folder"
    c.data.image_size = 256
    c.data.min_crop_frac = 0.8
    c.data.random_flip = True
    c.data.num_threads = 16
    c.global_batch_size = 256
    c.num_steps = 500_000
    c.compute_dtype = "bf16-mixed"
    c.mesh = (1, -1, 1)
    c.optim.update(dict(lr=1e-4, min_lr=1e-5, warmup_steps=5000, decay_start=250_000,
                        weight_decay=0.05, ema_decay=0.9999))
    c.tokenizer_loss.adversarial_start_step = 20_000  # used once adversarial_weight > 0
    c.log_every = 100
    c.sample_every = 5000
    c.checkpoint.every_steps = 2000
    return c
