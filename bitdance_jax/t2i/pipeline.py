"""The loaded text-to-image model: ``load_t2i`` and ``T2IPipeline`` (prompts in, latents and images out)."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bitdance_jax import hub
from bitdance_jax import images as image_lib
from bitdance_jax.checkpointing.atomic import recover
from bitdance_jax.nn import quant
from bitdance_jax.nn.diffusion_head import DiffusionNet
from bitdance_jax.nn.precision import PrecisionLike, resolve_dtype
from bitdance_jax.nn.patching import unpatchify
from bitdance_jax.porting.t2i import read_released_folder
from bitdance_jax.t2i import io as t2i_io
from bitdance_jax.t2i import qwen3
from bitdance_jax.t2i.config import T2IConfig
from bitdance_jax.t2i.model import (Projector, place_params, position_embed_2d,
                                    position_table)
from bitdance_jax.t2i.prompts import UNCOND_PROMPT, TextTokenizer, cond_prompt
from bitdance_jax.sampling import next_patch
from bitdance_jax.t2i.sampler import prompt_bucket, sampler
from bitdance_jax.tokenizer.model import BinaryAutoencoder

# ``noise_source(shape)``: every N(0, 1) draw of a call at once (recorded draws in tests).
NoiseSource = Callable[[tuple[int, ...]], Any]
# The LLM methods the sampler applies (each takes quantized kernels when quantized).
LLM_METHODS = ("__call__", "trunk", "embed")

def load_t2i(path: str, *, param_dtype=jnp.float32, dtype=None, mesh=None,
             precision: PrecisionLike = None, attention_impl: str = "auto",
             quantize: str | None = None) -> "T2IPipeline":
    """A pipeline from a released-layout folder or a directory written by ``port_t2i_folder``.

    ``param_dtype``: stored dtype of the LLM, head and projector params (bfloat16 halves the
    memory, as the reference's bf16 LLM); ``dtype``: the compute policy, None = the backend's
    default (bf16-mixed on GPU/TPU, float32 on CPU). ``path`` may be a Hub id ``hf:owner/name``.
    ``quantize`` ("int8", "fp8"): weight-only quantized kernels (``nn.quant``), quantized one
    tensor at a time as they are read; a directory ported with ``--quantize`` loads as it is
    stored (None: its own mode)."""
    quant.check_mode(quantize)
    path = hub.resolve(path, param_dtype=jnp.dtype(param_dtype).name, quantize=quantize)
    recover(os.path.abspath(path))  # a crash while an export was being replaced
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory")
    if t2i_io.is_t2i_dir(path):
        config, params = t2i_io.load(path, param_dtype=param_dtype, mesh=mesh, quantize=quantize)
        quantize = t2i_io.stored_quantization(path) or quantize
    else:
        config, params = read_released_folder(path, param_dtype=param_dtype, mesh=mesh,
                                              quantize=quantize)
        if mesh is not None:
            params = place_params(params, config, mesh, quantize)
    return T2IPipeline(config, params, TextTokenizer(path), dtype=dtype, precision=precision,
                       attention_impl=attention_impl, quantize=quantize)



@dataclasses.dataclass
class SampleTrace:
    """Per image step: the head's condition [steps, N, P, D] and raw prediction [steps, N, P, C]."""
    head_cond: np.ndarray
    head_pred: np.ndarray


class T2IPipeline:
    """Loaded text-to-image model. ``params``: {"llm", "head", "projector", "tokenizer"}.

    ``dtype``: compute policy (None: bf16-mixed on GPU/TPU, float32 on CPU); the tokenizer
    decoder always runs in float32. ``quantize``: the mode the LLM, head and projector
    kernels of ``params`` are quantized in (``nn.quant``), None for float params."""

    def __init__(self, config: T2IConfig, params, text_tokenizer: TextTokenizer,
                 dtype=None, precision: PrecisionLike = None, attention_impl: str = "auto",
                 quantize: str | None = None):
        self.config = config
        self.quantize = quant.check_mode(quantize)
        self.text_tokenizer = text_tokenizer
        self.dtype = dtype = resolve_dtype(dtype)
        self.params = quant.cast_scales(params, dtype) if quantize else params
        self.precision = precision
        kw = dict(dtype=dtype, precision=precision)
        self.llm = quant.quantized(qwen3.Qwen3ForCausalLM(config.llm, attention_impl=attention_impl,
                                                          **kw), quantize, LLM_METHODS)
        self.head = quant.quantized(DiffusionNet(config.head, attention_impl=attention_impl, **kw),
                                    quantize)
        self.progress_hook = next_patch.ProgressHook()
        self.projector = quant.quantized(Projector(config.llm.hidden_size, **kw), quantize)
        self._decode = jax.jit(functools.partial(
            BinaryAutoencoder(config.tokenizer, precision=precision).apply, method="decode"))
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
                       seed: int = 0, sample_indices: Sequence[int] | None = None,
                       trace: bool = False, progress: bool | Callable[[int, int], None] = False,
                       prompt_slots: int | None = None):
        """Binary latents [B, h, w, z] (B = num_images, or one per prompt when a list is given,
        each prompt then gets ``num_images``) and, with ``trace``, a ``SampleTrace``.

        Row r's draws come from (``seed``, ``sample_indices[r]``) alone, inside the jitted
        loop (default indices 0..B-1, so image j of prompt k is sample k * num_images + j):
        an image never depends on the batch it shares. ``noise_source(shape)`` instead gives
        every N(0, 1) draw at once, shaped [image_steps, num_sampling_steps + 1, B, P, z]: per
        image step the head's initial state then one draw per SDE step (the reference's call
        order). ``progress``: True shows a bar, a callable gets ``(steps_done, image_steps)``
        after each image step (through ``self.progress_hook``). ``prompt_slots`` (a multiple of
        64) pads every prompt to that many token slots, so a server compiles one program for
        all prompts up to that length; ``None`` takes the smallest bucket that fits.
        """
        cfg = self.config
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if num_images < 1 or num_sampling_steps < 1:
            raise ValueError(f"num_images and num_sampling_steps must be >= 1, got "
                             f"{num_images} and {num_sampling_steps}")
        if not 0.0 <= guidance_scale < float("inf"):
            raise ValueError(f"guidance_scale must be a finite number >= 0 (<= 1: no "
                             f"guidance), got {guidance_scale}")
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
        bucket = prompt_bucket(int(lengths.max()))
        if prompt_slots is not None:
            if prompt_slots != prompt_bucket(prompt_slots):
                raise ValueError(f"prompt_slots must be a positive multiple of 64, got {prompt_slots}")
            if bucket > prompt_slots:
                raise ValueError(f"a prompt of {int(lengths.max())} tokens does not fit in "
                                 f"{prompt_slots} prompt slots")
            bucket = prompt_slots
        ids = np.zeros((len(heads), bucket), np.int32)
        for i, x in enumerate(heads):
            ids[i, :len(x)] = x
        batch = len(prompts) * num_images
        if noise_source is not None:
            noise_shape = (image_steps, num_sampling_steps + 1, batch, p_num, cfg.tokenizer.z_channels)
            draws = jnp.asarray(noise_source(noise_shape), jnp.float32)
            if draws.shape != noise_shape:
                raise ValueError(f"noise source gave {draws.shape}, expected {noise_shape}")
            noise = next_patch.RecordedNoise(draws)
        else:
            idx = np.arange(batch) if sample_indices is None else np.asarray(sample_indices)
            if idx.shape != (batch,) or not np.issubdtype(idx.dtype, np.integer):
                raise ValueError(f"sample_indices must be {batch} integers (one per image), "
                                 f"got {sample_indices!r}")
            noise = next_patch.KeyedNoise(jnp.int32(seed), jnp.asarray(idx, jnp.int32))
        pos = jnp.asarray(self.position_embed_2d(h, w)).reshape(image_steps, p_num, -1)
        run = sampler(self.llm, self.head, self.projector, cfg.head.time_shift,
                      num_sampling_steps, guided, trace, self.progress_hook if progress else None)
        with contextlib.ExitStack() as stack:
            if progress is True:
                from tqdm import tqdm
                bar = stack.enter_context(tqdm(total=image_steps, desc="image steps", unit="step"))
                listener = lambda step: bar.update(1)
            elif progress:
                listener = lambda step: progress(step + 1, image_steps)
            if progress:
                stack.enter_context(self.progress_hook.reporting(listener))
            tokens, head_cond, head_pred = run(
                self.params, jnp.asarray(ids), jnp.asarray(lengths),
                jnp.asarray(prefix[2:], jnp.int32), pos, noise, jnp.float32(guidance_scale))
            tokens = np.asarray(tokens)  # wait for the loop (and its progress updates)
        bits = unpatchify(tokens, cfg.patch_side, h, w)
        return (bits, SampleTrace(np.asarray(head_cond), np.asarray(head_pred))) if trace else bits

    def prompt_tokens(self, prompt: str) -> int:
        """Token slots ``prompt`` takes in the first call (template and image prefix included)."""
        return len(self.text_tokenizer.encode(cond_prompt(prompt))) + 2

    def generate(self, prompt: str, height: int = 1024, width: int = 1024,
                 num_sampling_steps: int = 50, guidance_scale: float = 7.5, num_images: int = 1,
                 seed: int = 0, noise_source: NoiseSource | None = None,
                 progress: bool | Callable[[int, int], None] = False,
                 prompt_slots: int | None = None):
        """``num_images`` PIL images for ``prompt`` (the reference's ``generate``)."""
        bits = self.sample_latents(prompt, height, width, num_sampling_steps=num_sampling_steps,
                                   guidance_scale=guidance_scale, num_images=num_images,
                                   noise_source=noise_source, seed=seed, progress=progress,
                                   prompt_slots=prompt_slots)
        return to_pil(self.decode_latents(bits, seed=seed))


def to_pil(images) -> list:
    """Float images [B, H, W, 3] in [-1, 1] -> PIL images (the reference's clamp(127.5x+128))."""
    from PIL import Image
    arr = image_lib.to_uint8_like_reference(images)
    return [Image.fromarray(a) for a in arr]
