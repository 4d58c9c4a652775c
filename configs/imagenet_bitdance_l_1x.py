"""BitDance-L-1x on ImageNet 256 with the reference recipe (see imagenet_bitdance_common.py).

    python -m bitdance_jax.train --config configs/imagenet_bitdance_l_1x.py --workdir DIR \
        --config.tokenizer_dir=PORTED_AE_D16C32 --config.data.path=/data/imagenet/train
"""
import importlib.util
import os


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_bitdance_common.py")
    spec = importlib.util.spec_from_file_location("imagenet_bitdance_common", path)
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    return common.imagenet_bitdance("L", 1)
