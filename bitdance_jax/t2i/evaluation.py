"""Prompt-set runs in the reference's evaluation layouts (DPG-Bench grids, GenEval folders, flat PNGs): per-prompt seeds, resume, one contiguous share per process.

Layouts, for ``num_images`` images per prompt:

* ``flat``: ``<index:05d>.png`` (one image) or ``<index:05d>_<j>.png``;
* ``dpg``: ``<id>.png``, the images as one grid of two columns, no padding (DPG-Bench reads
  the 2x2 grid of four images);
* ``geneval``: ``<index:05d>/metadata.jsonl`` (the prompt's line), ``<index:05d>/samples/<k:04d>.png``
  and ``<index:05d>/grid.png``, written last (GenEval's evaluator reads this tree).

Every file is written under a temporary name and renamed, and a prompt counts as done once its
last file exists, so a rerun after an interruption resumes from the first prompt not done.
Prompt ``i``'s images are sampled from (seed, i) alone (``sample_indices``), and decoded with
seed ``seed + i``, whatever the batch size or process count.
``<out_dir>/.bitdance_run.json`` records what the images depend on (a digest of the weights and
of the prompt set, the numerics, size, steps, guidance, images per prompt, seed and layout): a
rerun with any of them changed is refused rather than mixed with the images already there.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from PIL import Image

from bitdance_jax import images as image_lib
from bitdance_jax.checkpointing import fingerprint
from bitdance_jax.checkpointing.atomic import atomic_write
from bitdance_jax.t2i.prompts import PromptEntry

LAYOUTS = ("flat", "dpg", "geneval")
MANIFEST = ".bitdance_run.json"  # hidden: the benchmarks' readers list the folder
GRID_COLUMNS = 2


def final_path(out_dir: str, entry: PromptEntry, layout: str, num_images: int) -> str:
    """The file written last for ``entry``: its existence means the prompt is done."""
    if layout == "dpg":
        return os.path.join(out_dir, f"{entry.id}.png")
    if layout == "geneval":
        return os.path.join(out_dir, f"{entry.index:05d}", "grid.png")
    last = f"{entry.index:05d}.png" if num_images == 1 else f"{entry.index:05d}_{num_images - 1}.png"
    return os.path.join(out_dir, last)


def _save_png(image: np.ndarray, path: str) -> None:
    with atomic_write(path, directory=False) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def write_prompt(out_dir: str, entry: PromptEntry, images: np.ndarray, layout: str) -> list[str]:
    """Write one prompt's uint8 images [n, H, W, 3] in ``layout``; returns the paths."""
    n = len(images)
    if layout == "flat":
        paths = [os.path.join(out_dir, f"{entry.index:05d}.png" if n == 1 else
                              f"{entry.index:05d}_{j}.png") for j in range(n)]
        for image, path in zip(images, paths):
            _save_png(image, path)
        return paths
    grid = image_lib.make_grid(images, GRID_COLUMNS, pad=0)
    if layout == "dpg":
        path = final_path(out_dir, entry, layout, n)
        _save_png(grid, path)
        return [path]
    if layout == "geneval":
        folder = os.path.join(out_dir, f"{entry.index:05d}")
        paths = [os.path.join(folder, "samples", f"{k:04d}.png") for k in range(n)]
        for image, path in zip(images, paths):
            _save_png(image, path)
        with atomic_write(os.path.join(folder, "metadata.jsonl"), directory=False) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(entry.metadata or json.dumps({"prompt": entry.prompt}) + "\n")
        grid_path = final_path(out_dir, entry, layout, n)
        _save_png(grid, grid_path)
        return paths + [grid_path]
    raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")


def process_share(entries: Sequence[PromptEntry], process_index: int,
                  process_count: int) -> list[PromptEntry]:
    """This process's contiguous block of the prompt set (as the reference splits ranks)."""
    per = -(-len(entries) // process_count)
    return list(entries[process_index * per:(process_index + 1) * per])


def pending(entries: Sequence[PromptEntry], out_dir: str, layout: str,
            num_images: int) -> list[PromptEntry]:
    """The entries whose outputs are not complete yet."""
    return [e for e in entries
            if not os.path.isfile(final_path(out_dir, e, layout, num_images))]


def run_fingerprint(pipe, entries: Sequence[PromptEntry], *, layout: str, height: int,
                    width: int, steps: int, guidance_scale: float, num_images: int,
                    seed: int) -> dict:
    """Everything a prompt set's images depend on (the batch size and process count do not)."""
    prompts = json.dumps([[e.index, e.id, e.prompt, e.metadata] for e in entries])
    return {"layout": layout, "height": height, "width": width, "steps": steps,
            "guidance_scale": guidance_scale, "num_images": num_images, "seed": seed,
            "prompts": fingerprint.bytes_digest(prompts.encode()),
            "params": fingerprint.tree_digest(pipe.params),
            "text_tokenizer": fingerprint.file_digest(pipe.text_tokenizer.path),
            **fingerprint.numerics(pipe.dtype, pipe.precision)}


def prepare_out_dir(out_dir: str, entries: Sequence[PromptEntry], layout: str, num_images: int,
                    run: dict) -> None:
    """Check ``out_dir``'s manifest against ``run`` (refusing other settings), or write it;
    images that are there without one are of unknown settings, and refused."""
    manifest = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(manifest):
        done = [e for e in entries if os.path.isfile(final_path(out_dir, e, layout, num_images))]
        if done:
            first = final_path(out_dir, done[0], layout, num_images)
            raise ValueError(f"{out_dir} holds images ({first}, ...) of a run with unknown "
                             f"settings (no {MANIFEST}); remove them or use another --out-dir")
    fingerprint.check_or_write_manifest(manifest, run, what=out_dir)


def sample_indices(chunk, num_images: int) -> list[int]:
    """The sampler's sample index of every image of ``chunk`` (prompt-major): image j of
    prompt i is sample ``i * num_images + j``, so its draws depend on (seed, i, j) alone,
    never on which prompts share its batch or process."""
    return [e.index * num_images + j for e in chunk for j in range(num_images)]
