"""The latent cache: binary latents of every training record, encoded once by the frozen tokenizer, for both model families.

A cache is a directory of ``.npy`` arrays (int8 {-1, +1} latents plus per-record extras such as
labels) and ``latent_cache.json``, the description it was built for (records, image sizes,
crops, the tokenizer's config and a digest of its params: a retrained tokenizer of the same
config is another cache). The class-conditional cache keeps several crops (and their
mirrors) of every image so that training still sees a different crop each epoch. Process 0
encodes; it writes under a temporary name and renames, so a cache that exists is complete. The
other processes wait for it (``distributed.run_once``), then every process opens it read-only.
A cache built for another description is an error, never silently reused.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Iterable

import numpy as np

from bitdance_jax.checkpointing import fingerprint
from bitdance_jax.checkpointing.atomic import atomic_write
from bitdance_jax.data.augment import center_crop, random_crop
from bitdance_jax.parallel import distributed

META_FILE = "latent_cache.json"
CACHE_TIMEOUT_S = 24 * 3600.0  # how long the other processes wait for process 0 to encode

EncodeChunk = Callable[[np.ndarray], dict[str, np.ndarray]]


def build(cache_dir: str, meta: dict, num_records: int, chunks: Iterable[np.ndarray],
          encode_chunk: EncodeChunk) -> dict[str, np.ndarray]:
    """Open the cache at ``cache_dir``, building it first if it does not exist.

    ``chunks``: arrays of record indices that together cover every record once;
    ``encode_chunk(indices)`` returns ``{name: array [len(indices), ...]}`` (``latents`` in
    {-1, +1}, 0 marking padding, stored as int8 signs). Every process must call this
    (process 0 builds, the others wait for it).
    Returns ``{name: array}``, latents memory-mapped.
    """
    meta = json.loads(json.dumps(meta))  # the form it takes on disk (tuples become lists)
    meta_path = os.path.join(cache_dir, META_FILE)

    def write_if_absent():  # on process 0 only: encode_chunk must not call collectives
        if not os.path.isfile(meta_path):
            _refuse_foreign(cache_dir)
            _write(cache_dir, meta, num_records, chunks, encode_chunk)

    # The others wait (an error on process 0 reaches them at once, not as a timeout).
    key = hashlib.sha1(os.path.abspath(cache_dir).encode()).hexdigest()[:16]
    distributed.run_once(f"latent_cache:{key}", write_if_absent, timeout_s=CACHE_TIMEOUT_S)
    return open_cache(cache_dir, meta)


def _refuse_foreign(cache_dir: str) -> None:
    """A cache is written by replacing ``cache_dir`` whole: refuse a folder that holds anything
    but is not a cache of ours (it would be emptied)."""
    if os.path.isdir(cache_dir) and os.listdir(cache_dir):
        raise ValueError(f"data.cache_dir {cache_dir!r} is a non-empty folder that is not a "
                         f"latent cache (no {META_FILE}); point data.cache_dir at a new or "
                         f"empty folder")
    if os.path.lexists(cache_dir) and not os.path.isdir(cache_dir):
        raise ValueError(f"data.cache_dir {cache_dir!r} exists and is not a folder")


def _write(cache_dir, meta, num_records, chunks, encode_chunk):
    with atomic_write(cache_dir, directory=True) as tmp:
        arrays = {}
        for indices in chunks:
            for name, values in encode_chunk(np.asarray(indices)).items():
                if name == "latents":
                    values = np.sign(np.asarray(values)).astype(np.int8)
                if name not in arrays:
                    arrays[name] = np.lib.format.open_memmap(
                        os.path.join(tmp, f"{name}.npy"), mode="w+", dtype=values.dtype,
                        shape=(num_records,) + values.shape[1:])
                arrays[name][indices] = values
        for array in arrays.values():
            array.flush()
        del arrays
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)


def open_cache(cache_dir: str, expected_meta: dict | None = None) -> dict[str, np.ndarray]:
    """The arrays of an existing cache (``ValueError`` if absent or built for another meta)."""
    meta_path = os.path.join(cache_dir, META_FILE)
    if not os.path.isfile(meta_path):
        raise ValueError(f"{cache_dir!r} is not a latent cache (no {META_FILE})")
    with open(meta_path) as f:
        meta = json.load(f)
    if expected_meta is not None and meta != expected_meta:
        raise ValueError(f"latent cache {cache_dir} was built for other records, sizes, crops or "
                         f"tokenizer ({'; '.join(fingerprint.differences(meta, expected_meta))}); "
                         "remove it or set data.cache_dir")
    names = [f[:-4] for f in sorted(os.listdir(cache_dir)) if f.endswith(".npy")]
    out = {"meta": meta}
    for name in names:
        out[name] = np.load(os.path.join(cache_dir, f"{name}.npy"),
                            mmap_mode="r" if name == "latents" else None)
    return out


class LatentCacheSource:
    """Class-conditional records of a cache: ``{"latents": int8 [crops, flips, h, w, C], "label"}``.

    Crop 0 is the centre crop, crops 1.. random crops; flip 1 (when cached) the mirror image.
    """

    def __init__(self, cache_dir: str, arrays: dict | None = None):
        arrays = open_cache(cache_dir) if arrays is None else arrays
        self.meta = arrays["meta"]
        self.latents, self.labels = arrays["latents"], arrays["labels"]
        self.num_classes = int(self.meta["num_classes"])
        self.num_crops = int(self.meta.get("crops", {}).get("count", 1))  # older caches: 1
        self.num_flips = 2 if self.meta.get("with_flips") else 1

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        lat = np.asarray(self.latents[index])
        return {"latents": lat.reshape((self.num_crops, self.num_flips) + lat.shape[-3:]),
                "label": self.labels[index]}


CROP_SEED = 0  # the cached crops depend on (CROP_SEED, record, crop index) only


def crop_variant(image: np.ndarray, size: int, record: int, crop: int, *,
                 min_crop_frac: float, seed: int = CROP_SEED) -> np.ndarray:
    """uint8 [size, size, 3]: crop 0 the centre crop, crop k >= 1 a random crop (the rules of
    ``augment.random_crop``) seeded by ``(seed, record, k)``."""
    if image.ndim == 2:
        image = image[..., None].repeat(3, axis=-1)
    if crop == 0:
        out = center_crop(image, size)
    else:
        out = random_crop(image, size, np.random.default_rng([seed, record, crop]), min_crop_frac)
    return np.ascontiguousarray(out, dtype=np.uint8)


def build_class_cache(source, encode_fn: Callable[[np.ndarray], np.ndarray], cache_dir: str, *,
                      image_size: int, num_classes: int, tokenizer_config: dict,
                      tokenizer_digest: str, with_flips: bool = True, crops: int = 1,
                      min_crop_frac: float = 1.0,
                      chunk: int = 64) -> LatentCacheSource:
    """Cache of a class-labelled source: ``crops`` crops of each record (the centre crop, then
    ``crops - 1`` random ones covering ``[min_crop_frac, 1]`` of the smaller side), each also
    mirrored when ``with_flips``, encoded by ``encode_fn`` (uint8 [B,H,W,3] -> {-1,+1} [B,h,w,C]),
    the tokenizer whose params have ``tokenizer_digest`` (``fingerprint.tree_digest``).
    Stored as ``[records, crops * flips, h, w, C]`` (variant ``crop * flips + flip``)."""
    if crops < 1:
        raise ValueError(f"data.cache_crops must be >= 1, got {crops}")
    if crops > 1 and min_crop_frac >= 1.0:
        raise ValueError(f"data.cache_crops={crops} needs random crops (data.min_crop_frac < 1, "
                         f"got {min_crop_frac}); otherwise every crop is the centre crop")

    def encode_chunk(indices):
        records = [source[int(i)] for i in indices]
        codes = []
        for k in range(crops):
            images = np.stack([crop_variant(r["image"], image_size, int(i), k,
                                            min_crop_frac=min_crop_frac)
                               for i, r in zip(indices, records)])
            for v in ([images, images[:, :, ::-1]] if with_flips else [images]):
                codes.append(np.asarray(encode_fn(np.ascontiguousarray(v))))
        return {"latents": np.stack(codes, axis=1),
                "labels": np.asarray([r["label"] for r in records], np.int32)}

    n = len(source)
    meta = {"num_records": n, "num_classes": num_classes, "image_size": image_size,
            "with_flips": with_flips, "tokenizer": tokenizer_config,
            "tokenizer_params": tokenizer_digest,
            "crops": {"count": crops, "seed": CROP_SEED,
                      "min_crop_frac": min_crop_frac if crops > 1 else None}}
    chunks = (np.arange(s, min(n, s + chunk)) for s in range(0, n, chunk))
    return LatentCacheSource(cache_dir, build(cache_dir, meta, n, chunks, encode_chunk))
