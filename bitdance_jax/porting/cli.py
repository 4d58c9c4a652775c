"""Port released PyTorch checkpoints to self-describing Orbax directories.

    python -m bitdance_jax.porting SRC DST [--no-ema] [--tokenizer ae_d16c32.pt] ...

SRC may be:
  * a tokenizer ``.pt`` (``{"state_dict": ...}``, e.g. ae_d16c32.pt),
  * a class-conditional ``.pt`` (``{"model", "ema"}``, e.g. BitDance_B_16x.pt),
  * a text-to-image folder (``config.json`` + model shards + ae/vision head/projector),
  * a tokenizer folder or file pair (``ae.safetensors`` + ``ae_config.json``, or the released
    ``ae_d16c32.safetensors`` + ``ae_d16c32_config.json``).
"""
from __future__ import annotations

import argparse
import os
import sys

import jax.numpy as jnp

from bitdance_jax.nn import quant
from bitdance_jax.porting import convention as porting
from bitdance_jax.porting.c2i import port_imagenet_checkpoint
from bitdance_jax.porting.t2i import port_t2i_folder
from bitdance_jax.porting.tokenizer import port_tokenizer_pt, port_tokenizer_safetensors


def _no_quantize(src: str, quantize: str | None):
    if quantize is not None:
        raise porting.PortingError(f"{src} is a tokenizer: its convolutions stay float "
                                   "(--quantize applies to model ports)")


def port(src: str, dst: str, *, use_ema: bool = True, tokenizer: str | None = None,
         num_codebooks: int | None = None, n_head: int | None = None,
         param_dtype: str = "float32", quantize: str | None = None) -> str:
    """Detect the kind of ``src`` and port it to ``dst``; returns ``dst``.

    ``n_head``: attention heads of a class-conditional model (not visible in the weights;
    default: the file's training args, else width // 64 as in the released models).
    ``param_dtype``: stored dtype of text-to-image params (bfloat16 halves a 14B port).
    ``quantize`` ("int8", "fp8"): a model port with weight-only quantized kernels and their
    scales (``nn.quant``); tokenizers have no such kernels and refuse it.
    """
    quant.check_mode(quantize)
    if not os.path.exists(src):
        raise porting.PortingError(f"{src} does not exist")
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise porting.PortingError(f"destination {dst} exists and is not empty")
    if os.path.isdir(src):
        if os.path.isfile(os.path.join(src, "config.json")):
            return port_t2i_folder(src, dst, param_dtype=jnp.dtype(param_dtype), quantize=quantize)
        if os.path.isfile(os.path.join(src, "ae_config.json")):
            _no_quantize(src, quantize)
            return port_tokenizer_safetensors(src, dst, num_codebooks)
        raise porting.PortingError(f"{src}: neither a text-to-image folder (config.json) "
                                   "nor a tokenizer folder (ae_config.json)")
    if src.endswith(".safetensors"):
        _no_quantize(src, quantize)
        return port_tokenizer_safetensors(src, dst, num_codebooks)
    blob = porting.load_torch_file(src)
    if isinstance(blob, dict) and "state_dict" in blob:
        _no_quantize(src, quantize)
        return port_tokenizer_pt(src, dst, num_codebooks, state_dict=blob["state_dict"])
    if isinstance(blob, dict) and ("ema" in blob or "model" in blob):
        overrides = {} if n_head is None else {"n_head": n_head}
        return port_imagenet_checkpoint(src, dst, use_ema=use_ema, tokenizer_pt=tokenizer,
                                        loaded=blob, quantize=quantize, **overrides)
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
    p.add_argument("--quantize", choices=sorted(quant.MODES), default=None,
                   help="write weight-only quantized kernels with per-channel scales "
                        "(model ports; quantized as they are read)")
    args = p.parse_args(argv)
    try:
        out = port(args.src, args.dst, use_ema=not args.no_ema, tokenizer=args.tokenizer,
                   num_codebooks=args.num_codebooks, n_head=args.n_head,
                   param_dtype=args.param_dtype, quantize=args.quantize)
    except (porting.PortingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
