"""Tiny text-to-image BitDance from scratch on scikit-learn's digits captioned "a handwritten
digit seven": a 2-layer random Qwen3 over a word-level tokenizer built from the captions (in
``<workdir>/text_tokenizer``), 4 latents per step, up to 4 samples packed per row. Needs the
tokenizer of configs/digits_tokenizer.py (``--config.tokenizer_dir=<its workdir>/export``)."""
from bitdance_jax.data.captions import digit_caption
from bitdance_jax.configs.common import t2i_base_config


def get_config():
    c = t2i_base_config()
    c.llm.update(dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32))
    c.head.update(dict(ch_latent=128, depth_latent=2, depth_adanln=1, parallel_num=4,
                       diff_batch_mul=2))
    c.data.source = "digits"
    c.data.image_size = 32
    c.data.buckets = ((32, 32),)
    c.data.max_samples_per_row = 4
    c.global_batch_size = 16          # rows (64 captioned digits a step)
    c.num_steps = 1500
    c.optim.lr = 1e-3
    c.optim.min_lr = 1e-5
    c.optim.warmup_steps = 100
    c.optim.decay_start = 750
    c.optim.ema_decay = 0.995
    c.optim.no_decay_names = ("embed_tokens",)
    c.log_every = 100
    c.checkpoint.every_steps = 500
    c.sample.prompts = tuple(digit_caption(d) for d in range(10))
    c.sample.num_images = 4
    c.sample.cfg_scale = 3.0
    c.sample.num_steps = 25
    return c
