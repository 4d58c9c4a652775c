"""Defaults shared by the config files: every field the trainer reads, so that a
``--config.<field>=<value>`` override of a field that does not exist is rejected."""
from __future__ import annotations

import ml_collections

from bitdance_jax.c2i.config import MODEL_SIZES, default_cfg_scale


def data_config(**overrides) -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict(dict(
        source="digits",          # digits | folder | tfds | latent_cache
        path="",                  # folder: the train/ directory; tfds: data_dir
        tfds_name="imagenet2012",
        split="train",
        cache_dir="",             # latent_cache: where the pre-encoded latents live
        cache_latents=False,      # bitdance: encode the image source once, train from the cache
        cache_crops=1,            # crops cached per image (centre + cache_crops-1 random; 1: centre only)
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
    # Numerics policy (bitdance_jax.nn.precision): float32 | bf16-mixed (float32 params,
    # optimizer state, residual stream, norms, softmax and losses; bf16 matmul inputs);
    # "bfloat16" is an older name of bf16-mixed. The bitdance kind sets it as
    # model.precision (this field then follows it).
    c.compute_dtype = "float32"
    # Precision of float32 matmuls and convs: default | high | highest (bitdance_jax.nn.precision;
    # on TPU "default" is one bf16 pass). The bitdance kind sets it as model.matmul_precision.
    c.matmul_precision = "default"
    c.init_from = ""                    # a ported / trained param directory to start from
    c.log_every = 50
    c.sample_every = 0                  # 0: only the final sample grid
    c.peak_tflops_per_device = 0.0      # for the MFU estimate where the device is not known
    c.data = data_config()
    c.optim = optim_config()
    # keep: how many of the latest checkpoints stay on disk, >= 1 (0 is refused, never "all").
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, async_save=True))
    if kind == "tokenizer":
        c.tokenizer = tokenizer_config()
        c.tokenizer_loss = ml_collections.ConfigDict(dict(
            l1_weight=1.0, l2_weight=1.0, entropy_weight=0.05, commitment_weight=0.25,
            # Perceptual term (> 0 needs perceptual_network = "module.path:factory", see
            # bitdance_jax.tokenizer.losses; its features are frozen).
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
            scan_layers=False,    # nn.scan over the blocks (stacked params, faster compile)
            # Numerics (not architecture): see compute_dtype above; matmul_precision of the
            # float32 matmuls: default | high | highest; attention: auto (cuDNN on GPU where
            # it applies, else XLA) | xla | cudnn | einsum.
            precision="float32", matmul_precision="default", attention="auto"))
        c.compute_dtype = c.model.get_ref("precision")   # the older name, kept in sync
        c.matmul_precision = c.model.get_ref("matmul_precision")
        c.loss = ml_collections.ConfigDict(dict(bit_flip_rate=0.1, label_drop=0.1))
        c.sample = ml_collections.ConfigDict(dict(cfg_scale=4.0, num_steps=50, per_class=4,
                                                  classes=(), seed=0))
    return c


def imagenet_bitdance(size: str, parallel_num: int) -> ml_collections.ConfigDict:
    """The reference recipe for class-conditional ImageNet 256 (README of the reference's
    imagenet_gen and its train.py defaults) for BitDance-{size}-{parallel_num}x."""
    c = base_config("bitdance")
    c.model.update(dict(MODEL_SIZES[size], num_classes=1000, parallel_num=parallel_num,
                        parallel_mode="patch", cls_token_num=64, diff_batch_mul=4,
                        P_mean=-0.8, P_std=0.8, time_shift=1.0))
    # Input perturbation (bit flips) 0.1 for B, 0.05 for L/H; labels dropped 10% for CFG.
    c.loss.bit_flip_rate = 0.1 if size == "B" else 0.05
    c.loss.label_drop = 0.1
    # The frozen ae_d16c32 tokenizer (port it: python -m bitdance_jax.porting ae_d16c32.pt DIR).
    c.tokenizer_dir = ""
    c.data.source = "folder"          # ImageNet train/<class>/<image>; or tfds (imagenet2012)
    c.data.path = ""
    c.data.image_size = 256
    c.data.min_crop_frac = 0.8        # random crop 0.8-1.0 + flip ...
    c.data.random_flip = True
    c.data.aug_decay_start_epoch = 700  # ... crop probability 1 -> 0 over epochs 700-750,
    c.data.aug_decay_end_epoch = 750    # center crop after
    # With data.cache_latents: 4 crops (centre + 3 random) x 2 flips per image, drawn one per
    # epoch; about 84 GB of int8 latents for ImageNet's 1.28M images.
    c.data.cache_crops = 4
    c.data.num_threads = 16
    c.data.worker_count = 0
    c.global_batch_size = 1024
    c.epochs = 800
    c.model.precision = "bf16-mixed"
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
    c.sample.cfg_scale = default_cfg_scale(name, announce=False)
    c.sample.num_steps = 50
    c.sample.per_class = 4
    c.sample.classes = (207, 360, 387, 974, 88, 979, 417, 279)
    return c


def t2i_base_config() -> ml_collections.ConfigDict:
    """Every field the T2I task reads (``configs/*_t2i.py`` start from this)."""
    c = base_config("t2i")
    c.tokenizer_dir = ""              # a trained / ported binary tokenizer (frozen)
    c.text_tokenizer = ""             # tokenizer.json; "" builds a word-level one from the captions
    # A Hugging Face Qwen3 folder (config.json, model.safetensors or shards, tokenizer.json) to
    # start from: its weights and tokenizer plus the vision tokens; projector and head fresh.
    # config.llm must match its config.json (vocab_size 0: the folder's, grown by new tokens).
    c.init_from_llm = ""
    c.llm = ml_collections.ConfigDict(dict(
        vocab_size=0,                 # 0: the text tokenizer's size
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rope_theta=1_000_000.0, rms_norm_eps=1e-6))
    c.head = ml_collections.ConfigDict(dict(
        ch_latent=128, depth_latent=1, depth_adanln=1, parallel_num=4, use_swiglu=True,
        time_shift=1.0, P_mean=-0.8, P_std=0.8, diff_batch_mul=1))
    c.loss = ml_collections.ConfigDict(dict(vision_weight=1.0, text_weight=0.01,
                                            caption_drop=0.1, bit_flip_rate=0.1))
    c.data.update(dict(
        captions_file="",             # folder: JSONL of {"file", "caption"}
        image_key="image", caption_key="caption",  # tfds features
        buckets=((32, 32),),          # allowed (height, width); every image must be one of them
        seq_len=0,                    # tokens per packed row (0: max_samples x longest sample)
        max_samples_per_row=4))
    c.sample = ml_collections.ConfigDict(dict(prompts=(), num_images=2, cfg_scale=4.0,
                                              num_steps=20))
    return c
