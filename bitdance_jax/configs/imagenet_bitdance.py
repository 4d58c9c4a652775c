"""Class-conditional BitDance on ImageNet 256 with the reference recipe
(``bitdance_jax.configs.common.imagenet_bitdance``): the argument names the released size and
tokens per step, ``SIZE,PARALLEL`` with SIZE in B, L, H and PARALLEL in 1, 4, 16 (default B,4).

    python -m bitdance_jax.train --config configs/imagenet_bitdance.py:B,4 --workdir DIR \
        --config.tokenizer_dir=PORTED_AE_D16C32 --config.data.path=/data/imagenet/train
"""
from bitdance_jax.c2i.config import MODEL_SIZES
from bitdance_jax.configs.common import imagenet_bitdance

PARALLEL_NUMS = (1, 4, 16)


def get_config(arg: str | None = None):
    size, _, parallel = (arg or "B,4").partition(",")
    size = size.strip().upper()
    if size not in MODEL_SIZES or not parallel.strip().isdigit() \
            or int(parallel) not in PARALLEL_NUMS:
        raise ValueError(f"imagenet_bitdance config argument {arg!r}: write SIZE,PARALLEL with "
                         f"SIZE one of {sorted(MODEL_SIZES)} and PARALLEL one of {PARALLEL_NUMS}, "
                         "e.g. configs/imagenet_bitdance.py:B,4")
    return imagenet_bitdance(size, int(parallel))
