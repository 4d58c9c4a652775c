"""Text-to-image modules beside Qwen3: the latent projector, the 2D sin-cos position embedding, and the parameter tree of all parts."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bitdance_jax.nn import quant
from bitdance_jax.nn.diffusion_head import DiffusionNet
from bitdance_jax.nn.layers import dense, torch_bias_init, torch_linear_init
from bitdance_jax.nn.params import abstract_params
from bitdance_jax.nn.precision import PrecisionLike
from bitdance_jax.nn.patching import patchify
from bitdance_jax.parallel.sharding import divisible_logical_sharding
from bitdance_jax.t2i import qwen3
from bitdance_jax.t2i.config import POS_EMBED_MAX_PIXELS, T2IConfig
from bitdance_jax.tokenizer.model import abstract_tokenizer_params

Dtype = Any

class Projector(nn.Module):
    """Binary latents -> LLM inputs: Linear, GELU (tanh approximation), Linear (fc1/fc2).

    Initialised as the reference leaves it (its ``MLPconnector`` is never re-initialised):
    PyTorch's default Linear init, kernel and bias U(+-1/sqrt(fan_in)). Returns float32.
    """
    hidden_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, bits):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                  kernel_init=torch_linear_init())
        h = dense(self.hidden_size, ("latent", "embed"), name="fc1",
                  bias_init=torch_bias_init(bits.shape[-1]), **kw)(bits)
        h = nn.gelu(h, approximate=True)
        return dense(self.hidden_size, ("mlp", "embed"), name="fc2",
                     bias_init=torch_bias_init(self.hidden_size), **kw)(h).astype(jnp.float32)


def sincos_table(dim: int, length: int) -> np.ndarray:
    """``[length, dim]`` = cat[sin(n w), cos(n w)], w_k = 10000^(-k / (dim/2)) (float32)."""
    if dim % 2:
        raise ValueError(f"sin-cos table needs an even dim, got {dim}")
    quarter = dim // 2
    omega = np.arange(quarter, dtype=np.float32) / np.float32(quarter)
    omega = (np.float32(1.0) / np.float32(10000.0) ** omega).astype(np.float32)
    angles = np.outer(np.arange(length, dtype=np.float32), omega).astype(np.float32)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def position_table(hidden_size: int, vae_patch_size: int) -> np.ndarray:
    """The 1-D table the 2D embedding indexes (one row per latent row/column)."""
    return sincos_table(hidden_size // 2, POS_EMBED_MAX_PIXELS // vae_patch_size)


def position_embed_2d(table: np.ndarray, h: int, w: int, patch_side: int = 1) -> np.ndarray:
    """``[h*w, 2*table_dim]``: entry (row r, col c) = cat[table[c], table[r]] (column first),
    listed in generation order: p x p patches row-major, row-major inside each patch."""
    if h % patch_side or w % patch_side:
        raise ValueError(f"latent grid {h}x{w} does not split into {patch_side}x{patch_side} patches")
    if max(h, w) > table.shape[0]:
        raise ValueError(f"latent grid {h}x{w} exceeds the position table ({table.shape[0]})")
    cols = np.broadcast_to(table[None, :w], (h, w, table.shape[1]))
    rows = np.broadcast_to(table[:h, None], (h, w, table.shape[1]))
    grid = np.concatenate([cols, rows], axis=-1)
    return patchify(grid[None], patch_side)[0]



def abstract_t2i_params(config: T2IConfig, param_dtype=jnp.float32, quantize: str | None = None) -> dict:
    """Boxed param shapes of every part ({"llm", "head", "projector", "tokenizer"}), nothing
    allocated (``jax.eval_shape``); ``param_dtype`` applies to all but the tokenizer.
    ``quantize`` ("int8", "fp8"): the LLM, head and projector kernels as ``nn.quant`` stores
    them (the tokenizer stays float32)."""
    def part(module, *example):
        if quantize is None:
            return abstract_params(module, *example)
        return quant.abstract_quantized(module, quantize, *example)
    return {
        "llm": part(qwen3.Qwen3ForCausalLM(config.llm, param_dtype=param_dtype),
                    jax.ShapeDtypeStruct((1, 1), jnp.int32)),
        "head": part(DiffusionNet(config.head, param_dtype=param_dtype), *head_example(config)),
        "projector": part(Projector(config.llm.hidden_size, param_dtype=param_dtype),
                          jax.ShapeDtypeStruct((1, 1, config.tokenizer.z_channels), jnp.float32)),
        # The tokenizer decoder stays float32 (small; it makes the final pixels).
        "tokenizer": abstract_tokenizer_params(config.tokenizer)}


def place_params(params, config: T2IConfig, mesh, quantize: str | None = None):
    """Put every param (LLM, head, projector, tokenizer decoder) on the sharding its logical
    axes give on ``mesh``: fsdp splits the model dimension, tensor splits heads/MLP/vocab.

    Memory for the released 14B models: 14.77e9 LLM params (0.78e9 of them the LM head,
    unused when sampling) + 1.76e9 vision head + 0.03e9 projector + 0.46e9 tokenizer, about
    17.0e9 in all: bf16 params take 34 GB, float32 68 GB. The KV cache holds
    2 (k, v) x 40 layers x 8 kv heads x 128 x 2 bytes = 160 KiB per token and row in bf16;
    a 1024x1024 image at 16 tokens/step is about 4.4k tokens, x 2 rows (cond + uncond) per
    image: about 1.4 GB per image. On 16 GB-HBM chips (e.g. TPU v5e) bf16 needs
    fsdp x tensor >= 4 (8.5 GB of params per chip, leaving room for cache and activations;
    2 chips would need 17 GB for params alone); float32 needs >= 8 (8.5 GB per chip).
    """
    abstract = abstract_t2i_params(config, quantize=quantize)
    return jax.tree.map(jax.device_put, params, divisible_logical_sharding(abstract, mesh))


def head_example(config: T2IConfig):
    p, head = config.parallel_num, config.head
    return (jax.ShapeDtypeStruct((1, p, head.ch_target), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.float32),
            jax.ShapeDtypeStruct((1, p, head.ch_cond), jnp.float32))
