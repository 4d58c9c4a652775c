"""Defaults shared by the files in ``configs/``: every field the trainer reads, so that a
``--config.<field>=<value>`` override of a field that does not exist is rejected."""
from __future__ import annotations

import ml_collections

# BitDance sizes of the reference (transformer + diffusion head).
MODEL_SIZES = {
    "B": dict(dim=768, n_layer=24, n_head=12, diff_layers=6, diff_dim=768, diff_adanln_layers=2),
    "L": dict(dim=1024, n_layer=32, n_head=16, diff_layers=8, diff_dim=1024, diff_adanln_layers=2),
    "H": dict(dim=1280, n_layer=40, n_head=20, diff_layers=12, diff_dim=1280, diff_adanln_layers=3),
}


def data_config(**overrides) -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict(dict(
        source="digits",          # digits | folder | tfds | latent_cache
        path="",                  # folder: the train/ directory; tfds: data_dir
        tfds_name="imagenet2012",
        split="train",
        cache_dir="",             # latent_cache: where the pre-encoded latents live
        cache_latents=False,      # bitdance: encode the image source once, train from the cache
        image_size=32,
        min_crop_frac=1.0,        # random crop covering [min_crop_frac, 1] of the smaller side
        random_flip=False,
        aug_decay_start_epoch=-1,  # crop probability 1 -> 0 between these epochs (-1: never)
        aug_decay_end_epoch=-1,
        num_threads=4,
        prefetch=4,
        worker_count=0,           # > 0: Grain multiprocess prefetch with that many workers
    ))
    d.update(overrides)
    return d


def optim_config(**overrides) -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict(dict(
        lr=6e-4, min_lr=1e-5, warmup_steps=0, decay_start=0,
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, clip_norm=1.0, ema_decay=0.9999,
        no_decay_names=("proj_in", "cls_embedding", "query_token"),
    ))
    o.update(overrides)
    return o


def tokenizer_config(**overrides) -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict(dict(ch=256, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=4,
                                       z_channels=32, in_channels=3, out_ch=3, num_codebooks=4,
                                       gan_decoder=False))
    t.update(overrides)
    return t


def base_config(kind: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.kind = kind
    c.seed = 0
    c.mesh = (-1, 1, 1)                 # (data, fsdp, tensor); -1 takes the remaining devices
    c.global_batch_size = 0             # 0: per_device_batch_size x number of devices
    c.per_device_batch_size = 32
    c.num_steps = 0                     # 0: epochs x steps per epoch
    c.epochs = 0
    c.compute_dtype = "float32"         # float32 | bfloat16 (params stay float32)
    c.init_from = ""                    # a ported / trained param directory to start from
    c.log_every = 50
    c.sample_every = 0                  # 0: only the final sample grid
    c.peak_tflops_per_device = 0.0      # for the MFU estimate where the device is not known
    c.data = data_config()
    c.optim = optim_config()
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, async_save=True))
    if kind == "tokenizer":
        c.tokenizer = tokenizer_config()
        c.tokenizer_loss = ml_collections.ConfigDict(dict(
            l1_weight=1.0, l2_weight=1.0, entropy_weight=0.05, commitment_weight=0.25,
            # Perceptual term (> 0 needs perceptual_network = "module.path:factory", see
            # bitdance_jax.tokenizer_losses; its features are frozen).
            perceptual_weight=0.0, perceptual_network="",
            # Adversarial term (> 0 adds a PatchGAN discriminator trained in the same step).
            adversarial_weight=0.0, adversarial_start_step=0,
            adversarial_loss="hinge",   # hinge | non_saturating
            discriminator_weight=1.0, discriminator_ch=64, discriminator_layers=3))
    elif kind == "bitdance":
        c.tokenizer_dir = ""            # a trained / ported tokenizer directory (frozen)
        c.tokenizer_from_stage = ""     # pipeline: take the tokenizer exported by that stage
        # BitDanceConfig fields; latent_dim and grid_size come from the tokenizer and image size.
        c.model = ml_collections.ConfigDict(dict(
            num_classes=1000, parallel_num=1, parallel_mode="patch", cls_token_num=64,
            diff_batch_mul=4, P_mean=-0.8, P_std=0.8, time_shift=1.0, **MODEL_SIZES["B"],
            remat="none",         # none | full | dots: rematerialise each block's activations
            scan_layers=False))   # nn.scan over the blocks (stacked params, faster compile)
        c.loss = ml_collections.ConfigDict(dict(bit_flip_rate=0.1, label_drop=0.1))
        c.sample = ml_collections.ConfigDict(dict(cfg_scale=4.0, num_steps=50, per_class=4,
                                                  classes=(), seed=0))
    return c
