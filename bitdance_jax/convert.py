"""Port released PyTorch checkpoints to self-describing Orbax directories.

SRC may be:
  * a tokenizer ``.pt`` (``{"state_dict": ...}``, e.g. ae_d16c32.pt),
  * a class-conditional ``.pt`` (``{"model", "ema"}``, e.g. BitDance_B_16x.pt),
  * a text-to-image folder (``config.json`` + model shards + ae/vision head/projector),
  * a tokenizer folder or file pair (``ae.safetensors`` + ``ae_config.json``).
"""
from __future__ import annotations

import argparse
import os
import sys

import jax.numpy as jnp

from bitdance_jax import porting
from bitdance_jax.tokenizer import TokenizerConfig
from bitdance_jax.tokenizer_api import (infer_tokenizer_config, port_tokenizer_state_dict,
                                        save_tokenizer)


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


def port_tokenizer_safetensors(folder: str, dst: str, num_codebooks: int | None = None) -> str:
    """``ae.safetensors`` + ``ae_config.json`` ({"ddconfig": ..., "gan_decoder": bool})."""
    cfg = porting.read_json(os.path.join(folder, "ae_config.json"), "tokenizer folder")
    if "ddconfig" not in cfg:
        raise porting.PortingError(f"{folder}/ae_config.json has no 'ddconfig'")
    weights = os.path.join(folder, "ae.safetensors")
    if not os.path.isfile(weights):
        raise porting.PortingError(f"tokenizer folder {folder}: missing file ae.safetensors")
    sd = porting.load_safetensors(weights)
    z = cfg["ddconfig"].get("z_channels", 32)
    config = TokenizerConfig.from_ddconfig(
        cfg["ddconfig"], gan_decoder=bool(cfg.get("gan_decoder", False)),
        num_codebooks=num_codebooks or cfg.get("num_codebooks", max(1, z // 8)))
    params = port_tokenizer_state_dict(sd, config, what=weights)
    return save_tokenizer(dst, config, params, source=os.path.basename(folder.rstrip("/")))


def port(src: str, dst: str, *, use_ema: bool = True, tokenizer: str | None = None,
         num_codebooks: int | None = None, n_head: int | None = None,
         param_dtype: str = "float32") -> str:
    """Detect the kind of ``src`` and port it to ``dst``; returns ``dst``.

    ``n_head``: attention heads of a class-conditional model (not visible in the weights;
    default: the file's training args, else width // 64 as in the released models).
    ``param_dtype``: stored dtype of text-to-image params (bfloat16 halves a 14B port).
    """
    if not os.path.exists(src):
        raise porting.PortingError(f"{src} does not exist")
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise porting.PortingError(f"destination {dst} exists and is not empty")
    if os.path.isdir(src):
        if os.path.isfile(os.path.join(src, "config.json")):
            from bitdance_jax.t2i import port_t2i_folder
            return port_t2i_folder(src, dst, param_dtype=jnp.dtype(param_dtype))
        if os.path.isfile(os.path.join(src, "ae_config.json")):
            return port_tokenizer_safetensors(src, dst, num_codebooks)
        raise porting.PortingError(f"{src}: neither a text-to-image folder (config.json) "
                                   "nor a tokenizer folder (ae_config.json)")
    if src.endswith(".safetensors"):
        return port_tokenizer_safetensors(os.path.dirname(src) or ".", dst, num_codebooks)
    blob = porting.load_torch_file(src)
    if isinstance(blob, dict) and "state_dict" in blob:
        return port_tokenizer_pt(src, dst, num_codebooks, state_dict=blob["state_dict"])
    if isinstance(blob, dict) and ("ema" in blob or "model" in blob):
        from bitdance_jax.model_api import port_imagenet_checkpoint
        overrides = {} if n_head is None else {"n_head": n_head}
        return port_imagenet_checkpoint(src, dst, use_ema=use_ema, tokenizer_pt=tokenizer,
                                        loaded=blob, **overrides)
    keys = sorted(blob)[:8] if isinstance(blob, dict) else type(blob).__name__
    raise porting.PortingError(f"{src}: unknown checkpoint layout (top-level keys {keys}); "
                               "expected 'state_dict' (tokenizer) or 'model'/'ema' (BitDance)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="released checkpoint: .pt file or model folder")
    p.add_argument("dst", help="new output directory (must not exist or be empty)")
    p.add_argument("--no-ema", action="store_true", help="port the raw 'model' weights, not 'ema'")
    p.add_argument("--tokenizer", help="ae_d16c32.pt to use when SRC carries no vae.* weights")
    p.add_argument("--num-codebooks", type=int, default=None,
                   help="bit groups of the quantizer (default: 8 bits per group)")
    p.add_argument("--n-head", type=int, default=None,
                   help="attention heads of a class-conditional model (default: from the "
                        "file's args, else width // 64 as in BitDance-B/L/H)")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="stored dtype of text-to-image params")
    args = p.parse_args(argv)
    try:
        out = port(args.src, args.dst, use_ema=not args.no_ema, tokenizer=args.tokenizer,
                   num_codebooks=args.num_codebooks, n_head=args.n_head,
                   param_dtype=args.param_dtype)
    except (porting.PortingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
