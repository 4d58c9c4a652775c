"""Image sources for training: random-access records ``[i] -> {"image": uint8 HWC, "label"}``.

* ``digits``: scikit-learn's handwritten digits (1,797 8x8 images, 10 classes) upsampled to
  ``image_size``; ships with scikit-learn, so it needs no download (the embedded default).
* ``folder``: an image folder in the ImageNet ``train/<class>/<image>`` layout; classes are the
  sorted sub-directory names. An unreadable image is skipped with a warning: the next readable
  record (cyclically) takes its place, so batches keep their shape and the run goes on. If
  ``MAX_UNREADABLE_IN_A_ROW`` records in a row fail, the pipeline stops with a ``ValueError``.
* ``tfds``: a TFDS data set (``imagenet2012``) read through ``tfds.data_source`` (ArrayRecord).
* ``latent_cache``: binary latents pre-encoded once with the frozen tokenizer
  (``bitdance_jax.data.latent_cache``).
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from bitdance_jax.data.latent_cache import LatentCacheSource

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
MAX_UNREADABLE_IN_A_ROW = 16

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


def visible_walk(root: str):
    """``os.walk`` without hidden folders (notebook checkpoints, caches, ``.git``)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        yield dirpath, dirnames, filenames


class ImageFolderSource:
    """``root/<class>/<image>``; labels index the sorted class names. Decoding is lazy."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise ValueError(f"image folder {root!r} does not exist")
        # Hidden folders (.ipynb_checkpoints, .cache) are not classes: counted as one, they
        # would become class 0 and shift every label.
        self.classes = sorted(d for d in os.listdir(root) if not d.startswith(".")
                              and os.path.isdir(os.path.join(root, d)))
        if not self.classes:
            raise ValueError(f"image folder {root!r} has no class sub-directories "
                             "(expected the ImageNet train/<class>/<image> layout)")
        self.files, labels = [], []
        for label, name in enumerate(self.classes):
            for dirpath, _, filenames in sorted(visible_walk(os.path.join(root, name))):
                for f in sorted(filenames):
                    if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
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
