"""Text-to-image BitDance training (the reference released no T2I trainer; this goes beyond it).

Rows pack several (caption, image) samples (``data_t2i``); the loss is the vision flow loss of
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

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from bitdance_jax import checkpoint, data_t2i, patching, qwen3, t2i
from bitdance_jax import images as image_lib
from bitdance_jax.diffusion_head import DiffusionNet, example_inputs
from bitdance_jax.flow import flow_matching_loss
from bitdance_jax.layers import DTYPES
from bitdance_jax.model import flip_bits
from bitdance_jax.tokenizer import quantize_signs
from bitdance_jax.tokenizer_api import load_tokenizer
from bitdance_jax.train_config import base_config

TEXT_TOKENIZER_FILE = "tokenizer.json"
LATENT_CACHE_META = "t2i_latent_cache.json"


def t2i_base_config() -> ml_collections.ConfigDict:
    """Every field the T2I task reads (``configs/*_t2i.py`` start from this)."""
    c = base_config("t2i")
    c.tokenizer_dir = ""              # a trained / ported binary tokenizer (frozen)
    c.text_tokenizer = ""             # tokenizer.json; "" builds a word-level one from the captions
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


def _segment_take(per_slot, segment_ids):
    """``per_slot [B, S]`` at each position's sample (zero on padding)."""
    slot = jnp.clip(segment_ids - 1, 0, per_slot.shape[1] - 1)
    return jnp.where(segment_ids > 0, jnp.take_along_axis(per_slot, slot, axis=1), 0)


def packed_attention_mask(segment_ids, block_ids, key_visible=None):
    """``[B, L, L]``: same sample, not padding, key block <= query block (text positions
    are one-token blocks), and the key visible (not a dropped caption token)."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids > 0)[:, None, :]
    ordered = block_ids[:, None, :] <= block_ids[:, :, None]
    mask = same & real & ordered
    if key_visible is not None:
        mask = mask & key_visible[:, None, :]
    return mask


def apply_caption_drop(batch, dropped):
    """(positions, key_visible, text_weights) after dropping the captions of the samples
    flagged in ``dropped [B, S]``."""
    seg = batch["segment_ids"]
    in_dropped = _segment_take(dropped.astype(jnp.int32), seg) > 0
    hidden = batch["caption_mask"] & in_dropped
    shift = jnp.where(in_dropped & ~batch["caption_mask"],
                      _segment_take(batch["caption_len"], seg), 0)
    return (batch["positions"] - shift, ~hidden,
            batch["text_weights"] * (~hidden).astype(jnp.float32))


class T2IModel:
    """The trained parts (Qwen3, vision head, projector) and the packed-row forward."""

    def __init__(self, config: t2i.T2IConfig, dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        self.llm = qwen3.Qwen3ForCausalLM(config.llm, dtype=dtype)
        self.head = DiffusionNet(config.head, dtype=dtype)
        self.projector = t2i.Projector(config.llm.hidden_size, dtype=dtype)
        self.pos_table = t2i.position_table(config.llm.hidden_size, config.vae_patch_size)

    def init(self, rng):
        k_llm, k_head, k_proj = jax.random.split(rng, 3)
        cfg = self.config
        head_args = example_inputs(cfg.head)
        return {"llm": self.llm.init(k_llm, jnp.zeros((1, 1), jnp.int32))["params"],
                "head": self.head.init(k_head, *head_args)["params"],
                "projector": self.projector.init(
                    k_proj, jnp.zeros((1, 1, cfg.tokenizer.z_channels)))["params"]}

    def position_embed(self, token_rc):
        """2D sin-cos embedding [..., D] of latents at (row, col) ``token_rc [..., 2]``."""
        table = jnp.asarray(self.pos_table)
        return jnp.concatenate([table[token_rc[..., 1]], table[token_rc[..., 0]]], axis=-1)

    def forward(self, params, tokens, batch, *, input_tokens=None, dropped=None):
        """Head conditions [B, S, N, P, D] (hidden state of block m plus the position
        embedding of image block m), final hidden states [B, L, D] and text weights [B, L].

        ``tokens [B, S, N*P, z]``: each sample's latents in patch order; ``input_tokens``:
        what is fed back (e.g. bit-flipped; default ``tokens``); ``dropped [B, S]``: samples
        whose caption is dropped.
        """
        cfg = self.config
        P, D = cfg.parallel_num, cfg.llm.hidden_size
        b, s, tokens_per_slot, _ = tokens.shape
        n = tokens_per_slot // P
        llm_vars = {"params": params["llm"]}
        if dropped is None:
            dropped = jnp.zeros((b, s), jnp.bool_)
        positions, key_visible, text_weights = apply_caption_drop(batch, dropped)
        mask = packed_attention_mask(batch["segment_ids"], batch["block_ids"], key_visible)

        pos = self.position_embed(batch["token_rc"])                      # [B, S, N*P, D]
        fed_tokens = tokens if input_tokens is None else input_tokens
        image_embeds = self.projector.apply({"params": params["projector"]},
                                            fed_tokens.astype(jnp.float32)) + pos
        image_embeds = image_embeds.reshape(b, s * tokens_per_slot, D)
        feed = batch["image_feed"]
        fed = jnp.take_along_axis(image_embeds, jnp.maximum(feed, 0)[..., None], axis=1)
        text_embeds = self.llm.apply(llm_vars, batch["input_ids"], method="embed")
        embeds = jnp.where((feed >= 0)[..., None], fed.astype(text_embeds.dtype), text_embeds)
        hidden = self.llm.apply(llm_vars, inputs_embeds=embeds, positions=positions,
                                attention_mask=mask, method="trunk").last_hidden_state

        where = (batch["cond_start"][..., None] + jnp.arange(P)).reshape(b, s * n * P)
        cond = jnp.take_along_axis(hidden, where[..., None], axis=1).reshape(b, s, n, P, D)
        cond = cond.astype(jnp.float32) + pos.reshape(b, s, n, P, D)
        return cond, hidden, text_weights

    def losses(self, params, tokens, batch, t_raw, noise, *, input_tokens=None, dropped=None):
        """Per-block vision loss [mul, B, S, N], per-position text CE [B, L] and the text
        weights [B, L] of a packed batch (arguments as ``forward``; ``t_raw [mul, B, S, N]``
        and ``noise [mul, B, S, N, P, z]`` are the flow draws)."""
        cfg = self.config
        P, D = cfg.parallel_num, cfg.llm.hidden_size
        b, s, tokens_per_slot, z = tokens.shape
        n = tokens_per_slot // P
        cond, hidden, text_weights = self.forward(params, tokens, batch,
                                                  input_tokens=input_tokens, dropped=dropped)
        mul = t_raw.shape[0]
        target = jnp.broadcast_to(tokens.reshape(b, s, n, P, z).astype(jnp.float32),
                                  (mul, b, s, n, P, z)).reshape(-1, P, z)
        cond = jnp.broadcast_to(cond, (mul, b, s, n, P, D)).reshape(-1, P, D)
        head = lambda x, t, c: self.head.apply({"params": params["head"]}, x, t, c)
        h = cfg.head
        vision = flow_matching_loss(head, target, cond, t_raw.reshape(-1),
                                    noise.reshape(target.shape), P_mean=h.P_mean, P_std=h.P_std,
                                    time_shift=h.time_shift, reduce="channels")
        vision = vision.mean(axis=-1).reshape(mul, b, s, n)

        logits = self.llm.apply({"params": params["llm"]}, hidden,
                                method="logits").astype(jnp.float32)
        text_ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["text_targets"])
        return vision, text_ce, text_weights


def text_vocab_size(path: str) -> int:
    from tokenizers import Tokenizer
    return Tokenizer.from_file(path).get_vocab_size()


def weighted_mean(values, weights):
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


class T2ITask:
    """Trainer task (``config.kind == "t2i"``): params {"llm", "head", "projector"}."""
    kind = "t2i"

    def __init__(self, config, workdir: str | None = None):
        if not config.tokenizer_dir:
            raise ValueError("config.tokenizer_dir must name a trained or ported binary tokenizer "
                             "directory (train one with configs/digits_tokenizer.py)")
        self.config, self.workdir = config, workdir
        self.tokenizer = load_tokenizer(config.tokenizer_dir)
        self.dtype = DTYPES[config.compute_dtype]
        self.source = data_t2i.make_caption_source(config.data)
        self.captions = data_t2i.source_captions(self.source)
        self.buckets = [tuple(int(v) for v in bkt) for bkt in config.data.buckets]
        if not self.buckets:
            raise ValueError("config.data.buckets lists no (height, width)")
        head_kwargs = dict(config.head.to_dict(), ch_target=self.tokenizer.config.z_channels,
                           ch_cond=config.llm.hidden_size)
        probe = t2i.T2IConfig(llm=self._llm_config(1), head_kwargs=head_kwargs,
                              tokenizer=self.tokenizer.config)
        self.grids = [probe.latent_grid(h, w) for h, w in self.buckets]
        self.text_tokenizer_path = self._text_tokenizer()
        self.text_tokenizer = t2i.TextTokenizer(self.text_tokenizer_path)
        text_vocab = text_vocab_size(self.text_tokenizer_path)
        vocab = config.llm.vocab_size or text_vocab
        if vocab < text_vocab:
            raise ValueError(f"config.llm.vocab_size {vocab} is smaller than the text tokenizer's "
                             f"{text_vocab} tokens ({self.text_tokenizer_path})")
        self.model_config = t2i.T2IConfig(llm=self._llm_config(vocab), head_kwargs=head_kwargs,
                                          tokenizer=self.tokenizer.config)
        self.model = T2IModel(self.model_config, self.dtype)
        self.sample_tokenizer = data_t2i.SampleTokenizer(self.text_tokenizer,
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

    def _text_tokenizer(self) -> str:
        if self.config.text_tokenizer:
            return self.config.text_tokenizer
        if not self.workdir:
            raise ValueError("config.text_tokenizer is empty and there is no workdir to build "
                             "a word-level tokenizer in")
        path = os.path.join(self.workdir, "text_tokenizer", TEXT_TOKENIZER_FILE)
        if not os.path.isfile(path):
            data_t2i.build_word_tokenizer(
                path, self.captions + list(self.config.sample.prompts),
                max_latent_side=max(max(g) for g in self.grids),
                parallel_num=int(self.config.head.parallel_num))
        return path

    def _row_spec(self) -> data_t2i.RowSpec:
        P = self.model_config.parallel_num
        max_blocks = max(h * w // P for h, w in self.grids)
        seq_len = self.config.data.seq_len
        if not seq_len:
            longest = max(len(self.sample_tokenizer(c, *self.grids[0]).text_ids)
                          for c in set(self.captions))
            seq_len = self.config.data.max_samples_per_row * (longest + P * max_blocks)
        return data_t2i.RowSpec(seq_len=seq_len, max_samples=self.config.data.max_samples_per_row,
                                max_blocks=max_blocks, parallel_num=P)

    # -- data ------------------------------------------------------------------------------
    def train_source(self):
        bucket_of = data_t2i.assign_buckets(self.source, self.buckets)
        load = (data_t2i.ImageSamples(self.source) if self.from_images
                else data_t2i.LatentSamples(self._latent_cache(bucket_of)))
        return data_t2i.PackedRows(
            self.source, self.captions, bucket_of, self.grids, self.sample_tokenizer, self.spec,
            self.model_config.patch_side, seed=self.config.seed, load_sample=load)

    def train_dataset(self, rows, data_cfg, *, global_batch, num_steps, seed):
        """The trainer's input: Grain batches of packed rows, each global batch one bucket."""
        if seed != rows.seed:
            raise ValueError(f"rows were planned with seed {rows.seed}, not {seed}")
        rows.batched(global_batch, jax.process_index(), jax.process_count())
        return data_t2i.make_packed_dataset(rows, num_steps, data_cfg)

    def _latent_cache(self, bucket_of) -> np.ndarray:
        """int8 latents [records, max_blocks * P, z] in patch order (zero-padded), encoded
        once by process 0 into ``data.cache_dir`` (default ``workdir/latent_cache``)."""
        c = self.config.data
        cache_dir = c.cache_dir or os.path.join(self.workdir or ".", "latent_cache")
        meta = {"num_records": len(self.source), "buckets": [list(b) for b in self.buckets],
                "tokens": self.spec.max_blocks * self.spec.parallel_num,
                "tokenizer": self.tokenizer.config.to_dict()}
        meta_path = os.path.join(cache_dir, LATENT_CACHE_META)
        if not os.path.isfile(meta_path):
            if jax.process_index() == 0:
                self._write_latent_cache(cache_dir, bucket_of, meta)
            while not os.path.isfile(meta_path):
                time.sleep(5)
        with open(meta_path) as f:
            if json.load(f) != json.loads(json.dumps(meta)):
                raise ValueError(f"latent cache {cache_dir} was built for other records, buckets "
                                 "or tokenizer; remove it or set data.cache_dir")
        return np.load(os.path.join(cache_dir, "latents.npy"), mmap_mode="r")

    def _write_latent_cache(self, cache_dir: str, bucket_of, meta: dict):
        z, p = self.tokenizer.config.z_channels, self.model_config.patch_side
        tmp = cache_dir.rstrip("/") + ".partial"
        os.makedirs(tmp, exist_ok=True)
        out = np.lib.format.open_memmap(os.path.join(tmp, "latents.npy"), mode="w+", dtype=np.int8,
                                        shape=(len(self.source), meta["tokens"], z))
        out[:] = 0
        for b in range(len(self.buckets)):
            records = np.flatnonzero(bucket_of == b)
            for start in range(0, len(records), 64):
                chunk = records[start:start + 64]
                images = np.stack([self.source[int(r)]["image"] for r in chunk])
                bits = self.tokenizer.encode(images.astype(np.float32) / 127.5 - 1.0)
                seq = patching.patchify(np.asarray(bits), p)
                out[chunk, :seq.shape[1]] = np.where(seq > 0, 1, -1)
        out.flush()
        del out
        with open(os.path.join(tmp, LATENT_CACHE_META), "w") as f:
            json.dump(meta, f)
        if os.path.isdir(cache_dir):
            os.rmdir(cache_dir)  # only an empty directory may be in the way
        os.rename(tmp, cache_dir)

    # -- model -----------------------------------------------------------------------------
    def init(self, rng):
        return self.model.init(rng)

    def frozen(self):
        return {"tokenizer": self.tokenizer.params} if self.from_images else {}

    def batch_tokens(self, frozen, batch):
        """{-1, +1} latents [B, S, N*P, z] of the batch's samples (encoded here from images)."""
        if "latents" in batch:
            return batch["latents"].astype(jnp.float32)
        images = batch["image"]
        b, s = images.shape[:2]
        x = images.reshape((b * s,) + images.shape[2:]).astype(jnp.float32) / 127.5 - 1.0
        h = self.tokenizer.model.apply({"params": frozen["tokenizer"]}, x, method="encode_pre")
        bits = jax.lax.stop_gradient(quantize_signs(h.astype(jnp.float32)))
        seq = patching.patchify(bits, self.model_config.patch_side)
        return seq.reshape(b, s, -1, seq.shape[-1])

    def loss(self, params, frozen, batch, rng):
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
    def pipeline(self, ema_params) -> t2i.T2IPipeline:
        params = jax.device_get({"llm": ema_params["llm"], "head": ema_params["head"],
                                 "projector": ema_params["projector"],
                                 "tokenizer": self.tokenizer.params})
        return t2i.T2IPipeline(self.model_config, params, self.text_tokenizer, dtype=self.dtype)

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
        checkpoint.save_param_dir(dst, t2i.KIND, self.model_config.to_dict(), params,
                                  overwrite=True,
                                  extra={"tokenizer": self.tokenizer.config.to_dict(),
                                         "source": "bitdance_jax.train"})
        if jax.process_index() == 0:
            shutil.copyfile(self.text_tokenizer_path, os.path.join(dst, TEXT_TOKENIZER_FILE))
        return dst
