"""The diffusion head's PyTorch state dict: its architecture from the keys and shapes, and
the strict conversion onto ``nn.diffusion_head.DiffusionNet``."""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from bitdance_jax.nn.diffusion_head import HeadConfig, abstract_head_params
from bitdance_jax.porting import convention as porting

Dtype = Any


def infer_head_config(shapes: Mapping[str, Any], variant: str, prefix: str = "net.",
                      **overrides) -> HeadConfig:
    """Architecture of a head from its torch state_dict (or key -> shape map) under ``prefix``.

    ``parallel_num`` does not show in the weights: for TransEncoders it defaults to 4 unless
    given in ``overrides`` (schedule values too: time_shift, P_mean, P_std, diff_batch_mul).
    """
    def shape(key):
        return porting.key_shape(shapes, prefix + key, "diffusion head weights")

    def count(group):
        head = f"{prefix}{group}."
        return len({k[len(head):].split(".")[0] for k in shapes if k.startswith(head)})

    ch_latent, ch_target = shape("input_proj.weight")
    mlp_encoder = f"{prefix}res_blocks.0.norm.weight" in shapes
    fields = dict(ch_target=ch_target, ch_cond=shape("cond_embed.weight")[1], ch_latent=ch_latent,
                  depth_latent=count("res_blocks"), depth_adanln=count("ada_ln_blocks"),
                  variant=variant,
                  parallel_num=1 if mlp_encoder else 4,
                  use_swiglu=f"{prefix}res_blocks.0.mlp.0.weight" not in shapes)
    fields.update(overrides)
    return HeadConfig(**fields)


def port_head_state_dict(sd: Mapping[str, Any], config: HeadConfig, prefix: str = "net.",
                         param_dtype: Dtype = jnp.float32) -> dict:
    """Strictly port the torch head weights under ``prefix`` (``head.net.`` in the ImageNet
    .pt, ``net.`` in vision_head.safetensors); keys outside ``prefix`` are ignored."""
    head_sd = {k[len(prefix):]: np.asarray(v) for k, v in sd.items() if k.startswith(prefix)}
    if not head_sd:
        raise porting.PortingError(f"no keys under {prefix!r} in the head weights")
    return porting.convert_state_dict(head_sd, abstract_head_params(config, param_dtype=param_dtype),
                                      what=f"diffusion head weights under {prefix!r}")
