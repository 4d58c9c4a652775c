"""Image augmentation for training (numpy + PIL, seeded per record): resize, centre and random crops, flips, the late decay to centre crops."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

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
