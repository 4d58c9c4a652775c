"""Tiny class-conditional BitDance on scikit-learn's digits: next-patch prediction of
parallel_num 4 tokens per step, label drop for classifier-free guidance. Needs the tokenizer
of configs/digits_tokenizer.py (``--config.tokenizer_dir=<its workdir>/export``)."""
from bitdance_jax.configs.common import base_config


def get_config():
    c = base_config("bitdance")
    c.model.update(dict(dim=128, n_layer=4, n_head=4, diff_layers=2, diff_dim=128,
                        diff_adanln_layers=1, num_classes=10, parallel_num=4,
                        parallel_mode="patch", cls_token_num=4, diff_batch_mul=2))
    c.loss.bit_flip_rate = 0.1
    c.loss.label_drop = 0.1
    c.data.source = "digits"
    c.data.image_size = 32
    c.data.cache_latents = True   # encode the 1,797 digits once with the frozen tokenizer
    c.global_batch_size = 64
    c.num_steps = 1000
    c.optim.lr = 1e-3
    c.optim.min_lr = 1e-5
    c.optim.warmup_steps = 100
    c.optim.decay_start = 500
    c.optim.ema_decay = 0.995
    c.log_every = 100
    c.checkpoint.every_steps = 500
    c.sample.cfg_scale = 3.0
    c.sample.num_steps = 25
    c.sample.per_class = 8
    return c
