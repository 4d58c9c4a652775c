"""Tiny training configs of the multi-process tests (``--config tests/parallel/mp_configs.py:KIND``).

KIND: ``tokenizer`` (a tiny tokenizer on 8x8 digits), ``pipeline`` (that tokenizer, then a tiny
BitDance over its latent cache) or ``t2i`` (a tiny text-to-image model over a latent cache of
packed captioned digits; give ``--config.tokenizer_dir``). Small enough for 2 CPU cores.
"""
from bitdance_jax.configs.common import base_config, t2i_base_config, tokenizer_config
import ml_collections


def tokenizer():
    c = base_config("tokenizer")
    c.tokenizer = tokenizer_config(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=8,
                                   num_codebooks=2)
    c.data.image_size = 8
    c.data.num_threads = 1
    c.data.prefetch = 1
    c.global_batch_size = 8
    c.num_steps = 6
    # eps 1e-4: a param whose gradient is only float noise would otherwise move by +-lr in
    # Adam's step, amplifying last-bit differences of the cross-process reduction.
    c.optim.update(dict(lr=1e-3, warmup_steps=2, decay_start=3, ema_decay=0.9, eps=1e-4))
    c.log_every = 2
    c.checkpoint.update(dict(every_steps=2, keep=2))
    return c


def bitdance():
    c = base_config("bitdance")
    c.model.update(dict(dim=64, n_layer=1, n_head=4, diff_layers=1, diff_dim=64,
                        diff_adanln_layers=1, num_classes=10, parallel_num=4, cls_token_num=2,
                        diff_batch_mul=1))
    c.data.image_size = 8
    c.data.cache_latents = True   # the class latent cache: built by process 0, a barrier
    c.data.num_threads = 1
    c.data.prefetch = 1
    c.global_batch_size = 8
    c.num_steps = 4
    c.optim.update(dict(lr=1e-3, warmup_steps=0, eps=1e-4, ema_decay=0.9))
    c.log_every = 2
    c.checkpoint.update(dict(every_steps=2, keep=2))
    c.sample.update(dict(classes=(1, 7), per_class=2, num_steps=2, cfg_scale=2.0))
    return c


def pipeline():
    c = ml_collections.ConfigDict()
    c.kind = "pipeline"
    c.stages = ("tokenizer", "bitdance")
    c.tokenizer = tokenizer()
    c.bitdance = bitdance()
    c.bitdance.tokenizer_from_stage = "tokenizer"
    c.score_digits = True
    return c


def t2i():
    c = t2i_base_config()
    c.llm.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    c.head.update(dict(ch_latent=128, depth_latent=1, depth_adanln=1, parallel_num=4,
                       diff_batch_mul=1))
    c.data.image_size = 8
    c.data.buckets = ((8, 8),)
    c.data.max_samples_per_row = 2  # packed rows (2 samples: half the compile time of 3)
    c.data.cache_latents = True   # the packed-row latent cache: built by process 0, a barrier
    c.data.num_threads = 1
    c.data.prefetch = 1
    c.global_batch_size = 4
    c.num_steps = 4
    c.optim.update(dict(lr=3e-3, warmup_steps=1, decay_start=3, ema_decay=0.5))
    c.log_every = 2
    c.checkpoint.update(dict(every_steps=2, keep=2))
    c.sample.prompts = ()  # no grid during training: the test generates with the t2i CLI
    return c


def get_config(kind: str):
    return {"tokenizer": tokenizer, "bitdance": bitdance, "pipeline": pipeline,
            "t2i": t2i}[kind]()
