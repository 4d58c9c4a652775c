"""Training input with Grain: sources, per-index seeded augmentation, per-process sharding.

Sources (all random access, ``len`` + ``[i] -> {"image": uint8 HWC | "latents": int8, "label"}``):

* ``digits``: scikit-learn's handwritten digits (1,797 8x8 images, 10 classes) upsampled to
  ``image_size``; ships with scikit-learn, so it needs no download (the embedded default).
* ``folder``: an image folder in the ImageNet ``train/<class>/<image>`` layout; classes are the
  sorted sub-directory names. An unreadable image is skipped with a warning: the next readable
  record (cyclically) takes its place, so batches keep their shape and the run goes on. If
  ``MAX_UNREADABLE_IN_A_ROW`` records in a row fail, the pipeline stops with a ``ValueError``.
* ``tfds``: a TFDS data set (``imagenet2012``) read through ``tfds.data_source`` (ArrayRecord).
* ``latent_cache``: binary latents pre-encoded once with the frozen tokenizer
  (``build_latent_cache``), optionally with the flipped image's latents as a second variant.

Order: the global batch of step ``s`` holds rows ``s*B .. s*B+B-1`` of an endless stream in
which epoch ``e`` is a permutation of the records seeded by ``(seed, e)`` (the remainder of an
epoch is dropped). Process ``p`` of ``n`` reads rows ``p*B/n .. (p+1)*B/n - 1`` of every
global batch, so the assembled global batch is the same whatever the number of processes.
A record's augmentation is seeded by ``(seed, epoch, record index)`` only.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from typing import Any, Callable

import grain
import jax
import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
MAX_UNREADABLE_IN_A_ROW = 16
LATENT_CACHE_META = "latent_cache.json"

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# Sources.

class DigitsSource:
    """scikit-learn's 8x8 digits as RGB uint8 images of ``image_size`` (bilinear upsampling)."""

    def __init__(self, image_size: int = 32):
        from sklearn.datasets import load_digits
        digits = load_digits()
        pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
        self.images = np.stack([
            np.asarray(Image.fromarray(p).resize((image_size, image_size), Image.BILINEAR))
            for p in pixels])[..., None].repeat(3, axis=-1)
        self.labels = digits.target.astype(np.int32)
        self.num_classes = 10

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"image": self.images[index], "label": self.labels[index]}


class ImageFolderSource:
    """``root/<class>/<image>``; labels index the sorted class names. Decoding is lazy."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise ValueError(f"image folder {root!r} does not exist")
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not self.classes:
            raise ValueError(f"image folder {root!r} has no class sub-directories "
                             "(expected the ImageNet train/<class>/<image> layout)")
        self.files, labels = [], []
        for label, name in enumerate(self.classes):
            for dirpath, _, filenames in sorted(os.walk(os.path.join(root, name))):
                for f in sorted(filenames):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        self.files.append(os.path.join(dirpath, f))
                        labels.append(label)
        if not self.files:
            raise ValueError(f"image folder {root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.labels = np.asarray(labels, np.int32)
        self.num_classes = len(self.classes)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = self.files[index]
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
        return {"image": image, "label": self.labels[index]}


class TfdsSource:
    """A TFDS data set through ``tfds.data_source`` (random access over ArrayRecord files)."""

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None):
        import tensorflow_datasets as tfds
        self.source = tfds.data_source(name, split=split, data_dir=data_dir or None)
        self.num_classes = self.source.dataset_info.features["label"].num_classes

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        record = self.source[index]
        image = np.asarray(record["image"])
        if image.ndim == 2:
            image = image[..., None]
        if image.shape[-1] == 1:
            image = image.repeat(3, axis=-1)
        return {"image": image, "label": np.int32(record["label"])}


class LatentCacheSource:
    """Latents written by ``build_latent_cache``: int8 {-1,+1} [N, variants, h, w, C]."""

    def __init__(self, cache_dir: str):
        meta_path = os.path.join(cache_dir, LATENT_CACHE_META)
        if not os.path.isfile(meta_path):
            raise ValueError(f"{cache_dir!r} is not a latent cache (no {LATENT_CACHE_META}); "
                             "build one with bitdance_jax.data.build_latent_cache")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.latents = np.load(os.path.join(cache_dir, "latents.npy"), mmap_mode="r")
        self.labels = np.load(os.path.join(cache_dir, "labels.npy"))
        self.num_classes = int(self.meta["num_classes"])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"latents": np.asarray(self.latents[index]), "label": self.labels[index]}


def make_source(data_cfg):
    """The source named by ``data_cfg.source``."""
    kind = data_cfg.source
    if kind == "digits":
        return DigitsSource(data_cfg.image_size)
    if kind == "folder":
        if not data_cfg.path:
            raise ValueError("data.source='folder' needs data.path (the train/ directory)")
        return ImageFolderSource(data_cfg.path)
    if kind == "tfds":
        return TfdsSource(data_cfg.tfds_name, data_cfg.split, data_cfg.path or None)
    if kind == "latent_cache":
        if not data_cfg.cache_dir:
            raise ValueError("data.source='latent_cache' needs data.cache_dir")
        return LatentCacheSource(data_cfg.cache_dir)
    raise ValueError(f"unknown data.source {kind!r}; use digits, folder, tfds or latent_cache")


# ---------------------------------------------------------------------------------------
# Augmentation (numpy + PIL, seeded per record).

def _resize_smaller_side(image: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize so that the smaller side is ``size`` (box-halving first for big shrinks)."""
    im = Image.fromarray(image)
    while min(im.size) >= 2 * size:
        im = im.resize((im.size[0] // 2, im.size[1] // 2), Image.BOX)
    scale = size / min(im.size)
    im = im.resize((max(size, round(im.size[0] * scale)), max(size, round(im.size[1] * scale))),
                   Image.BICUBIC)
    return np.asarray(im)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    image = _resize_smaller_side(image, size)
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return image[top:top + size, left:left + size]


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                min_crop_frac: float = 0.8) -> np.ndarray:
    """A square crop covering a uniform ``[min_crop_frac, 1]`` share of the smaller side."""
    smaller = int(rng.integers(size, math.ceil(size / min_crop_frac) + 1))
    image = _resize_smaller_side(image, smaller)
    top = int(rng.integers(0, image.shape[0] - size + 1))
    left = int(rng.integers(0, image.shape[1] - size + 1))
    return image[top:top + size, left:left + size]


def aug_ratio(epoch: int, decay_start_epoch: int, decay_end_epoch: int) -> float:
    """Probability of a random crop: 1, then linearly down to 0 between the two epochs."""
    if decay_start_epoch < 0 or decay_end_epoch <= decay_start_epoch or epoch < decay_start_epoch:
        return 1.0
    if epoch >= decay_end_epoch:
        return 0.0
    return 1.0 - (epoch - decay_start_epoch) / float(decay_end_epoch - decay_start_epoch)


def augment_image(image: np.ndarray, size: int, rng: np.random.Generator, *, crop_prob: float,
                  min_crop_frac: float, random_flip: bool) -> np.ndarray:
    if image.ndim == 2:
        image = image[..., None].repeat(3, axis=-1)
    if rng.random() < crop_prob and min_crop_frac < 1.0:
        image = random_crop(image, size, rng, min_crop_frac)
    else:
        image = center_crop(image, size)
    if random_flip and rng.integers(0, 2):
        image = image[:, ::-1]
    return np.ascontiguousarray(image, dtype=np.uint8)


# ---------------------------------------------------------------------------------------
# The step-indexed stream.

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
        if "latents" in record:
            lat = record["latents"]
            variant = int(rng.integers(0, lat.shape[0])) if self.random_flip else 0
            out["latents"] = lat[variant]
        else:
            crop_prob = aug_ratio(epoch, *self.aug_decay)
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


# ---------------------------------------------------------------------------------------
# Latent cache.

def build_latent_cache(source, encode_fn: Callable[[np.ndarray], np.ndarray], cache_dir: str, *,
                       image_size: int, num_classes: int, with_flips: bool = True,
                       chunk: int = 64) -> str:
    """Encode every record once (center crop, and its mirror when ``with_flips``).

    ``encode_fn``: uint8 images [B,H,W,3] -> latents in {-1,+1} [B,h,w,C]. Process 0 writes
    (atomically, through a temporary directory); other processes wait for it.
    """
    meta_path = os.path.join(cache_dir, LATENT_CACHE_META)
    if os.path.isfile(meta_path):
        return cache_dir
    if jax.process_index() != 0:
        while not os.path.isfile(meta_path):
            time.sleep(5)
        return cache_dir
    tmp = cache_dir.rstrip("/") + ".partial"
    os.makedirs(tmp, exist_ok=True)
    n = len(source)
    labels = np.zeros((n,), np.int32)
    latents = None
    for start in range(0, n, chunk):
        idx = range(start, min(n, start + chunk))
        records = [source[i] for i in idx]
        images = np.stack([center_crop(r["image"] if r["image"].ndim == 3 else
                                       r["image"][..., None].repeat(3, -1), image_size)
                           for r in records])
        variants = [images, images[:, :, ::-1]] if with_flips else [images]
        codes = np.stack([np.asarray(encode_fn(np.ascontiguousarray(v))) for v in variants], axis=1)
        if latents is None:
            latents = np.lib.format.open_memmap(os.path.join(tmp, "latents.npy"), mode="w+",
                                                dtype=np.int8, shape=(n,) + codes.shape[1:])
        latents[start:start + len(records)] = np.where(codes > 0, 1, -1).astype(np.int8)
        labels[start:start + len(records)] = [r["label"] for r in records]
    latents.flush()
    del latents
    np.save(os.path.join(tmp, "labels.npy"), labels)
    with open(os.path.join(tmp, LATENT_CACHE_META), "w") as f:
        json.dump({"num_records": n, "num_classes": num_classes, "image_size": image_size,
                   "with_flips": with_flips}, f)
    if os.path.isdir(cache_dir):
        os.rmdir(cache_dir)  # only an empty directory may be in the way
    os.rename(tmp, cache_dir)
    return cache_dir
