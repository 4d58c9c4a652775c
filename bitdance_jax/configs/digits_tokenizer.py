"""Tiny binary tokenizer on scikit-learn's digits: 32x32 images -> a 4x4 grid of 32-bit tokens
(8x down, 4 groups of 8 bits, like ae_d16c32's 32 bits), about 3 minutes on 2 CPU cores.
Smoke-test the optional terms with --config.tokenizer_loss.adversarial_weight=0.1 and
--config.tokenizer_loss.perceptual_weight=1.0
--config.tokenizer_loss.perceptual_network=bitdance_jax.tokenizer.losses:random_conv_features"""
from bitdance_jax.configs.common import base_config, tokenizer_config


def get_config():
    c = base_config("tokenizer")
    c.tokenizer = tokenizer_config(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=32,
                                   num_codebooks=4)
    c.data.source = "digits"
    c.data.image_size = 32
    c.global_batch_size = 32
    c.num_steps = 400
    c.optim.lr = 2e-3
    c.optim.min_lr = 1e-4
    c.optim.warmup_steps = 50
    c.optim.decay_start = 200
    c.optim.ema_decay = 0.99
    c.log_every = 100
    c.checkpoint.every_steps = 200
    return c
