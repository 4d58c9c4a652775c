"""Class-conditional BitDance architectures: the released ImageNet B/L/H models (1x, 4x, 16x
tokens per AR step) and a tiny one for CPU smoke runs, with the reference's guidance scales.

    from bitdance_jax.configs.bitdance_models import get_model
    config = get_model("BitDance-B-4x")      # a bitdance_jax.c2i.model.BitDanceConfig
"""
from bitdance_jax.c2i import config as c2i_config
from bitdance_jax.c2i.config import RELEASED_MODELS, BitDanceConfig

# A few-seconds-on-CPU model: the tiny golden architecture (4x4 grid, 4 tokens per step).
TINY = BitDanceConfig(dim=64, n_layer=2, n_head=4, diff_layers=2, diff_dim=64, diff_adanln_layers=2,
                      latent_dim=16, grid_size=4, cls_token_num=4, num_classes=10, parallel_num=4,
                      diff_batch_mul=2)
MODELS = {**RELEASED_MODELS, "tiny": TINY}


def get_model(name: str) -> BitDanceConfig:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name]


def default_cfg_scale(name: str) -> float:
    """The reference README's guidance for a listed released model, else the reference
    sampler's default 4.6 (``c2i.config.default_cfg_scale``, which prints a note)."""
    return c2i_config.default_cfg_scale(name)
