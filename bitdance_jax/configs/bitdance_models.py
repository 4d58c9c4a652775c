"""Class-conditional BitDance architectures by name: the released ImageNet B/L/H models (1x,
4x, 16x tokens per AR step) and a tiny one for CPU smoke runs.

    from bitdance_jax.configs.bitdance_models import MODELS
    config = MODELS["BitDance-B-4x"]      # a bitdance_jax.c2i.config.BitDanceConfig

Their guidance: ``bitdance_jax.c2i.config.default_cfg_scale``.
"""
from bitdance_jax.c2i.config import RELEASED_MODELS, BitDanceConfig

# A few-seconds-on-CPU model: the tiny golden architecture (4x4 grid, 4 tokens per step).
TINY = BitDanceConfig(dim=64, n_layer=2, n_head=4, diff_layers=2, diff_dim=64, diff_adanln_layers=2,
                      latent_dim=16, grid_size=4, cls_token_num=4, num_classes=10, parallel_num=4,
                      diff_batch_mul=2)
MODELS = {**RELEASED_MODELS, "tiny": TINY}
