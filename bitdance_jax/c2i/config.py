"""Class-conditional BitDance architecture: the validated config, the released B/L/H presets and their guidance scales."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np

from bitdance_jax.nn import patching
from bitdance_jax.nn.attention import RESIDUAL_NAMES
from bitdance_jax.nn.diffusion_head import HeadConfig

PARALLEL_MODES = ("patch", "standard")
# Rematerialisation of each transformer block when training: what the backward pass keeps.
# "dots" also keeps the attention's output and log-sum-exp (nn.attention.RESIDUAL_NAMES): its
# custom backward needs them, and they are not dots, so the whole attention would run again.
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.save_from_both_policies(
                      jax.checkpoint_policies.checkpoint_dots,
                      jax.checkpoint_policies.save_only_these_names(*RESIDUAL_NAMES))}


@dataclasses.dataclass(frozen=True)
class BitDanceConfig:
    """Architecture and training schedule of a class-conditional BitDance model.

    ``parallel_num`` tokens are predicted per AR step (1 = the reference's model.py, no query
    tokens and an MLP head; > 1 = model_parallel.py). ``parallel_mode='patch'`` orders the
    latents in p x p patches (p = sqrt(parallel_num)); ``'standard'`` keeps raster order.

    ``remat`` ("none", "full", "dots") and ``scan_layers`` trade memory and compile time,
    never results. ``scan_layers`` also changes the param layout: the blocks' params are
    stacked under ``layers`` (leading axis, logical name "layers") instead of ``layers_<i>``
    (see ``stack_layer_params``); ported and saved directories always hold ``layers_<i>``.
    """
    dim: int
    n_layer: int
    n_head: int
    diff_layers: int
    diff_dim: int
    diff_adanln_layers: int
    latent_dim: int = 32
    grid_size: int = 16
    cls_token_num: int = 64
    num_classes: int = 1000
    parallel_num: int = 1
    parallel_mode: str = "patch"
    diff_batch_mul: int = 4
    time_shift: float = 1.0
    P_mean: float = -0.8
    P_std: float = 0.8
    remat: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        for name in ("dim", "n_layer", "n_head", "diff_layers", "diff_dim", "diff_adanln_layers",
                     "latent_dim", "grid_size", "cls_token_num", "num_classes", "diff_batch_mul"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        patching.patch_side(self.parallel_num)
        if self.parallel_mode not in PARALLEL_MODES:
            raise ValueError(f"parallel_mode must be one of {PARALLEL_MODES}, got {self.parallel_mode!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")
        if not isinstance(self.scan_layers, (bool, np.bool_)):
            raise ValueError(f"scan_layers must be a bool, got {self.scan_layers!r}")
        if self.dim % self.n_head or (self.dim // self.n_head) % 4:
            raise ValueError(f"dim {self.dim} / n_head {self.n_head} must give a head size "
                             "divisible by 4 (2D rotary embedding)")
        if self.num_tokens % self.parallel_num:
            raise ValueError(f"{self.num_tokens} latent tokens do not split into steps of "
                             f"{self.parallel_num}")
        if self.grid_size % self.token_patch:
            raise ValueError(f"grid {self.grid_size} does not split into {self.token_patch}x"
                             f"{self.token_patch} patches")
        self.head_config  # validates the head

    # --- derived sizes
    @property
    def num_tokens(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def num_steps(self) -> int:
        """AR steps of the sampler."""
        return self.num_tokens // self.parallel_num

    @property
    def seq_len(self) -> int:
        """Slots of the full sequence: class tokens + queries + all but the last P latents."""
        return self.cls_token_num + self.num_tokens - 1

    @property
    def prefix_len(self) -> int:
        """Slots fed at AR step 0: class tokens and query tokens."""
        return self.cls_token_num + self.parallel_num - 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        return -(-hidden // 256) * 256

    @property
    def token_patch(self) -> int:
        """Patch side of the token order (1 = raster)."""
        return patching.patch_side(self.parallel_num) if self.parallel_mode == "patch" else 1

    @property
    def head_config(self) -> HeadConfig:
        return HeadConfig(ch_target=self.latent_dim, ch_cond=self.dim, ch_latent=self.diff_dim,
                          depth_latent=self.diff_layers, depth_adanln=self.diff_adanln_layers,
                          parallel_num=self.parallel_num, variant="imagenet",
                          time_shift=self.time_shift, P_mean=self.P_mean, P_std=self.P_std,
                          diff_batch_mul=self.diff_batch_mul)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BitDanceConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown BitDanceConfig keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_reference_kwargs(cls, kwargs: Mapping[str, Any]) -> "BitDanceConfig":
        """Config from the reference ``BitDance(**kwargs)`` (no ``parallel_num``: model.py)."""
        kwargs = dict(kwargs)
        if int(kwargs.pop("patch_size", 1)) != 1:
            raise ValueError("only patch_size 1 (one latent cell per token) is supported")
        schedule = kwargs.pop("time_schedule", "logit_normal")
        if schedule != "logit_normal":
            raise ValueError(f"time_schedule {schedule!r} is not supported (only 'logit_normal')")
        resolution, down = int(kwargs.pop("resolution")), int(kwargs.pop("down_size"))
        if resolution % down:
            raise ValueError(f"resolution {resolution} is not a multiple of down_size {down}")
        for ignored in ("grad_checkpointing", "trained_vae", "drop_rate", "perturb_schedule",
                        "perturb_rate", "perturb_rate_max", "class_dropout_prob"):
            kwargs.pop(ignored, None)
        if "parallel_num" not in kwargs:
            kwargs["parallel_num"] = 1
        return cls.from_dict({**kwargs, "grid_size": resolution // down})


# Released ImageNet architectures (reference model.py / model_parallel.py presets + the
# flags of its README: 256px, 16x down, 32-bit latents, 64 class tokens, patch order).
MODEL_SIZES = {
    "B": dict(dim=768, n_layer=24, n_head=12, diff_layers=6, diff_dim=768, diff_adanln_layers=2),
    "L": dict(dim=1024, n_layer=32, n_head=16, diff_layers=8, diff_dim=1024, diff_adanln_layers=2),
    "H": dict(dim=1280, n_layer=40, n_head=20, diff_layers=12, diff_dim=1280, diff_adanln_layers=3)}
RELEASED_MODELS: dict[str, BitDanceConfig] = {
    f"BitDance-{size}-{p}x": BitDanceConfig(**dims, latent_dim=32, grid_size=16, cls_token_num=64,
                                            num_classes=1000, parallel_num=p, parallel_mode="patch",
                                            diff_batch_mul=4)
    for size, dims in MODEL_SIZES.items() for p in (1, 4, 16)}
# Classifier-free guidance of the reference README per released model.
DEFAULT_CFG_SCALES = {"BitDance-B-1x": 3.2, "BitDance-B-4x": 3.9, "BitDance-B-16x": 6.1,
                      "BitDance-L-1x": 4.0, "BitDance-H-1x": 4.55}
# The reference sampling scripts' --cfg-scale default: the guidance of every other model.
FALLBACK_CFG_SCALE = 4.6


def default_cfg_scale(model: str | os.PathLike | BitDanceConfig | Mapping[str, Any] | None,
                      *, announce: bool = True) -> float:
    """The guidance a model samples with unless told: the one function every caller asks.

    ``model``: a released name (or None), a ``BitDanceConfig``, a class-conditional
    directory or its metadata (``bitdance.json`` as a dict). A directory samples with the
    guidance it records, except one without any or ported before unknown architectures
    defaulted to 4.6 (it recorded 1.0 with its ``"weights"``, i.e. no guidance). Otherwise:
    the reference README's value for the released models it lists, else the reference
    sampling scripts' default 4.6 (with a note on stdout when ``announce``)."""
    if isinstance(model, Mapping):
        name = released_name(BitDanceConfig.from_dict(model["config"]))
        stored = model.get("default_cfg_scale")
        old_port_fallback = ("weights" in model and stored == 1.0
                             and name not in DEFAULT_CFG_SCALES)
        if stored is None or old_port_fallback:
            return default_cfg_scale(name, announce=announce)
        return float(stored)
    if isinstance(model, BitDanceConfig):
        return default_cfg_scale(released_name(model), announce=announce)
    if model is not None and model not in RELEASED_MODELS and os.path.isdir(model):
        from bitdance_jax.checkpointing import param_dir   # reading a directory needs Orbax
        return default_cfg_scale(param_dir.read_meta(os.fspath(model)), announce=announce)
    name = model
    if name in DEFAULT_CFG_SCALES:
        return DEFAULT_CFG_SCALES[name]
    if announce:
        what = f"{name} has" if name else "this architecture is not a released one and has"
        print(f"note: {what} no published guidance scale; defaulting to cfg "
              f"{FALLBACK_CFG_SCALE} (the reference sampler's default). Pass cfg_scale / "
              "--cfg-scale to choose another.")
    return FALLBACK_CFG_SCALE


def released_name(config: BitDanceConfig) -> str | None:
    """Name of the released architecture ``config`` has (schedule values aside), if any."""
    arch = dataclasses.replace(config, diff_batch_mul=4, time_shift=1.0, P_mean=-0.8, P_std=0.8,
                               remat="none", scan_layers=False)
    return next((name for name, c in RELEASED_MODELS.items() if c == arch), None)


def inference_config(config: BitDanceConfig) -> BitDanceConfig:
    """The config the KV-cache sampler runs: unscanned layers (params ``layers_<i>``), no remat."""
    return dataclasses.replace(config, remat="none", scan_layers=False)
