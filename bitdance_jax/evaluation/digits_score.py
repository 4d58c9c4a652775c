"""Scores class-conditional digit samples: a classifier fitted on scikit-learn's real digits
labels each generated image; the score is the share that matches the conditioning class."""
from __future__ import annotations

import numpy as np
from PIL import Image


def digit_features(images: np.ndarray) -> np.ndarray:
    """uint8 [N,H,W,3|1] -> the 8x8 grey levels of the real digits (0..16), flattened."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [N,H,W,C], got shape {images.shape}")
    grey = images.astype(np.float32).mean(axis=-1)
    small = np.stack([np.asarray(Image.fromarray(g).resize((8, 8), Image.BOX)) for g in grey])
    return (small * (16.0 / 255.0)).reshape(len(images), -1)


def fit_digit_classifier(image_size: int = 32):
    """An RBF SVM on every real digit, seen through ``digit_features`` at ``image_size``."""
    from sklearn.svm import SVC
    from bitdance_jax.data.sources import DigitsSource
    real = DigitsSource(image_size)
    return SVC(C=10.0, gamma="scale").fit(digit_features(real.images), real.labels)


def score_samples(images: np.ndarray, labels: np.ndarray, classifier=None) -> dict:
    """Share of ``images`` the classifier assigns to their conditioning ``labels``."""
    labels = np.asarray(labels)
    if len(images) != len(labels) or not len(labels):
        raise ValueError(f"{len(images)} images for {len(labels)} labels")
    classifier = classifier or fit_digit_classifier(np.asarray(images).shape[1])
    predicted = classifier.predict(digit_features(images))
    per_class = {int(c): float(np.mean(predicted[labels == c] == c)) for c in np.unique(labels)}
    return {"score": float(np.mean(predicted == labels)), "num_samples": int(len(labels)),
            "per_class": per_class}
