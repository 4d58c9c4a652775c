"""Text-to-image BitDance: Qwen3 backbone, projector, 2D position embedding, vision head,
binary tokenizer decoder; loading/porting the released folder; the sampling pipeline.

    python -m bitdance_jax.t2i --ckpt DIR --prompt "a red cube" --height 1024 --width 1024 --out a.png
    python -m bitdance_jax.t2i --ckpt DIR --prompts-file prompts.txt --out-dir images/

The sequence is the chat-formatted prompt, ``<|vision_start|> <|res_h|> <|res_w|>``, the
``<|query_1..P-1|>`` tokens, then the image latents fed back P at a time (in p x p patch
order, p = sqrt(P)). The prompt is causal; each block of P image positions attends to itself
bidirectionally and to everything before it.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from bitdance_jax import checkpoint, porting, qwen3
from bitdance_jax.diffusion_head import DiffusionNet, HeadConfig, port_head_state_dict
from bitdance_jax.flow import euler_maruyama
from bitdance_jax.layers import dense
from bitdance_jax.patching import patchify, unpatchify
from bitdance_jax.tokenizer import BinaryAutoencoder, TokenizerConfig
from bitdance_jax.tokenizer_api import infer_tokenizer_config, port_tokenizer_state_dict

Dtype = Any
KIND = "bitdance_t2i"

# (height, width) in pixels accepted by the released 14B models: the reference's whitelist
# (IMAGE_SIZE_LIST in t2i_pipeline.py, 18 entries).
RELEASED_SIZES: tuple[tuple[int, int], ...] = (
    (2048, 512), (1920, 512), (1536, 640), (1280, 768), (1152, 896), (1024, 1024),
    (896, 1152), (768, 1280), (640, 1536), (512, 1920), (512, 2048),
    (1024, 256), (896, 256), (640, 384), (512, 512), (384, 640), (256, 896), (256, 1024))
# The released models' backbone (Qwen3-14B): folders with it get the size whitelist.
_RELEASED_BACKBONE = {"hidden_size": 5120, "num_hidden_layers": 40}

TEXT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
RELEASED_FILES = ("config.json", "tokenizer.json", "ae.safetensors", "ae_config.json",
                  "vision_head.safetensors", "vision_head_config.json", "projector.safetensors")
LLM_SINGLE_FILE = "model.safetensors"
LLM_INDEX_FILE = "model.safetensors.index.json"
POS_EMBED_MAX_PIXELS = 4096  # the 1-D table covers 4096 / vae_patch latent positions


def cond_prompt(prompt: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


UNCOND_PROMPT = "<|im_start|>assistant\n"


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class T2IConfig:
    """Everything needed to rebuild the modules: the HF Qwen3 config, the reference
    ``DiffHead`` kwargs (vision_head_config.json), the tokenizer config and the sizes a
    released model accepts (``None``: any size whose latent grid splits into p x p patches)."""
    llm: qwen3.Qwen3Config
    head_kwargs: dict
    tokenizer: TokenizerConfig
    supported_sizes: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self):
        p = math.isqrt(self.parallel_num)
        if p * p != self.parallel_num:
            raise ValueError(f"parallel_num {self.parallel_num} is not a square")
        head = self.head
        if head.ch_cond != self.llm.hidden_size or head.ch_target != self.tokenizer.z_channels:
            raise ValueError(f"vision head (ch_cond {head.ch_cond}, ch_target {head.ch_target}) "
                             f"does not fit the LLM hidden size {self.llm.hidden_size} and the "
                             f"tokenizer's {self.tokenizer.z_channels} latent channels")
        if self.llm.hidden_size % 4:
            raise ValueError(f"the 2D sin-cos embedding needs hidden_size % 4 == 0, got "
                             f"{self.llm.hidden_size}")

    @property
    def head(self) -> HeadConfig:
        return HeadConfig.from_reference_kwargs(self.head_kwargs, variant="t2i")

    @property
    def parallel_num(self) -> int:
        return self.head.parallel_num

    @property
    def patch_side(self) -> int:
        return math.isqrt(self.parallel_num)

    @property
    def vae_patch_size(self) -> int:
        return self.tokenizer.downsample_factor

    def to_dict(self) -> dict:
        return {"llm": self.llm.to_dict(), "head_kwargs": dict(self.head_kwargs),
                "tokenizer": self.tokenizer.to_dict(),
                "supported_sizes": None if self.supported_sizes is None
                else [list(s) for s in self.supported_sizes]}

    @classmethod
    def from_dict(cls, d: dict) -> "T2IConfig":
        sizes = d.get("supported_sizes")
        return cls(llm=qwen3.Qwen3Config(**d["llm"]), head_kwargs=dict(d["head_kwargs"]),
                   tokenizer=TokenizerConfig(**d["tokenizer"]),
                   supported_sizes=None if sizes is None else tuple(tuple(s) for s in sizes))

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """Latent (h, w) for an image size; ``ValueError`` for sizes the model cannot make."""
        if self.supported_sizes is not None and (height, width) not in self.supported_sizes:
            listed = ", ".join(f"{h}x{w}" for h, w in self.supported_sizes)
            raise ValueError(f"image size {height}x{width} (height x width) is not supported by "
                             f"this model; choose one of {listed}")
        f, p = self.vae_patch_size, self.patch_side
        if height <= 0 or width <= 0 or height % (f * p) or width % (f * p):
            raise ValueError(f"height and width must be positive multiples of {f * p} (tokenizer "
                             f"patch {f} x {p}x{p} tokens per step), got {height}x{width}")
        h, w = height // f, width // f
        if max(h, w) > POS_EMBED_MAX_PIXELS // f:
            raise ValueError(f"image size {height}x{width} exceeds the position table "
                             f"({POS_EMBED_MAX_PIXELS} pixels per side)")
        return h, w


# ----------------------------------------------------------------------------- small parts

class Projector(nn.Module):
    """Binary latents -> LLM inputs: Linear, GELU (tanh approximation), Linear (fc1/fc2)."""
    hidden_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, bits):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.hidden_size, ("latent", "embed"), name="fc1", **kw)(bits)
        h = nn.gelu(h, approximate=True)
        return dense(self.hidden_size, ("mlp", "embed"), name="fc2", **kw)(h)


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


class TextTokenizer:
    """The folder's ``tokenizer.json`` through the ``tokenizers`` library."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _HFTokenizer
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"missing text tokenizer file {path}")
        self.path = path
        self._tok = _HFTokenizer.from_file(path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def has_token(self, token: str) -> bool:
        return self._tok.token_to_id(token) is not None

    def token_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise ValueError(f"the text tokenizer has no token {token!r}")
        return tid

    def image_prefix_ids(self, h: int, w: int, parallel_num: int) -> list[int]:
        """[<|vision_start|>, <|res_h|>, <|res_w|>, <|query_1|> .. <|query_{P-1}|>]."""
        try:
            res = [self.token_id(f"<|res_{h}|>"), self.token_id(f"<|res_{w}|>")]
        except ValueError as e:
            raise ValueError(f"latent grid {h}x{w} has no resolution token in this model's "
                             f"vocabulary ({e})") from None
        return ([self.token_id("<|vision_start|>")] + res
                + [self.token_id(f"<|query_{i}|>") for i in range(1, parallel_num)])


# ----------------------------------------------------------------------------- porting / loading

def _abstract_llm(config: T2IConfig, param_dtype):
    return qwen3.abstract_qwen3_params(config.llm, param_dtype=param_dtype)


def _llm_shard_files(src: str) -> list[str]:
    """The LLM weight files of a folder: the index's shards (all must exist) or model.safetensors."""
    index_path = os.path.join(src, LLM_INDEX_FILE)
    if os.path.isfile(index_path):
        index = porting.read_json(index_path, "LLM shard index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise porting.PortingError(f"{index_path} has no 'weight_map'")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(src, s))]
        if missing:
            raise porting.PortingError(f"{index_path} names missing shard file(s): "
                                       f"{', '.join(missing)}")
        return [os.path.join(src, s) for s in shards]
    single = os.path.join(src, LLM_SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    raise porting.PortingError(f"{src}: missing LLM weights ({LLM_SINGLE_FILE} or {LLM_INDEX_FILE})")


def stream_llm_weights(shard_files: Sequence[str], abstract, *, shardings=None,
                       ignore: Callable[[str], bool] = lambda k: False) -> dict:
    """Port HF Qwen3 safetensors shards onto ``abstract`` one tensor at a time.

    Each tensor is read, transposed to Flax layout, cast to the target dtype and (with
    ``shardings``, a tree like ``abstract`` of ``jax.sharding.Sharding``) placed on its
    devices before the next one is read, so host memory never holds more than the result
    plus one tensor. Strict like ``porting.convert_state_dict``.
    """
    from safetensors import SafetensorError, safe_open

    flat_target = traverse_util.flatten_dict(nn.unbox(abstract))
    by_key = {key: path for path, key in porting.porting_map(abstract).items()}
    flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else None
    out, extra, bad_shape, mis_shaped = {}, [], [], set()
    for shard in shard_files:
        try:
            handle = safe_open(shard, framework="np")
        except (SafetensorError, OSError) as e:
            raise porting.PortingError(f"cannot read {shard} as safetensors: {e}") from e
        with handle as f:
            for key in f.keys():
                path = by_key.get(key)
                if path is None:
                    if not ignore(key):
                        extra.append(key)
                    continue
                value = porting.torch_to_flax_array(path[-1], f.get_tensor(key))
                target = flat_target[path]
                if tuple(value.shape) != tuple(target.shape):
                    bad_shape.append(f"{key}: checkpoint {tuple(value.shape)} vs model "
                                     f"{tuple(target.shape)}")
                    mis_shaped.add(key)
                    continue
                value = np.asarray(value, dtype=target.dtype)
                out[path] = (jax.device_put(value, flat_shardings[path])
                             if flat_shardings is not None else value)
    missing = sorted(key for key, path in by_key.items()
                     if path not in out and key not in mis_shaped)
    porting.raise_if_mismatch("LLM weights (config.json)", missing, extra, bad_shape)
    return traverse_util.unflatten_dict(out)


def _check_released_folder(src: str):
    if not os.path.isdir(src):
        raise porting.PortingError(f"{src} is not a directory")
    missing = [f for f in RELEASED_FILES if not os.path.isfile(os.path.join(src, f))]
    if missing:
        raise porting.PortingError(f"text-to-image folder {src} is missing file(s): "
                                   f"{', '.join(missing)}")


def read_released_config(src: str) -> T2IConfig:
    """The T2I config of a released-layout folder (reads only its JSON files)."""
    _check_released_folder(src)
    llm_dict = porting.read_json(os.path.join(src, "config.json"), "LLM config")
    llm = qwen3.Qwen3Config.from_hf_dict(llm_dict)
    head_kwargs = porting.read_json(os.path.join(src, "vision_head_config.json"), "vision head config")
    ae_cfg = porting.read_json(os.path.join(src, "ae_config.json"), "tokenizer config")
    if "ddconfig" not in ae_cfg:
        raise porting.PortingError(f"{src}/ae_config.json has no 'ddconfig'")
    z = ae_cfg["ddconfig"].get("z_channels", 32)
    tok = TokenizerConfig.from_ddconfig(ae_cfg["ddconfig"],
                                        gan_decoder=bool(ae_cfg.get("gan_decoder", False)),
                                        num_codebooks=ae_cfg.get("num_codebooks", max(1, z // 8)))
    released = all(llm_dict.get(k) == v for k, v in _RELEASED_BACKBONE.items())
    return T2IConfig(llm=llm, head_kwargs=head_kwargs, tokenizer=tok,
                     supported_sizes=RELEASED_SIZES if released else None)


def read_released_folder(src: str, *, param_dtype=jnp.float32, mesh=None):
    """``(config, params)`` of a released-layout folder; with ``mesh`` every LLM tensor is
    placed on its logical sharding as it is read."""
    config = read_released_config(src)
    abstract = _abstract_llm(config, param_dtype)
    shardings = None
    if mesh is not None:
        shardings = param_shardings(abstract, mesh)
    tied = config.llm.tie_word_embeddings
    llm = stream_llm_weights(_llm_shard_files(src), abstract, shardings=shardings,
                             ignore=lambda k: tied and k == "lm_head.weight")
    ae_sd = porting.load_safetensors(os.path.join(src, "ae.safetensors"))
    inferred = infer_tokenizer_config(ae_sd, num_codebooks=config.tokenizer.num_codebooks)
    if inferred != config.tokenizer:
        raise porting.PortingError(f"ae.safetensors ({inferred}) does not match ae_config.json "
                                   f"({config.tokenizer})")
    tok = port_tokenizer_state_dict(ae_sd, config.tokenizer, what=os.path.join(src, "ae.safetensors"))
    head = port_head_state_dict(porting.load_safetensors(os.path.join(src, "vision_head.safetensors")),
                                config.head, prefix="net.", param_dtype=param_dtype)
    proj_abstract = porting.abstract_params(
        Projector(config.llm.hidden_size, param_dtype=param_dtype),
        jax.ShapeDtypeStruct((1, 1, config.tokenizer.z_channels), jnp.float32))
    projector = porting.convert_state_dict(
        porting.load_safetensors(os.path.join(src, "projector.safetensors")), proj_abstract,
        what=os.path.join(src, "projector.safetensors"))
    return config, {"llm": llm, "head": head, "projector": projector, "tokenizer": tok}


def port_t2i_folder(src: str, dst: str, *, param_dtype=jnp.float32, overwrite: bool = False) -> str:
    """Released folder -> self-describing dir (``bitdance.json`` + Orbax params + text
    tokenizer files). The tokenizer part is also loadable with ``load_tokenizer(dst)``."""
    config, params = read_released_folder(src, param_dtype=param_dtype)
    checkpoint.save_param_dir(dst, KIND, config.to_dict(), params, overwrite=overwrite,
                              extra={"tokenizer": config.tokenizer.to_dict(),
                                     "source": os.path.basename(os.path.abspath(src))})
    for name in TEXT_TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return dst


def load_t2i(path: str, *, param_dtype=jnp.float32, dtype=jnp.float32, mesh=None) -> "T2IPipeline":
    """A pipeline from a released-layout folder or a directory written by ``port_t2i_folder``."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory")
    if os.path.isfile(os.path.join(path, checkpoint.META_FILE)):
        meta = checkpoint.read_meta(path)
        if meta.get("kind") != KIND:
            raise checkpoint.CheckpointError(f"{path} holds a '{meta.get('kind')}' checkpoint, "
                                             f"expected '{KIND}'")
        config = T2IConfig.from_dict(meta["config"])
        abstract = abstract_t2i_params(config, param_dtype)
        if mesh is None:
            shardings = jax.tree.map(lambda _: None, nn.unbox(abstract))
        else:
            shardings = param_shardings(abstract, mesh)
        # Restore straight into the target dtype (and onto the mesh: no full host copy).
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              nn.unbox(abstract), shardings)
        _, params = checkpoint.load_param_dir(path, KIND, target=target)
    else:
        config, params = read_released_folder(path, param_dtype=param_dtype, mesh=mesh)
        if mesh is not None:
            params = place_params(params, config, mesh)
    return T2IPipeline(config, params, TextTokenizer(path), dtype=dtype)


def param_shardings(abstract, mesh):
    """``NamedSharding`` per param from its logical axes on ``mesh``; a dim the mesh axes do
    not divide (e.g. a vocab of 151940 over tensor=8) is replicated instead of split."""
    from jax.sharding import NamedSharding, PartitionSpec
    from bitdance_jax.sharding import logical_sharding

    def fit(sharding, leaf):
        spec = []
        for dim, axes in zip(leaf.shape, tuple(sharding.spec) + (None,) * len(leaf.shape)):
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
            spec.append(axes if dim % ways == 0 else None)
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree.map(fit, logical_sharding(abstract, mesh), nn.unbox(abstract))


def abstract_t2i_params(config: T2IConfig, param_dtype=jnp.float32) -> dict:
    """Boxed param shapes of every part ({"llm", "head", "projector", "tokenizer"}), nothing
    allocated (``jax.eval_shape``); ``param_dtype`` applies to all but the tokenizer."""
    from bitdance_jax.tokenizer_api import abstract_tokenizer_params
    return {
        "llm": _abstract_llm(config, param_dtype),
        "head": porting.abstract_params(DiffusionNet(config.head, param_dtype=param_dtype),
                                        *_head_example(config)),
        "projector": porting.abstract_params(
            Projector(config.llm.hidden_size, param_dtype=param_dtype),
            jax.ShapeDtypeStruct((1, 1, config.tokenizer.z_channels), jnp.float32)),
        # The tokenizer decoder stays float32 (small; it makes the final pixels).
        "tokenizer": abstract_tokenizer_params(config.tokenizer)}


def place_params(params, config: T2IConfig, mesh):
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
    abstract = abstract_t2i_params(config)
    return jax.tree.map(jax.device_put, params, param_shardings(abstract, mesh))


def _head_example(config: T2IConfig):
    p, head = config.parallel_num, config.head
    return (jax.ShapeDtypeStruct((1, p, head.ch_target), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.float32),
            jax.ShapeDtypeStruct((1, p, head.ch_cond), jnp.float32))


# ----------------------------------------------------------------------------- sampling

NoiseSource = Callable[[tuple[int, ...]], Any]


def seeded_noise(seed: int) -> NoiseSource:
    """N(0, 1) draws from ``jax.random.key(seed)``."""
    return lambda shape: jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _prompt_bucket(length: int) -> int:
    """Prompt slots are padded to a multiple of 64 so one compilation serves many prompts."""
    return max(64, -(-length // 64) * 64)


_PROGRESS_BARS: list = []  # the bar the running sample_latents call advances (innermost last)


def _advance_progress(_step):
    if _PROGRESS_BARS:
        _PROGRESS_BARS[-1].update(1)


@dataclasses.dataclass
class SampleTrace:
    """Per image step: the head's condition [steps, N, P, D] and raw prediction [steps, N, P, C]."""
    head_cond: np.ndarray
    head_pred: np.ndarray


class T2IPipeline:
    """Loaded text-to-image model. ``params``: {"llm", "head", "projector", "tokenizer"}."""

    def __init__(self, config: T2IConfig, params, text_tokenizer: TextTokenizer,
                 dtype=jnp.float32):
        self.config = config
        self.params = params
        self.text_tokenizer = text_tokenizer
        self.dtype = dtype
        self.llm = qwen3.Qwen3ForCausalLM(config.llm, dtype=dtype)
        self.head = DiffusionNet(config.head, dtype=dtype)
        self.projector = Projector(config.llm.hidden_size, dtype=dtype)
        self._decode = jax.jit(functools.partial(
            BinaryAutoencoder(config.tokenizer).apply, method="decode"))
        self.pos_table = position_table(config.llm.hidden_size, config.vae_patch_size)

    # -- pieces usable on their own (and checked against the reference one by one)
    def project(self, bits):
        return self.projector.apply({"params": self.params["projector"]}, jnp.asarray(bits))

    def position_embed_2d(self, h: int, w: int, patch_side: int | None = None) -> np.ndarray:
        return position_embed_2d(self.pos_table, h, w,
                                 self.config.patch_side if patch_side is None else patch_side)

    def decode_latents(self, bits_nhwc, seed: int = 0):
        """Binary latents [B, h, w, z] -> images [B, H, W, 3] (float, about [-1, 1]); a GAN
        decoder's N(0, 1) input is drawn from ``seed``."""
        bits = jnp.asarray(bits_nhwc, jnp.float32)
        args = (bits,)
        if self.config.tokenizer.gan_decoder:
            args += (jax.random.normal(jax.random.key(seed), bits.shape, jnp.float32),)
        return self._decode({"params": self.params["tokenizer"]}, *args)

    def check_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent grid of an image size this model can make (size list, patching, and the
        ``<|res_*|>`` tokens); ``ValueError`` otherwise."""
        h, w = self.config.latent_grid(height, width)
        self.text_tokenizer.image_prefix_ids(h, w, self.config.parallel_num)
        return h, w

    # -- the sampling loop
    def sample_latents(self, prompts: Sequence[str] | str, height: int, width: int, *,
                       num_sampling_steps: int = 50, guidance_scale: float = 7.5,
                       num_images: int = 1, noise_source: NoiseSource | None = None,
                       seed: int = 0, trace: bool = False, progress: bool = False):
        """Binary latents [B, h, w, z] (B = num_images, or one per prompt when a list is given,
        each prompt then gets ``num_images``) and, with ``trace``, a ``SampleTrace``.

        ``noise_source(shape)`` returns every N(0, 1) draw at once, shaped
        [image_steps, num_sampling_steps + 1, B, P, z]: per image step the head's initial
        state then one draw per SDE step (the reference's call order). ``progress`` shows a
        bar advanced by the jitted loop after each image step.
        """
        cfg = self.config
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if num_images < 1 or num_sampling_steps < 1:
            raise ValueError(f"num_images and num_sampling_steps must be >= 1, got "
                             f"{num_images} and {num_sampling_steps}")
        h, w = self.check_size(height, width)
        p_num = cfg.parallel_num
        image_steps = h * w // p_num
        tok = self.text_tokenizer
        prefix = tok.image_prefix_ids(h, w, p_num)
        guided = guidance_scale > 1.0
        texts = [cond_prompt(pr) for pr in prompts for _ in range(num_images)]
        if guided:
            texts += [UNCOND_PROMPT] * len(texts)
        # Call 1 holds the prompt ids, <|vision_start|> and <|res_h|>; the block call holds
        # <|res_w|> and the queries.
        heads = [tok.encode(t) + prefix[:2] for t in texts]
        lengths = np.array([len(x) for x in heads], np.int32)
        bucket = _prompt_bucket(int(lengths.max()))
        ids = np.zeros((len(heads), bucket), np.int32)
        for i, x in enumerate(heads):
            ids[i, :len(x)] = x
        batch = len(prompts) * num_images
        noise_shape = (image_steps, num_sampling_steps + 1, batch, p_num, cfg.tokenizer.z_channels)
        noise = jnp.asarray((noise_source or seeded_noise(seed))(noise_shape), jnp.float32)
        if noise.shape != noise_shape:
            raise ValueError(f"noise source gave {noise.shape}, expected {noise_shape}")
        pos = jnp.asarray(self.position_embed_2d(h, w)).reshape(image_steps, p_num, -1)
        run = _sampler(self.llm, self.head, self.projector, cfg.head.time_shift,
                       num_sampling_steps, guided, trace, progress)
        if progress:
            from tqdm import tqdm
            _PROGRESS_BARS.append(tqdm(total=image_steps, desc="image steps", unit="step"))
        try:
            tokens, head_cond, head_pred = run(
                self.params, jnp.asarray(ids), jnp.asarray(lengths),
                jnp.asarray(prefix[2:], jnp.int32), pos, noise, jnp.float32(guidance_scale))
            tokens = np.asarray(tokens)  # wait for the loop (and its progress updates)
        finally:
            if progress:
                jax.effects_barrier()
                _PROGRESS_BARS.pop().close()
        bits = unpatchify(tokens, cfg.patch_side, h, w)
        return (bits, SampleTrace(np.asarray(head_cond), np.asarray(head_pred))) if trace else bits

    def generate(self, prompt: str, height: int = 1024, width: int = 1024,
                 num_sampling_steps: int = 50, guidance_scale: float = 7.5, num_images: int = 1,
                 seed: int = 0, noise_source: NoiseSource | None = None, progress: bool = False):
        """``num_images`` PIL images for ``prompt`` (the reference's ``generate``)."""
        bits = self.sample_latents(prompt, height, width, num_sampling_steps=num_sampling_steps,
                                   guidance_scale=guidance_scale, num_images=num_images,
                                   noise_source=noise_source, seed=seed, progress=progress)
        return to_pil(self.decode_latents(bits, seed=seed))


def to_pil(images) -> list:
    """Float images [B, H, W, 3] in [-1, 1] -> PIL images (the reference's clamp(127.5x+128))."""
    from PIL import Image
    arr = np.clip(127.5 * np.asarray(images, np.float32) + 128.0, 0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


@functools.lru_cache(maxsize=None)
def _sampler(llm, head, projector, time_shift: float, num_sampling_steps: int, guided: bool,
             trace: bool, progress: bool):
    """One jitted sampling loop per (modules, step counts, guidance on/off); shapes (prompt
    bucket, grid, batch) specialise it further through ``jit``'s own cache."""

    @jax.jit
    def run(params, ids, lengths, block_ids, pos, noise, guidance_scale):
        n, bucket = ids.shape
        image_steps, p_num, _ = pos.shape
        batch = n // 2 if guided else n
        cache_len = bucket + p_num * image_steps  # queries block + all fed-back blocks but the last
        slots = jnp.arange(cache_len)
        valid = (slots[None] < lengths[:, None]) | (slots[None] >= bucket)  # [N, S]

        def llm_call(cache, embeds, start, positions, mask):
            return llm.apply({"params": params["llm"]}, inputs_embeds=embeds, positions=positions,
                             attention_mask=mask, kv_cache=cache, cache_index=start,
                             method="trunk")

        def block_call(cache, embeds, block):
            """Block ``block`` (0 = the query tokens) sees all valid slots up to its end."""
            start = bucket + block * p_num
            mask = valid & (slots[None] < start + p_num)
            mask = jnp.broadcast_to(mask[:, None], (n, p_num, cache_len))
            positions = lengths[:, None] + block * p_num + jnp.arange(p_num)[None]
            out = llm_call(cache, embeds, start, positions, mask)
            return out.kv_cache, out.last_hidden_state

        def embed(x):
            return llm.apply({"params": params["llm"]}, x, method="embed")

        cache = qwen3.init_kv_cache(llm.config, n, cache_len, dtype=llm.dtype)
        prompt_mask = (valid[:, None, :] & (slots[None, None, :] <= jnp.arange(bucket)[None, :, None]))
        cache = llm_call(cache, embed(ids), 0, jnp.broadcast_to(jnp.arange(bucket), (n, bucket)),
                         prompt_mask).kv_cache
        cache, hidden = block_call(cache, jnp.broadcast_to(embed(block_ids)[None], (n, p_num, pos.shape[-1])), 0)

        def head_step(hidden, step):
            cond = hidden + pos[step][None]
            draws = noise[step]
            if guided:
                draws = jnp.concatenate([draws, draws], axis=1)
            net = lambda x, t, c: head.apply({"params": params["head"]}, x, t, c)
            pred = euler_maruyama(net, cond, draws, num_steps=draws.shape[0] - 1,
                                  cfg_scale=guidance_scale if guided else 1.0,
                                  time_shift=time_shift)
            return cond, pred

        def body(carry, step):
            cache, hidden = carry
            cond, pred = head_step(hidden, step)
            bits = jnp.sign(pred)
            fed = projector.apply({"params": params["projector"]}, bits) + pos[step][None]
            cache, hidden = block_call(cache, fed.astype(hidden.dtype), step + 1)
            if progress:
                jax.debug.callback(_advance_progress, step)
            return (cache, hidden), (bits[:batch], cond if trace else None, pred if trace else None)

        (cache, hidden), (bits, conds, preds) = jax.lax.scan(
            body, (cache, hidden), jnp.arange(image_steps - 1))
        last_cond, last_pred = head_step(hidden, image_steps - 1)
        if progress:
            jax.debug.callback(_advance_progress, image_steps - 1)
        bits = jnp.concatenate([bits, jnp.sign(last_pred)[None, :batch]], axis=0)
        tokens = bits.transpose(1, 0, 2, 3).reshape(batch, image_steps * p_num, -1)
        if not trace:
            return tokens, None, None
        return (tokens, jnp.concatenate([conds, last_cond[None]]),
                jnp.concatenate([preds, last_pred[None]]))

    return run


# ----------------------------------------------------------------------------- CLI

def read_prompts_file(path: str) -> list[str]:
    """One prompt per non-empty line (the DPG-Bench / GenEval prompt-list form)."""
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts")
    return prompts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="released folder or ported directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts-file", help="text file, one prompt per line")
    p.add_argument("--out", help="PNG path (--prompt; several images get _<i> suffixes)")
    p.add_argument("--out-dir", help="folder for --prompts-file: <line index>[_<i>].png")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50, help="SDE steps of the head per image step")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the first batch (+1 per batch)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts sampled together")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="param and compute dtype")
    args = p.parse_args(argv)
    from tqdm import tqdm

    try:
        if args.prompt is not None and not args.out:
            raise ValueError("--prompt needs --out")
        if args.prompts_file is not None and not args.out_dir:
            raise ValueError("--prompts-file needs --out-dir")
        prompts = [args.prompt] if args.prompt is not None else read_prompts_file(args.prompts_file)
        dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        pipe = load_t2i(args.ckpt, param_dtype=dtype, dtype=dtype)
        pipe.check_size(args.height, args.width)  # fail before any work
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        written = []
        bar = tqdm(total=len(prompts), desc="prompts", unit="prompt", disable=len(prompts) == 1)
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start:start + args.batch_size]
            seed = args.seed + start // args.batch_size
            bits = pipe.sample_latents(chunk, args.height, args.width,
                                       num_sampling_steps=args.steps,
                                       guidance_scale=args.guidance_scale,
                                       num_images=args.num_images, seed=seed,
                                       progress=len(prompts) == 1)
            images = to_pil(pipe.decode_latents(bits, seed=seed))
            for k, im in enumerate(images):
                i, j = start + k // args.num_images, k % args.num_images
                if args.prompt is not None:
                    stem, ext = os.path.splitext(args.out)
                    path = args.out if args.num_images == 1 else f"{stem}_{j}{ext or '.png'}"
                else:
                    name = f"{i:05d}.png" if args.num_images == 1 else f"{i:05d}_{j}.png"
                    path = os.path.join(args.out_dir, name)
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                im.save(path)
                written.append(path)
            bar.update(len(chunk))
        bar.close()
    except (ValueError, FileNotFoundError, porting.PortingError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"images": len(written), "first": written[0] if written else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
