"""Captioned image sources for text-to-image training: random access ``[i] -> {"image": uint8 HWC, "caption": str}`` and ``size(i) -> (H, W)``.

* ``digits``: scikit-learn's digits with captions "a handwritten digit seven" (no download).
* ``folder``: a folder of images plus a JSONL file of ``{"file": <path relative to the
  folder>, "caption": ...}`` lines; every image needs exactly one caption line.
* ``tfds``: a TFDS data set with an image and a text feature (``tfds.data_source``).
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from bitdance_jax.data.sources import IMAGE_EXTENSIONS, DigitsSource, visible_walk

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

def digit_caption(label: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


# ---------------------------------------------------------------------------------------
# Sources.

class CaptionedDigits:
    """The embedded digits, captioned by their class name."""

    def __init__(self, image_size: int = 32):
        self.digits = DigitsSource(image_size)
        self.image_size = image_size

    def __len__(self):
        return len(self.digits)

    @property
    def captions(self) -> list[str]:
        return [digit_caption(label) for label in self.digits.labels]

    def size(self, index: int) -> tuple[int, int]:
        return self.image_size, self.image_size

    def __getitem__(self, index):
        record = self.digits[index]
        return {"image": record["image"], "caption": digit_caption(record["label"])}


class CaptionFolderSource:
    """Images under ``root`` captioned by a JSONL file (``{"file": ..., "caption": ...}``)."""

    def __init__(self, root: str, captions_file: str):
        if not os.path.isdir(root):
            raise ValueError(f"image folder {root!r} does not exist")
        if not os.path.isfile(captions_file):
            raise ValueError(f"caption file {captions_file!r} does not exist")
        captions = {}
        with open(captions_file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    name, caption = entry["file"], entry["caption"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{captions_file}:{n}: expected a JSON object with 'file' "
                                     f"and 'caption' ({e})") from None
                if not isinstance(caption, str):
                    raise ValueError(f"{captions_file}:{n}: caption of {name!r} is not a string")
                key = os.path.normpath(name)
                if key in captions:
                    raise ValueError(f"{captions_file}:{n}: second caption for {name!r}")
                captions[key] = caption
        files = sorted(os.path.relpath(os.path.join(d, f), root)
                       for d, _, names in visible_walk(root) for f in names
                       if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        if not files:
            raise ValueError(f"image folder {root!r} holds no images "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        uncaptioned = [f for f in files if os.path.normpath(f) not in captions]
        if uncaptioned:
            raise ValueError(f"{len(uncaptioned)} image(s) in {root!r} have no entry in "
                             f"{captions_file}: {', '.join(uncaptioned[:5])}")
        missing = sorted(set(captions) - {os.path.normpath(f) for f in files})
        if missing:
            raise ValueError(f"{captions_file} names {len(missing)} file(s) not in {root!r}: "
                             f"{', '.join(missing[:5])}")
        self.root = root
        self.files = files
        self.captions = [captions[os.path.normpath(f)] for f in files]

    def __len__(self):
        return len(self.files)

    def size(self, index: int) -> tuple[int, int]:
        with Image.open(os.path.join(self.root, self.files[index])) as im:
            return im.size[1], im.size[0]

    def __getitem__(self, index):
        with Image.open(os.path.join(self.root, self.files[index])) as im:
            image = np.asarray(im.convert("RGB"))
        return {"image": image, "caption": self.captions[index]}


class TfdsCaptionSource:
    """A TFDS data set with ``image_key`` and ``caption_key`` features (read once per record
    to learn the image sizes for bucketing)."""

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
                 image_key: str = "image", caption_key: str = "caption"):
        import tensorflow_datasets as tfds
        self.source = tfds.data_source(name, split=split, data_dir=data_dir or None)
        self.image_key, self.caption_key = image_key, caption_key
        self._sizes = None

    def __len__(self):
        return len(self.source)

    def size(self, index: int) -> tuple[int, int]:
        if self._sizes is None:
            self._sizes = [np.asarray(self.source[i][self.image_key]).shape[:2]
                           for i in range(len(self.source))]
        return tuple(self._sizes[index])

    def __getitem__(self, index):
        record = self.source[index]
        image = np.asarray(record[self.image_key])
        if image.ndim == 2:
            image = image[..., None]
        if image.shape[-1] == 1:
            image = image.repeat(3, axis=-1)
        caption = record[self.caption_key]
        caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        return {"image": image, "caption": caption}


def source_captions(source) -> list[str]:
    """Every record's caption (without decoding images where the source keeps them apart)."""
    if hasattr(source, "captions"):
        return list(source.captions)
    return [source[i]["caption"] for i in range(len(source))]


def make_caption_source(data_cfg):
    kind = data_cfg.source
    if kind == "digits":
        return CaptionedDigits(data_cfg.image_size)
    if kind == "folder":
        if not data_cfg.path or not data_cfg.captions_file:
            raise ValueError("data.source='folder' needs data.path (the images) and "
                             "data.captions_file (JSONL of {'file', 'caption'})")
        return CaptionFolderSource(data_cfg.path, data_cfg.captions_file)
    if kind == "tfds":
        return TfdsCaptionSource(data_cfg.tfds_name, data_cfg.split, data_cfg.path or None,
                                 data_cfg.image_key, data_cfg.caption_key)
    raise ValueError(f"unknown data.source {kind!r} for text-to-image; use digits, folder or tfds")
