"""Shared by the imagenet_bitdance_*.py configs (not a config itself): the reference recipe
for class-conditional ImageNet 256 (README of the reference's imagenet_gen + its train.py
defaults)."""
from bitdance_jax.model import DEFAULT_CFG_SCALES
from bitdance_jax.train_config import MODEL_SIZES, base_config


def imagenet_bitdance(size: str, parallel_num: int):
    c = base_config("bitdance")
    c.model.update(dict(MODEL_SIZES[size], num_classes=1000, parallel_num=parallel_num,
                        parallel_mode="patch", cls_token_num=64, diff_batch_mul=4,
                        P_mean=-0.8, P_std=0.8, time_shift=1.0))
    # Input perturbation (bit flips) 0.1 for B, 0.05 for L/H; labels dropped 10% for CFG.
    c.loss.bit_flip_rate = 0.1 if size == "B" else 0.05
    c.loss.label_drop = 0.1
    # The frozen ae_d16c32 tokenizer (port it: tools/port_weights.py ae_d16c32.pt DIR).
    c.tokenizer_dir = ""
    c.data.source = "folder"          # ImageNet train/<class>/<image>; or tfds (imagenet2012)
    c.data.path = ""
    c.data.image_size = 256
    c.data.min_crop_frac = 0.8        # random crop 0.8-1.0 + flip ...
    c.data.random_flip = True
    c.data.aug_decay_start_epoch = 700  # ... crop probability 1 -> 0 over epochs 700-750,
    c.data.aug_decay_end_epoch = 750    # center crop after
    c.data.num_threads = 16
    c.data.worker_count = 0
    c.global_batch_size = 1024
    c.epochs = 800
    c.compute_dtype = "bfloat16"
    # B fits data parallelism; L and H shard params and optimizer state (FSDP) over all devices.
    c.mesh = (-1, 1, 1) if size == "B" else (1, -1, 1)
    # One scanned block compiles once for all layers; L/H keep only the block inputs for the
    # backward pass, B also keeps the matmul outputs (memory, not results, differ).
    c.model.scan_layers = True
    c.model.remat = "dots" if size == "B" else "full"
    c.optim.update(dict(lr=6e-4, min_lr=1e-5, warmup_steps=20000, decay_start=20000,
                        b1=0.9, b2=0.95, weight_decay=0.05, clip_norm=1.0, ema_decay=0.9999))
    c.log_every = 100
    c.sample_every = 10000
    c.checkpoint.every_steps = 2000
    c.checkpoint.keep = 3
    name = f"BitDance-{size}-{parallel_num}x"
    c.sample.cfg_scale = DEFAULT_CFG_SCALES.get(name, 4.0)
    c.sample.num_steps = 50
    c.sample.per_class = 4
    c.sample.classes = (207, 360, 387, 974, 88, 979, 417, 279)
    return c
