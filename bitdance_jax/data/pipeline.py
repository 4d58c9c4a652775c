"""The Grain input pipeline: a fixed global order of records, per-process slices, global arrays.

Order: the global batch of step ``s`` holds rows ``s*B .. s*B+B-1`` of an endless stream in
which epoch ``e`` is a permutation of the records seeded by ``(seed, e)`` (the remainder of an
epoch is dropped). Process ``p`` of ``n`` reads rows ``p*B/n .. (p+1)*B/n - 1`` of every
global batch, so the assembled global batch is the same whatever the number of processes.
A record's augmentation is seeded by ``(seed, epoch, record index)`` only.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import grain
import jax
import numpy as np

from bitdance_jax.data.augment import augment_image, aug_ratio
from bitdance_jax.data.sources import MAX_UNREADABLE_IN_A_ROW

log = logging.getLogger(__name__)

@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_records: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_records)


def global_rows(step: int, global_batch: int, num_records: int, seed: int):
    """(epoch, record indices) of the global batch of ``step``."""
    steps_per_epoch = num_records // global_batch
    if steps_per_epoch < 1:
        raise ValueError(f"global batch {global_batch} is larger than the data set "
                         f"({num_records} records)")
    epoch, k = divmod(step, steps_per_epoch)
    return epoch, epoch_permutation(seed, epoch, num_records)[k * global_batch:(k + 1) * global_batch]


def cached_variant(rng: np.random.Generator, num_crops: int, num_flips: int, *,
                   crop_prob: float, random_flip: bool) -> tuple[int, int]:
    """(crop, flip) of a cached record for one epoch, the cached counterpart of
    ``augment_image``: with probability ``crop_prob`` one of the cached crops (the centre crop
    is one of them), else the centre crop 0; then a mirror with probability 1/2."""
    crop = 0
    if num_crops > 1 and rng.random() < crop_prob:
        crop = int(rng.integers(0, num_crops))
    flip = int(rng.integers(0, num_flips)) if random_flip and num_flips > 1 else 0
    return crop, flip


class TrainRecords:
    """Random-access view: local example ``i`` of this process = row of a global batch."""

    def __init__(self, source, *, global_batch: int, num_steps: int, seed: int,
                 process_index: int, process_count: int, image_size: int | None,
                 min_crop_frac: float = 1.0, random_flip: bool = False,
                 aug_decay_start_epoch: int = -1, aug_decay_end_epoch: int = -1):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by the "
                             f"{process_count} processes")
        self.source = source
        self.num_records = len(source)
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.num_steps = num_steps
        self.seed = seed
        self.process_index = process_index
        self.image_size = image_size
        self.min_crop_frac = min_crop_frac
        self.random_flip = random_flip
        self.aug_decay = (aug_decay_start_epoch, aug_decay_end_epoch)
        global_rows(0, global_batch, self.num_records, seed)  # validates the sizes

    @property
    def steps_per_epoch(self) -> int:
        return self.num_records // self.global_batch

    def __len__(self):
        return self.num_steps * self.local_batch

    def locate(self, i: int) -> tuple[int, int]:
        """(epoch, record index) of local example ``i``."""
        step, j = divmod(i, self.local_batch)
        epoch, records = global_rows(step, self.global_batch, self.num_records, self.seed)
        return epoch, int(records[self.process_index * self.local_batch + j])

    def _read(self, index: int):
        """The record, or (unreadable image) the next readable one, with a warning."""
        for attempt in range(MAX_UNREADABLE_IN_A_ROW):
            k = (index + attempt) % self.num_records
            try:
                return k, self.source[k]
            except (OSError, ValueError, SyntaxError) as e:  # PIL raises these on bad files
                what = getattr(self.source, "files", None)
                name = what[k] if what is not None else f"record {k}"
                log.warning("skipping unreadable image %s: %s", name, e)
        raise ValueError(f"{MAX_UNREADABLE_IN_A_ROW} unreadable records in a row from record "
                         f"{index}; is the data set corrupt?")

    def __getitem__(self, i):
        epoch, index = self.locate(i)
        index, record = self._read(index)
        rng = np.random.default_rng([self.seed, epoch, index])
        out = {"label": np.int32(record["label"]), "index": np.int32(index)}
        crop_prob = aug_ratio(epoch, *self.aug_decay)
        if "latents" in record:
            lat = record["latents"]  # [crops, flips, h, w, C], crop 0 the centre crop
            crop, flip = cached_variant(rng, lat.shape[0], lat.shape[1], crop_prob=crop_prob,
                                        random_flip=self.random_flip)
            out["latents"] = lat[crop, flip]
        else:
            out["image"] = augment_image(record["image"], self.image_size, rng, crop_prob=crop_prob,
                                         min_crop_frac=self.min_crop_frac,
                                         random_flip=self.random_flip)
        return out


def make_train_dataset(source, data_cfg, *, global_batch: int, num_steps: int, seed: int,
                       process_index: int | None = None, process_count: int | None = None
                       ) -> grain.IterDataset:
    """Grain pipeline of this process's local batches (dicts of numpy arrays)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    records = TrainRecords(
        source, global_batch=global_batch, num_steps=num_steps, seed=seed,
        process_index=process_index, process_count=process_count,
        image_size=data_cfg.image_size, min_crop_frac=data_cfg.min_crop_frac,
        random_flip=data_cfg.random_flip, aug_decay_start_epoch=data_cfg.aug_decay_start_epoch,
        aug_decay_end_epoch=data_cfg.aug_decay_end_epoch)
    ds = grain.MapDataset.source(records).batch(records.local_batch, drop_remainder=True)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.num_threads,
                                              prefetch_buffer_size=data_cfg.prefetch))
    if data_cfg.worker_count > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; use their defaults
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count))
    return ds


def to_global_arrays(local_batch: dict, sharding_for: Callable[[int], Any],
                     process_count: int | None = None) -> dict:
    """Assemble the process-local numpy batches into global jax Arrays (batch dim sharded)."""
    process_count = jax.process_count() if process_count is None else process_count
    out = {}
    for name, value in local_batch.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * process_count,) + value.shape[1:]
        out[name] = jax.make_array_from_process_local_data(sharding_for(value.ndim), value,
                                                           global_shape)
    return out
