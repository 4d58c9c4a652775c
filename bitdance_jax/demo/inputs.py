"""The demo's inputs: class names and one-line ``InputError`` checks of what the page sends."""
from __future__ import annotations

import json
import math
import os

DIGITS_CLASSES = 10
IMAGENET_CLASSES = 1000

# ----------------------------------------------------------------------------- class names

def _imagenet_names() -> list[str] | None:
    """The 1000 ImageNet class names shipped with gradio (no copy kept here)."""
    try:
        import importlib.resources as resources
        path = resources.files("gradio") / "media_assets" / "data" / "imagenet_labels.json"
        names = json.loads(path.read_text(encoding="utf-8"))
    except Exception:  # not shipped by this gradio version: fall back to numbers
        return None
    return [str(n) for n in names] if len(names) == IMAGENET_CLASSES else None


def class_names(num_classes: int, names_file: str | None = None) -> list[str]:
    """One human-readable name per class id."""
    if names_file:
        with open(names_file, encoding="utf-8") as f:
            text = f.read()
        try:
            names = json.loads(text)
        except json.JSONDecodeError:
            names = [line.strip() for line in text.splitlines() if line.strip()]
        if not isinstance(names, list) or len(names) != num_classes:
            raise ValueError(f"{names_file}: expected {num_classes} class names, got "
                             f"{len(names) if isinstance(names, list) else type(names).__name__}")
        return [str(n) for n in names]
    if num_classes == DIGITS_CLASSES:
        return [f"digit {i}" for i in range(num_classes)]
    if num_classes == IMAGENET_CLASSES and (names := _imagenet_names()):
        return names
    return [f"class {i}" for i in range(num_classes)]


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{what}: expected positive whole numbers, got {text!r}")
    return list(dict.fromkeys(values))


def parse_size(label: str) -> tuple[int, int]:
    """``"HxW"`` -> (height, width)."""
    try:
        h, w = (int(x) for x in str(label).lower().split("x"))
    except ValueError:
        raise ValueError(f"size {label!r} is not HEIGHTxWIDTH") from None
    return h, w


def size_label(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"


class InputError(ValueError):
    """Something the user typed or picked that cannot be used: shown in the page."""


def _whole(value, what: str, lo: int, hi: int | None = None) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError(f"{what} is empty: enter a whole number")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a whole number, got {value!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise InputError(f"{what} must be a whole number, got {value!r}")
    v = int(f)
    if v < lo or (hi is not None and v > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise InputError(f"{what} must be {rng}, got {v}")
    return v


def _number(value, what: str, lo: float, hi: float) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(f) or not lo <= f <= hi:
        raise InputError(f"{what} must be between {lo} and {hi}, got {value!r}")
    return f
