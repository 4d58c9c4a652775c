"""Sequence packing for text-to-image training: resolution buckets, per-sample token layout, packed rows.

 Each training row packs several samples, one after the other, then padding:

    [chat-formatted caption, <|vision_start|>, <|res_h|>]   (causal text part)
    [<|res_w|>, <|query_1|> .. <|query_{P-1}|>]              (block 0)
    [image block 0] .. [image block n-2]                       (blocks 1 .. n-1, fed back)

The caption part is causal, each block of P positions is bidirectional and sees everything
before it in its own sample, and no position sees another sample. The hidden states of block
m (block 0 = the query block) predict image block m with the flow head, as when sampling.
Every row of a global batch holds samples of one resolution bucket. Rows are planned per
epoch (a permutation seeded by ``(seed, epoch)``, packed greedily), so a row's content only
depends on the seed, the epoch and the step.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Sequence

import grain
import numpy as np

from bitdance_jax.nn.patching import token_cells
from bitdance_jax.t2i.prompts import UNCOND_PROMPT, TextTokenizer, cond_prompt

log = logging.getLogger(__name__)

UNREADABLE = -1   # bucket of a record whose image header cannot be read: never packed


def assign_buckets(source, buckets: Sequence[tuple[int, int]]) -> np.ndarray:
    """Bucket index of every record (its exact (H, W) must be listed); ``UNREADABLE``, with a
    warning, for an image whose header does not read (as the class folder skips them)."""
    index = {tuple(b): k for k, b in enumerate(buckets)}
    out = np.empty((len(source),), np.int32)
    names = getattr(source, "files", None)
    for i in range(len(source)):
        what = names[i] if names is not None else f"record {i}"
        try:
            size = tuple(source.size(i))
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors on a bad file
            log.warning("skipping unreadable image %s: %s", what, e)
            out[i] = UNREADABLE
            continue
        if size not in index:
            raise ValueError(f"image {what} is {size[0]}x{size[1]} (height x width), which is in "
                             f"no resolution bucket ({', '.join(f'{h}x{w}' for h, w in buckets)})")
        out[i] = index[size]
    if (out == UNREADABLE).all():
        raise ValueError("no image of the data set is readable")
    return out


@dataclasses.dataclass(frozen=True)
class SampleText:
    """Token ids of one sample: the causal text part, the query block, and how many leading
    text tokens a dropped caption removes (what is left is the unconditional prompt)."""
    text_ids: tuple[int, ...]
    block0_ids: tuple[int, ...]
    caption_len: int


class SampleTokenizer:
    def __init__(self, text_tokenizer: TextTokenizer, parallel_num: int):
        self.tok = text_tokenizer
        self.parallel_num = parallel_num
        self.uncond_ids = tuple(text_tokenizer.encode(UNCOND_PROMPT))

    @functools.lru_cache(maxsize=65536)
    def __call__(self, caption: str, h: int, w: int) -> SampleText:
        ids = tuple(self.tok.encode(cond_prompt(caption)))
        n = len(self.uncond_ids)
        if ids[len(ids) - n:] != self.uncond_ids:
            raise ValueError("the text tokenizer does not end the chat-formatted caption with the "
                             "tokens of the unconditional prompt; caption dropout needs that")
        prefix = self.tok.image_prefix_ids(h, w, self.parallel_num)
        return SampleText(ids + tuple(prefix[:2]), tuple(prefix[2:]), len(ids) - n)


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """Static sizes of a packed row (the same for every bucket, so one compiled step)."""
    seq_len: int
    max_samples: int
    max_blocks: int
    parallel_num: int

    def sample_len(self, text: SampleText, num_blocks: int) -> int:
        return len(text.text_ids) + self.parallel_num * num_blocks


def grid_positions(h: int, w: int, patch_side: int) -> np.ndarray:
    """(row, col) of every latent in generation (patch) order: [h*w, 2] int32."""
    return np.stack(token_cells(h, w, patch_side), axis=-1).astype(np.int32)


def pack_row(texts: Sequence[SampleText], grids: Sequence[tuple[int, int]], spec: RowSpec,
             patch_side: int) -> dict:
    """Numpy arrays of one packed row (see the module docstring). ``grids``: latent (h, w)."""
    L, S, N, P = spec.seq_len, spec.max_samples, spec.max_blocks, spec.parallel_num
    if len(texts) > S:
        raise ValueError(f"{len(texts)} samples exceed max_samples_per_row {S}")
    row = {"input_ids": np.zeros((L,), np.int32), "image_feed": np.full((L,), -1, np.int32),
           "segment_ids": np.zeros((L,), np.int32), "block_ids": np.zeros((L,), np.int32),
           "positions": np.zeros((L,), np.int32), "text_targets": np.zeros((L,), np.int32),
           "text_weights": np.zeros((L,), np.float32), "caption_mask": np.zeros((L,), bool),
           "caption_len": np.zeros((S,), np.int32), "slot_valid": np.zeros((S,), np.float32),
           "cond_start": np.zeros((S, N), np.int32), "block_valid": np.zeros((S, N), np.float32),
           "token_rc": np.zeros((S, N * P, 2), np.int32)}
    start, block_id = 0, 1
    for j, (text, (h, w)) in enumerate(zip(texts, grids)):
        n = h * w // P
        if n > N:
            raise ValueError(f"latent grid {h}x{w} has {n} blocks, more than max_blocks {N}")
        length = spec.sample_len(text, n)
        if start + length > L:
            raise ValueError(f"samples of {start + length} tokens exceed seq_len {L}")
        t = len(text.text_ids)
        span = slice(start, start + length)
        row["segment_ids"][span] = j + 1
        row["positions"][span] = np.arange(length)
        row["input_ids"][start:start + t] = text.text_ids
        row["input_ids"][start + t:start + t + P] = text.block0_ids
        row["text_targets"][start:start + t] = text.text_ids[1:] + text.block0_ids[:1]
        row["text_weights"][start:start + t] = 1.0
        row["caption_mask"][start:start + text.caption_len] = True
        row["block_ids"][start:start + t] = np.arange(block_id, block_id + t)
        block_id += t
        blocks = start + t + P * np.arange(n)
        row["block_ids"][start + t:start + length] = np.repeat(np.arange(block_id, block_id + n), P)
        block_id += n
        # Image block m (m < n-1) is fed back at block m+1.
        fed = (blocks[1:, None] + np.arange(P)[None]).reshape(-1)
        row["image_feed"][fed] = j * N * P + np.arange((n - 1) * P)
        row["caption_len"][j] = text.caption_len
        row["slot_valid"][j] = 1.0
        row["cond_start"][j, :n] = blocks
        row["block_valid"][j, :n] = 1.0
        row["token_rc"][j, :n * P] = grid_positions(h, w, patch_side)
        start += length
    return row


def drop_slot(row: dict, slot: int) -> None:
    """Zero every loss weight of sample ``slot`` of a packed row (its tokens stay in place)."""
    row["text_weights"][row["segment_ids"] == slot + 1] = 0.0
    row["slot_valid"][slot] = 0.0
    row["block_valid"][slot] = 0.0


def pack_greedy(lengths: Sequence[int], spec: RowSpec) -> list[list[int]]:
    """Consecutive samples into rows: a new row when the next one does not fit."""
    rows, current, used = [], [], 0
    for i, length in enumerate(lengths):
        if length > spec.seq_len:
            raise ValueError(f"a sample of {length} tokens does not fit seq_len {spec.seq_len}")
        if current and (used + length > spec.seq_len or len(current) == spec.max_samples):
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += length
    if current:
        rows.append(current)
    return rows


# ---------------------------------------------------------------------------------------
# The step-indexed stream of packed global batches.

class PackedRows:
    """Random-access local rows: local row ``i`` is row ``p*B/n + i % (B/n)`` of the global
    batch of step ``i // (B/n)``. ``sample_tokens(record, bucket) -> dict`` gives the
    per-sample image input (``image`` uint8 [H, W, 3] or ``latents`` int8 [n*P, z])."""

    def __init__(self, source, captions: Sequence[str], bucket_of: np.ndarray,
                 grids: Sequence[tuple[int, int]], sample_tokenizer: SampleTokenizer,
                 spec: RowSpec, patch_side: int, *, seed: int, load_sample):
        self.source, self.captions, self.bucket_of = source, list(captions), bucket_of
        self.grids, self.spec, self.patch_side = [tuple(g) for g in grids], spec, patch_side
        # Unreadable records (bucket -1) get the last grid's layout here but are never packed.
        self.texts = [sample_tokenizer(c, *self.grids[b]) for c, b in zip(self.captions, bucket_of)]
        self.lengths = np.array([spec.sample_len(t, self.grids[b][0] * self.grids[b][1]
                                                 // spec.parallel_num)
                                 for t, b in zip(self.texts, bucket_of)])
        self.seed, self.load_sample = seed, load_sample
        self.global_batch = None
        self._epoch_starts = [0]

    def batched(self, global_batch: int, process_index: int = 0, process_count: int = 1):
        """Fix the global batch (rows) and this process's share; checks one batch exists."""
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by the "
                             f"{process_count} processes")
        self.global_batch, self.local_batch = global_batch, global_batch // process_count
        self.process_index = process_index
        self.epoch_plan.cache_clear()
        self._epoch_starts = [0]
        if not self.epoch_plan(0):
            raise ValueError(f"no bucket has enough samples for one global batch of "
                             f"{global_batch} rows (up to {self.spec.max_samples} samples a row)")
        return self

    def epoch_rows(self, epoch: int) -> list[tuple[int, list[int]]]:
        """(bucket, record indices) of every packed row of an epoch, bucket by bucket."""
        rng = np.random.default_rng([self.seed, epoch])
        rows = []
        for b in range(len(self.grids)):
            records = rng.permutation(np.flatnonzero(self.bucket_of == b))
            rows += [(b, [int(records[k]) for k in r])
                     for r in pack_greedy(self.lengths[records], self.spec)]
        return rows

    @functools.lru_cache(maxsize=4)
    def epoch_plan(self, epoch: int) -> list[tuple[int, list[list[int]]]]:
        """The global batches of an epoch, in a seeded order: (bucket, rows of records)."""
        if self.global_batch is None:
            raise ValueError("call batched(global_batch) first")
        by_bucket = {}
        for b, records in self.epoch_rows(epoch):
            by_bucket.setdefault(b, []).append(records)
        batches = []
        for b, rows in sorted(by_bucket.items()):
            for k in range(len(rows) // self.global_batch):
                batches.append((b, rows[k * self.global_batch:(k + 1) * self.global_batch]))
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
        return [batches[k] for k in order]

    def __len__(self):
        """Rows of the first epoch (what ``config.epochs`` counts)."""
        return len(self.epoch_rows(0))

    def locate(self, step: int):
        """(bucket, record indices of each global row) of ``step``."""
        while self._epoch_starts[-1] <= step:
            self._epoch_starts.append(self._epoch_starts[-1]
                                      + len(self.epoch_plan(len(self._epoch_starts) - 1)))
        epoch = int(np.searchsorted(self._epoch_starts, step, side="right")) - 1
        return self.epoch_plan(epoch)[step - self._epoch_starts[epoch]]

    def row(self, step: int, row: int) -> dict:
        bucket, rows = self.locate(step)
        records = rows[row]
        out = pack_row([self.texts[r] for r in records], [self.grids[bucket]] * len(records),
                       self.spec, self.patch_side)
        samples = {}
        for j, r in enumerate(records):
            try:
                samples[j] = self.load_sample(r, bucket)
            except (OSError, ValueError, SyntaxError) as e:  # PIL's errors on a bad file
                # The row's layout is planned from the image headers, so a file that does
                # not decode (a truncated JPEG) cannot be swapped for another: its slot stays
                # in place with every loss weight zeroed, and the run goes on.
                name = getattr(self.source, "files", None)
                log.warning("skipping unreadable image %s: %s",
                            name[r] if name is not None else f"record {r}", e)
                drop_slot(out, j)
        if not samples:
            raise ValueError(f"every image of packed row {row} of step {step} is unreadable "
                             f"(records {records}); is the data set corrupt?")
        first = next(iter(samples.values()))
        for key in first:
            slots = np.zeros((self.spec.max_samples,) + first[key].shape, first[key].dtype)
            for j, sample in samples.items():
                slots[j] = sample[key]
            out[key] = slots
        return out


class ImageSamples:
    """Per-sample input read from the source: ``{"image": uint8 [H, W, 3]}``."""

    def __init__(self, source):
        self.source = source

    def __call__(self, record: int, bucket: int) -> dict:
        return {"image": np.asarray(self.source[record]["image"], np.uint8)}


class LatentSamples:
    """Per-sample input from a latent cache: ``{"latents": int8 [max_blocks * P, z]}``."""

    def __init__(self, latents: np.ndarray):
        self.latents = latents

    def __call__(self, record: int, bucket: int) -> dict:
        return {"latents": np.asarray(self.latents[record])}


class _LocalRows:
    """Grain view: local example ``i`` of this process for ``num_steps`` steps."""

    def __init__(self, rows: PackedRows, num_steps: int):
        self.rows, self.num_steps = rows, num_steps

    def __len__(self):
        return self.num_steps * self.rows.local_batch

    def __getitem__(self, i):
        step, j = divmod(i, self.rows.local_batch)
        return self.rows.row(step, self.rows.process_index * self.rows.local_batch + j)


def make_packed_dataset(rows: PackedRows, num_steps: int, data_cfg) -> grain.IterDataset:
    """Grain pipeline of this process's local batches of packed rows."""
    ds = grain.MapDataset.source(_LocalRows(rows, num_steps)).batch(rows.local_batch,
                                                                     drop_remainder=True)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.num_threads,
                                              prefetch_buffer_size=data_cfg.prefetch))
    if data_cfg.worker_count > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count))
    return ds
