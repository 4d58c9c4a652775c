"""Text-to-image BitDance training (the reference released no T2I trainer; this goes beyond it).

Rows pack several (caption, image) samples (``bitdance_jax.data.packing``); the loss is the vision flow loss of
the head on every image block (weight ``loss.vision_weight``, 1.0) plus the LM's next-token
cross-entropy on the text part of every sample (``loss.text_weight``, 0.01). Per step, each
sample's caption is dropped with probability ``loss.caption_drop`` (its chat-formatted prompt
becomes the unconditional one: the caption tokens are hidden and the positions after them
shifted back, exactly what packing the unconditional prompt gives) and the fed-back input
latents get bit flips (``loss.bit_flip_rate``). The frozen binary tokenizer encodes the images
inside the step, or once up front into a latent cache (``data.cache_latents``; needed when the
buckets have different image shapes, since the step is compiled once).
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bitdance_jax import images as image_lib
from bitdance_jax.c2i.loss import flip_bits
from bitdance_jax.checkpointing import fingerprint
from bitdance_jax.data import captions, latent_cache, packing
from bitdance_jax.data.word_tokenizer import build_word_tokenizer, extend_text_tokenizer
from bitdance_jax.nn import patching
from bitdance_jax.nn.layers import DTYPES
from bitdance_jax.parallel import distributed
from bitdance_jax.porting import t2i as t2i_porting
from bitdance_jax.t2i import io as t2i_io
from bitdance_jax.t2i import qwen3
from bitdance_jax.t2i.config import T2IConfig
from bitdance_jax.t2i.loss import PackedT2IModel
from bitdance_jax.t2i.pipeline import T2IPipeline
from bitdance_jax.t2i.prompts import TextTokenizer
from bitdance_jax.tokenizer.api import load_tokenizer
from bitdance_jax.tokenizer.model import quantize_signs
from bitdance_jax.train.tasks.base import Task
from bitdance_jax.nn.precision import lax_precision

TEXT_TOKENIZER_FILE = "tokenizer.json"
log = logging.getLogger(__name__)


def text_vocab_size(path: str) -> int:
    """Rows the embedding needs for a ``tokenizer.json``: its largest id + 1."""
    from tokenizers import Tokenizer
    return max(Tokenizer.from_file(path).get_vocab().values()) + 1


def weighted_mean(values, weights):
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


class T2ITask(Task):
    """Trainer task (``config.kind == "t2i"``): params {"llm", "head", "projector"}."""
    kind = "t2i"

    def __init__(self, config, workdir: str | None = None, tokenizer=None):
        if tokenizer is None and not config.tokenizer_dir:
            raise ValueError("config.tokenizer_dir must name a trained or ported binary tokenizer "
                             "directory (train one with configs/digits_tokenizer.py)")
        super().__init__(config, workdir)
        self.tokenizer = tokenizer or load_tokenizer(config.tokenizer_dir)
        self.dtype = DTYPES[config.compute_dtype]
        self.source = captions.make_caption_source(config.data)
        self.captions = captions.source_captions(self.source)
        self.buckets = [tuple(int(v) for v in bkt) for bkt in config.data.buckets]
        if not self.buckets:
            raise ValueError("config.data.buckets lists no (height, width)")
        head_kwargs = dict(config.head.to_dict(), ch_target=self.tokenizer.config.z_channels,
                           ch_cond=config.llm.hidden_size)
        probe = T2IConfig(llm=self._llm_config(1), head_kwargs=head_kwargs,
                              tokenizer=self.tokenizer.config)
        self.grids = [probe.latent_grid(h, w) for h, w in self.buckets]
        self.llm_folder = self._check_llm_folder()
        self.text_tokenizer_path = self._text_tokenizer()
        self.text_tokenizer = TextTokenizer(self.text_tokenizer_path)
        text_vocab = text_vocab_size(self.text_tokenizer_path)
        vocab = config.llm.vocab_size or max(
            text_vocab, self.llm_folder.vocab_size if self.llm_folder is not None else 0)
        if vocab < text_vocab:
            raise ValueError(f"config.llm.vocab_size {vocab} is smaller than the text tokenizer's "
                             f"{text_vocab} tokens ({self.text_tokenizer_path})")
        self.model_config = T2IConfig(llm=self._llm_config(vocab), head_kwargs=head_kwargs,
                                          tokenizer=self.tokenizer.config)
        precision = config.get("matmul_precision", "default")
        lax_precision(precision)  # validates
        self.model = PackedT2IModel(self.model_config, self.dtype,
                                    precision=precision)
        self.sample_tokenizer = packing.SampleTokenizer(self.text_tokenizer,
                                                         self.model_config.parallel_num)
        self.spec = self._row_spec()
        self.tokens_per_example = self.spec.seq_len
        self.from_images = not config.data.cache_latents
        if self.from_images and len(set(self.buckets)) > 1:
            raise ValueError("buckets of different image shapes need data.cache_latents=True "
                             "(the compiled step takes one image shape)")

    # -- construction helpers ------------------------------------------------------------
    def _llm_config(self, vocab_size: int) -> qwen3.Qwen3Config:
        return qwen3.Qwen3Config(**dict(self.config.llm.to_dict(), vocab_size=vocab_size))

    def _check_llm_folder(self) -> qwen3.Qwen3Config | None:
        """The Qwen3 config of ``config.init_from_llm`` (None when unset), checked against
        ``config.llm``."""
        c = self.config
        if not c.init_from_llm:
            return None
        if c.init_from:
            raise ValueError("set one of config.init_from (a T2I directory) and "
                             "config.init_from_llm (a Qwen3 folder), not both")
        if c.text_tokenizer:
            raise ValueError("config.init_from_llm brings its own text tokenizer (extended with "
                             "the vision tokens); leave config.text_tokenizer empty")
        if not os.path.isfile(os.path.join(c.init_from_llm, TEXT_TOKENIZER_FILE)):
            raise ValueError(f"init_from_llm {c.init_from_llm} has no {TEXT_TOKENIZER_FILE}")
        return t2i_porting.check_llm_folder(c.init_from_llm, self._llm_config(c.llm.vocab_size))

    def _text_tokenizer(self) -> str:
        if self.config.text_tokenizer:
            return self.config.text_tokenizer
        if not self.workdir:
            raise ValueError("config.text_tokenizer is empty and there is no workdir to build "
                             "a text tokenizer in")
        path = os.path.join(self.workdir, "text_tokenizer", TEXT_TOKENIZER_FILE)
        sides = dict(max_latent_side=max(max(g) for g in self.grids),
                     parallel_num=int(self.config.head.parallel_num))

        def build():  # process 0 writes it once; the others wait, then read it
            if os.path.isfile(path):
                return
            if self.config.init_from_llm:  # the LLM's tokenizer plus the vision tokens
                extend_text_tokenizer(os.path.join(self.config.init_from_llm, TEXT_TOKENIZER_FILE),
                                      path, **sides)
            else:
                build_word_tokenizer(path, self.captions + list(self.config.sample.prompts),
                                     **sides)

        distributed.run_once("t2i_text_tokenizer", build)
        return path

    def _row_spec(self) -> packing.RowSpec:
        P = self.model_config.parallel_num
        max_blocks = max(h * w // P for h, w in self.grids)
        seq_len = self.config.data.seq_len
        if not seq_len:
            longest = max(len(self.sample_tokenizer(c, *self.grids[0]).text_ids)
                          for c in set(self.captions))
            seq_len = self.config.data.max_samples_per_row * (longest + P * max_blocks)
        return packing.RowSpec(seq_len=seq_len, max_samples=self.config.data.max_samples_per_row,
                                max_blocks=max_blocks, parallel_num=P)

    # -- data ------------------------------------------------------------------------------
    def train_source(self):
        bucket_of = packing.assign_buckets(self.source, self.buckets)
        load = (packing.ImageSamples(self.source) if self.from_images
                else packing.LatentSamples(self._latent_cache(bucket_of)))
        return packing.PackedRows(
            self.source, self.captions, bucket_of, self.grids, self.sample_tokenizer, self.spec,
            self.model_config.patch_side, seed=self.config.seed, load_sample=load)

    def train_dataset(self, rows, data_cfg, *, global_batch, num_steps, seed):
        """The trainer's input: Grain batches of packed rows, each global batch one bucket."""
        if seed != rows.seed:
            raise ValueError(f"rows were planned with seed {rows.seed}, not {seed}")
        rows.batched(global_batch, jax.process_index(), jax.process_count())
        return packing.make_packed_dataset(rows, num_steps, data_cfg)

    def _latent_cache(self, bucket_of) -> np.ndarray:
        """int8 latents [records, max_blocks * P, z] in patch order (zero-padded), encoded
        once into ``data.cache_dir`` (default ``workdir/latent_cache``)."""
        c = self.config.data
        cache_dir = c.cache_dir or os.path.join(self.workdir or ".", "latent_cache")
        tokens = self.spec.max_blocks * self.spec.parallel_num
        meta = {"num_records": len(self.source), "buckets": [list(b) for b in self.buckets],
                "tokens": tokens, "tokenizer": self.tokenizer.config.to_dict(),
                "tokenizer_params": fingerprint.tree_digest(self.tokenizer.params)}

        def encode_chunk(indices):
            images = np.stack([self.source[int(r)]["image"] for r in indices])
            bits = self.tokenizer.encode(image_lib.from_uint8(images))
            seq = patching.patchify(np.asarray(bits), self.model_config.patch_side)
            return {"latents": np.pad(seq, ((0, 0), (0, tokens - seq.shape[1]), (0, 0)))}

        # A chunk is stacked into one batch, so it holds records of one bucket only.
        by_bucket = [np.flatnonzero(bucket_of == b) for b in range(len(self.buckets))]
        chunks = [r[s:s + 64] for r in by_bucket for s in range(0, len(r), 64)]
        return latent_cache.build(cache_dir, meta, len(self.source), chunks,
                                  encode_chunk)["latents"]

    # -- model -----------------------------------------------------------------------------
    def init(self, rng):
        return self.model.init(rng)

    def pretrained_params(self):
        """With ``config.init_from_llm``: the folder's Qwen3 weights, the embedding and LM
        head grown by the rows of the added tokens (see ``read_llm_for_training``), and the
        projector and head as a fresh run initialises them."""
        if not self.config.init_from_llm:
            return None
        from tokenizers import Tokenizer
        original = Tokenizer.from_file(os.path.join(self.config.init_from_llm,
                                                    TEXT_TOKENIZER_FILE))
        new_ids = [i for t, i in Tokenizer.from_file(self.text_tokenizer_path).get_vocab().items()
                   if original.token_to_id(t) is None]
        llm = t2i_porting.read_llm_for_training(self.config.init_from_llm,
                                                self.model_config.llm, new_ids)
        rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 1 << 20)  # as the trainer
        # Only the head and projector are computed (XLA drops the unused LLM init).
        fresh = jax.jit(lambda r: {k: v for k, v in nn.unbox(self.init(r)).items()
                                   if k != "llm"})(rng)
        log.info("LLM from %s (%d new token rows, vocabulary %d); projector and head fresh",
                 self.config.init_from_llm, len(new_ids), self.model_config.llm.vocab_size)
        return {"llm": llm, **jax.device_get(fresh)}

    def frozen(self):
        return {"tokenizer": self.tokenizer.params} if self.from_images else {}

    def batch_tokens(self, frozen, batch):
        """{-1, +1} latents [B, S, N*P, z] of the batch's samples (encoded here from images)."""
        if "latents" in batch:
            return batch["latents"].astype(jnp.float32)
        images = batch["image"]
        b, s = images.shape[:2]
        x = image_lib.from_uint8(images.reshape((b * s,) + images.shape[2:]))
        h = self.tokenizer.model.apply({"params": frozen["tokenizer"]}, x, method="encode_pre")
        bits = jax.lax.stop_gradient(quantize_signs(h.astype(jnp.float32)))
        seq = patching.patchify(bits, self.model_config.patch_side)
        return seq.reshape(b, s, -1, seq.shape[-1])

    def loss(self, params, frozen, batch, rng, step):
        lc = self.config.loss
        tokens = self.batch_tokens(frozen, batch)
        b, s, np_, z = tokens.shape
        P, mul = self.model_config.parallel_num, self.model_config.head.diff_batch_mul
        k_flip, k_drop, k_t, k_noise = jax.random.split(rng, 4)
        inputs = flip_bits(k_flip, tokens, lc.bit_flip_rate) if lc.bit_flip_rate else tokens
        dropped = jax.random.uniform(k_drop, (b, s)) < lc.caption_drop
        t_raw = jax.random.normal(k_t, (mul, b, s, np_ // P))
        noise = jax.random.normal(k_noise, (mul, b, s, np_ // P, P, z))
        vision, text_ce, text_w = self.model.losses(params, tokens, batch, t_raw, noise,
                                                    input_tokens=inputs, dropped=dropped)
        block_w = jnp.broadcast_to(batch["block_valid"][None], vision.shape)
        vision_loss = weighted_mean(vision, block_w)
        text_loss = weighted_mean(text_ce, text_w)
        loss = lc.vision_weight * vision_loss + lc.text_weight * text_loss
        return loss, {"vision_loss": vision_loss, "text_loss": text_loss,
                      "caption_dropped": weighted_mean(dropped.astype(jnp.float32),
                                                       batch["slot_valid"])}

    def params_from_checkpoint(self, meta, params):
        missing = [k for k in ("llm", "head", "projector") if k not in params]
        if missing:
            raise ValueError(f"{self.config.init_from} holds no T2I params {missing} "
                             f"(kind {meta.get('kind')!r})")
        params = {k: params[k] for k in ("llm", "head", "projector")}
        expected = jax.eval_shape(lambda: nn.unbox(self.init(jax.random.PRNGKey(0))))
        got = jax.tree_util.tree_flatten_with_path(params)[0]
        want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
        bad = [f"{jax.tree_util.keystr(k)}: {np.shape(v)} vs {want[k].shape}" if k in want
               else f"{jax.tree_util.keystr(k)}: not in the model" for k, v in got
               if k not in want or np.shape(v) != want[k].shape]
        bad += [f"{jax.tree_util.keystr(k)}: missing" for k in set(want) - {k for k, _ in got}]
        if bad:
            raise ValueError(f"{self.config.init_from} does not fit config.llm / config.head: "
                             + "; ".join(sorted(bad)[:10]))
        return params

    # -- samples / export ------------------------------------------------------------------
    def pipeline(self, ema_params) -> T2IPipeline:
        params = jax.device_get({"llm": ema_params["llm"], "head": ema_params["head"],
                                 "projector": ema_params["projector"],
                                 "tokenizer": self.tokenizer.params})
        return T2IPipeline(self.model_config, params, self.text_tokenizer, dtype=self.dtype)

    def sample_grid(self, ema_params, source, path, seed):
        """One row per ``sample.prompts`` entry at the first bucket's size (none: skipped)."""
        del source
        s = self.config.sample
        if not s.prompts:
            return None
        pipe = self.pipeline(ema_params)
        height, width = self.buckets[0]
        bits = pipe.sample_latents(list(s.prompts), height, width, num_sampling_steps=s.num_steps,
                                   guidance_scale=s.cfg_scale, num_images=s.num_images, seed=seed)
        images = image_lib.to_uint8(np.asarray(pipe.decode_latents(bits, seed=seed)))
        return image_lib.save_png(image_lib.make_grid(images, s.num_images), path)

    def export(self, ema_params, dst):
        """A directory ``t2i.load_t2i`` reads (params + bitdance.json + tokenizer.json)."""
        params = jax.device_get({"llm": ema_params["llm"], "head": ema_params["head"],
                                 "projector": ema_params["projector"],
                                 "tokenizer": self.tokenizer.params})
        # Every process (the Orbax save is a collective); the tokenizer file is copied once,
        # into the directory before it is renamed into place.
        return t2i_io.save_t2i(dst, self.model_config, params, source="bitdance_jax.train",
                               text_tokenizer_files={TEXT_TOKENIZER_FILE: self.text_tokenizer_path},
                               overwrite=True)
