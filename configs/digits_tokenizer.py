"""Tiny binary tokenizer on scikit-learn's digits (32x32, 4x down, 16 bits in 2 groups)."""
from bitdance_jax.train_config import base_config, tokenizer_config


def get_config():
    c = base_config("tokenizer")
    c.tokenizer = tokenizer_config(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16,
                                   num_codebooks=2)
    c.data.source = "digits"
    c.data.image_size = 32
    c.global_batch_size = 64
    c.num_steps = 600
    c.optim.lr = 2e-3
    c.optim.min_lr = 1e-4
    c.optim.warmup_steps = 50
    c.optim.decay_start = 300
    c.optim.ema_decay = 0.99
    c.log_every = 50
    c.checkpoint.every_steps = 200
    return c
