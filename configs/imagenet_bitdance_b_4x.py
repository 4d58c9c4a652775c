"""BitDance-B-4x on ImageNet 256 with the reference recipe
(``bitdance_jax.train_config.imagenet_bitdance``).

    python -m bitdance_jax.train --config configs/imagenet_bitdance_b_4x.py --workdir DIR \
        --config.tokenizer_dir=PORTED_AE_D16C32 --config.data.path=/data/imagenet/train
"""
from bitdance_jax.train_config import imagenet_bitdance


def get_config():
    return imagenet_bitdance("B", 4)
