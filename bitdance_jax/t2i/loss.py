"""Text-to-image training over packed rows: the segment-aware block-causal mask, caption drop, and the vision flow and text cross-entropy losses.

A packed row holds several (caption, image) samples (``bitdance_jax.data.packing``). The
caption part is causal, each block of P image positions is bidirectional and sees everything
before it in its own sample, and no position sees another sample. A dropped caption becomes the
unconditional prompt: its tokens are hidden and the positions after them shifted back, exactly
what packing the unconditional prompt gives.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from bitdance_jax.nn.diffusion_head import DiffusionNet, example_inputs
from bitdance_jax.nn.flow import flow_matching_loss
from bitdance_jax.nn.precision import PrecisionLike
from bitdance_jax.t2i import qwen3
from bitdance_jax.t2i.config import T2IConfig
from bitdance_jax.t2i.model import Projector, position_table

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


class PackedT2IModel:
    """The trained parts (Qwen3, vision head, projector) and the packed-row forward.

    ``dtype``/``precision``: the numerics policy (``nn.precision``; bfloat16 = bf16-mixed);
    ``attention_impl``: ``nn.attention`` implementation of the LLM and the head."""

    def __init__(self, config: T2IConfig, dtype=jnp.float32, precision: PrecisionLike = None,
                 attention_impl: str = "auto"):
        self.config = config
        self.dtype = dtype
        kw = dict(dtype=dtype, precision=precision)
        self.llm = qwen3.Qwen3ForCausalLM(config.llm, attention_impl=attention_impl, **kw)
        self.head = DiffusionNet(config.head, attention_impl=attention_impl, **kw)
        self.projector = Projector(config.llm.hidden_size, **kw)
        self.pos_table = position_table(config.llm.hidden_size, config.vae_patch_size)

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
