"""Porting released tokenizer weights (``.pt`` state dicts, ``ae.safetensors`` + ``ae_config.json``): config inference and strict conversion."""
from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np

from bitdance_jax.porting import convention as porting
from bitdance_jax.tokenizer.io import save_tokenizer
from bitdance_jax.tokenizer.model import TokenizerConfig, abstract_tokenizer_params

def infer_tokenizer_config(state_dict: Mapping[str, np.ndarray], prefix: str = "",
                           num_codebooks: int | None = None) -> TokenizerConfig:
    """Read the ddconfig off a tokenizer state_dict's keys and shapes.

    ``num_codebooks`` (bit groups for indices and the entropy loss) is not stored in the
    weights; by default each group holds 8 bits (ae_d16c32: 4 groups).
    """
    def shape(key):
        return porting.key_shape(state_dict, prefix + key, "a BitDance tokenizer")

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = sorted({int(m.group(1)) for k in state_dict
                     if (m := re.match(re.escape(prefix) + r"encoder\.down\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))):
        raise porting.PortingError(f"not a BitDance tokenizer: encoder levels {levels}")
    num_res_blocks = len({int(m.group(1)) for k in state_dict
                          if (m := re.match(re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\.", k))})
    ch_mult = [shape(f"encoder.down.{l}.block.0.conv1.weight")[0] // ch for l in levels]
    z_channels = shape("encoder.conv_out.weight")[0]
    out_ch = shape("decoder.conv_out.weight")[0]
    gan_decoder = shape("decoder.conv_in.weight")[1] == 2 * z_channels
    if num_codebooks is None:
        num_codebooks = max(1, z_channels // 8)
    return TokenizerConfig(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                           z_channels=z_channels, in_channels=in_channels, out_ch=out_ch,
                           num_codebooks=num_codebooks, gan_decoder=gan_decoder)


def port_tokenizer_state_dict(state_dict: Mapping[str, np.ndarray], config: TokenizerConfig,
                              prefix: str = "", what: str = "tokenizer checkpoint") -> dict:
    """Strictly port ``encoder.*``/``decoder.*`` (under ``prefix``) to Flax params."""
    sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return porting.convert_state_dict(
        sub, abstract_tokenizer_params(config),
        ignore=lambda k: k.startswith("quantize."),  # GFQ buffers: no params
        what=what)
def port_tokenizer_pt(src: str, dst: str, num_codebooks: int | None = None,
                      state_dict=None) -> str:
    if state_dict is None:
        blob = porting.load_torch_file(src)
        if not isinstance(blob, dict) or "state_dict" not in blob:
            raise porting.PortingError(f"{src}: expected a dict with 'state_dict' (tokenizer .pt)")
        state_dict = blob["state_dict"]
    sd = porting.tensors_to_numpy(state_dict)
    config = infer_tokenizer_config(sd, num_codebooks=num_codebooks)
    params = port_tokenizer_state_dict(sd, config, what=src)
    return save_tokenizer(dst, config, params, source=os.path.basename(src))


def read_ae_config(path: str, num_codebooks: int | None = None) -> TokenizerConfig:
    """The tokenizer config of an ``ae_config.json`` ({"ddconfig": ..., "gan_decoder": bool});
    bit groups from ``num_codebooks``, else the file, else 8 bits per group."""
    cfg = porting.read_json(path, "tokenizer config")
    if "ddconfig" not in cfg:
        raise porting.PortingError(f"{path} has no 'ddconfig'")
    z = cfg["ddconfig"].get("z_channels", 32)
    return TokenizerConfig.from_ddconfig(
        cfg["ddconfig"], gan_decoder=bool(cfg.get("gan_decoder", False)),
        num_codebooks=num_codebooks or cfg.get("num_codebooks", max(1, z // 8)))


def ae_config_path(weights: str) -> str:
    """The config beside a tokenizer's ``.safetensors``: ``<stem>_config.json`` (the released
    ``ae_d16c32.safetensors`` + ``ae_d16c32_config.json``), else ``ae_config.json``."""
    own = os.path.splitext(weights)[0] + "_config.json"
    return own if os.path.isfile(own) else os.path.join(os.path.dirname(weights), "ae_config.json")


def port_tokenizer_safetensors(weights: str, dst: str, num_codebooks: int | None = None) -> str:
    """A tokenizer ``.safetensors`` (or a folder holding ``ae.safetensors``) and its config."""
    if os.path.isdir(weights):
        weights = os.path.join(weights, "ae.safetensors")
    if not os.path.isfile(weights):
        raise porting.PortingError(f"missing tokenizer weights {weights}")
    config = read_ae_config(ae_config_path(weights), num_codebooks)
    params = port_tokenizer_state_dict(porting.load_safetensors(weights), config, what=weights)
    return save_tokenizer(dst, config, params, source=os.path.basename(weights))
