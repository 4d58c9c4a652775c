"""Sample a class-conditional BitDance model.

    python -m bitdance_jax.sample --ckpt DIR --class-ids 207,360,387 --cfg-scale 4 --out grid.png
    python -m bitdance_jax.sample --ckpt DIR --num-samples 50000 --npz samples.npz

The ``--npz`` path writes uint8 NHWC ``arr_0`` (the ADM evaluation suite's format). It runs
in chunks of ``--batch-size`` images saved under ``<npz>.parts/``; a rerun with the same
settings skips the chunks already there (``run.json`` records the settings, the numerics and a
digest of the weights; a rerun with other ones is refused, and a torn chunk is sampled again).
Sample g has class g // (N / num_classes) (balanced, in order, as the reference's FID
script; classes cycle when N < num_classes) and its noise depends only on (seed, g), so the
result does not depend on chunking, device count or process count. The .npz is written
byte-reproducibly (fixed zip timestamps).

Several processes (``--coordinator/--num-processes/--process-id``, or a SLURM / Open MPI /
TPU VM launch, as for the trainer) split every chunk: each samples its share on its own
devices, the shares are gathered, and process 0 writes the chunk, the manifest and the .npz.
    python tools/launch_local.py -n 2 --devices-per-process 2 -- \
        python -m bitdance_jax.sample --ckpt DIR --num-samples 1000 --npz samples.npz
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import zipfile

import numpy as np

from bitdance_jax import images as image_lib
from bitdance_jax.hub import HubError
from bitdance_jax.c2i.api import DEFAULT_SAMPLING_STEPS, load_model
from bitdance_jax.checkpointing import fingerprint
from bitdance_jax.nn.precision import DTYPES, MATMUL_PRECISIONS
from bitdance_jax.parallel import distributed

PARTS_MANIFEST = "run.json"
FINISH_TIMEOUT_S = 3600.0  # how long the other processes wait for process 0 to write the .npz


def parse_class_ids(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--class-ids must be comma-separated integers, got {text!r}") from None


def fid_class_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """Balanced labels in order (num_samples // num_classes per class), then cycling."""
    per_class = max(1, num_samples // num_classes)
    g = np.arange(num_samples)
    balanced = g // per_class
    return np.where(balanced < num_classes, balanced, g % num_classes).astype(np.int32)


def save_npz(path: str, arr: np.ndarray) -> None:
    """``np.savez(path, arr_0=arr)`` with a fixed zip timestamp: the same array, the same bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        info = zipfile.ZipInfo("arr_0.npy", date_time=(1980, 1, 1, 0, 0, 0))
        with zf.open(info, "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)


def _broadcast_from_main(values: np.ndarray) -> np.ndarray:
    """Process 0's ``values`` on every process (a collective)."""
    if distributed.process_count() == 1:
        return values
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.broadcast_one_to_all(values))


def _gather(images: np.ndarray) -> np.ndarray:
    """Every process's images, in process order (a collective)."""
    if distributed.process_count() == 1:
        return images
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(images, tiled=True))


def sample_npz(model, out: str, num_samples: int, *, seed: int, cfg_scale: float, steps: int,
               batch_size: int, class_ids: list[int] | None = None, max_chunks: int | None = None,
               progress: bool = True) -> str | None:
    """Sample ``num_samples`` images into ``out`` (.npz, arr_0 uint8 NHWC), resumably.

    Multi-process: every process calls it with the same arguments; each samples its share of
    every chunk (on its own devices), and process 0 writes the files. Returns the path, or
    None when ``max_chunks`` stopped the run before the end."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError("--num-samples and --batch-size must be >= 1")
    labels = (np.resize(np.asarray(class_ids, np.int32), num_samples) if class_ids
              else fid_class_labels(num_samples, model.config.num_classes))
    parts = out + ".parts"
    manifest = os.path.join(parts, PARTS_MANIFEST)
    num_chunks = -(-num_samples // batch_size)
    chunk_path = lambda k: os.path.join(parts, f"chunk_{k:06d}.npy")
    chunk_shape = lambda k: (min(batch_size, num_samples - k * batch_size),
                             model.image_size, model.image_size, 3)

    def prepare():  # process 0: the manifest, written once (others learn of its errors)
        if (os.path.isdir(parts) and not os.path.exists(manifest)
                and any(f.startswith("chunk_") for f in os.listdir(parts))):
            raise ValueError(f"{parts} holds chunks but no {PARTS_MANIFEST} (settings unknown); "
                             "remove it or sample to another file")
        run = {"num_samples": num_samples, "seed": seed, "cfg_scale": cfg_scale, "steps": steps,
               "batch_size": batch_size, "class_ids": None if not class_ids else
               [int(c) for c in class_ids], "labels": fingerprint.bytes_digest(labels.tobytes()),
               "config": model.config.to_dict(),
               "params": fingerprint.tree_digest({**model.params,
                                                  "tokenizer": model.tokenizer.params}),
               **fingerprint.numerics(model.sampler.dtype, model.sampler.precision)}
        os.makedirs(parts, exist_ok=True)
        fingerprint.check_or_write_manifest(manifest, run, what=parts)

    def chunk_done(k: int) -> bool:  # process 0: a chunk that is there and whole
        path = chunk_path(k)
        if not os.path.exists(path):
            return False
        try:
            arr = np.load(path, mmap_mode="r")
            ok = arr.shape == chunk_shape(k) and arr.dtype == np.uint8
        except (OSError, ValueError, EOFError):
            ok = False
        if not ok:
            print(f"warning: {path} is torn or of another shape; sampling it again",
                  file=sys.stderr)
            os.remove(path)
        return ok

    distributed.run_once("sample_npz.prepare", prepare)
    main, me, n = distributed.is_main(), distributed.process_index(), distributed.process_count()
    # What is left to do, as process 0 sees it (the parts may live on its disk only).
    done_mask = np.array([main and chunk_done(k) for k in range(num_chunks)])
    todo = [k for k, done in enumerate(_broadcast_from_main(done_mask)) if not done]
    from tqdm import tqdm
    bar = tqdm(total=num_samples, initial=num_samples - sum(
        min(batch_size, num_samples - k * batch_size) for k in todo),
        unit="img", desc="sampling", disable=not progress or not main)
    share = -(-batch_size // n)  # this process's samples of each chunk (the last may be padding)
    for done, k in enumerate(todo):
        if max_chunks is not None and done >= max_chunks:
            bar.close()
            distributed.barrier("sample_npz.stopped")
            return None
        # a short last chunk is padded to the batch size: one compiled program for all
        idx = k * batch_size + me * share + np.arange(share)
        count = min(batch_size, num_samples - k * batch_size)
        imgs = model.sample(labels[np.minimum(idx, num_samples - 1)], seed=seed,
                            cfg_scale=cfg_scale, num_sampling_steps=steps, sample_indices=idx)
        imgs = _gather(imgs)[:count]
        if main:
            tmp = chunk_path(k) + ".tmp.npy"
            with open(tmp, "wb") as f:  # on disk before the rename makes it count as done
                np.save(f, imgs)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, chunk_path(k))
        bar.update(count)
    bar.close()

    def finish():  # process 0 (it may take long: the others wait without a collective)
        arr = np.concatenate([np.load(chunk_path(k)) for k in range(num_chunks)])
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        tmp = out + ".tmp.npz"
        save_npz(tmp, arr)
        os.replace(tmp, out)
        shutil.rmtree(parts)

    distributed.run_once("sample_npz.finish", finish, timeout_s=FINISH_TIMEOUT_S)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="ported/trained model directory")
    ap.add_argument("--class-ids", help="comma-separated ImageNet class ids, e.g. 207,360,387")
    ap.add_argument("--cfg-scale", type=float, default=None,
                    help="classifier-free guidance (default: the model's, e.g. 3.9 for B-4x)")
    ap.add_argument("--steps", type=int, default=DEFAULT_SAMPLING_STEPS,
                    help="Euler-Maruyama steps of the diffusion head per AR step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["auto"] + sorted(DTYPES), default="auto",
                    help="compute policy (auto: bf16-mixed on GPU/TPU, float32 on CPU; "
                         "params stay float32)")
    ap.add_argument("--matmul-precision", choices=sorted(MATMUL_PRECISIONS), default="default",
                    help="precision of float32 matmuls")
    ap.add_argument("--quantize", choices=("int8", "fp8"), default=None,
                    help="weight-only quantized model/head kernels (a directory ported with "
                         "--quantize loads as stored)")
    ap.add_argument("--out", help="PNG grid of the --class-ids samples")
    ap.add_argument("--ncol", type=int, default=None, help="grid columns")
    ap.add_argument("--num-samples", type=int, help="number of samples for --npz")
    ap.add_argument("--npz", help="write arr_0 uint8 NHWC samples (FID evaluation)")
    ap.add_argument("--batch-size", type=int, default=64, help="samples per chunk (--npz)")
    ap.add_argument("--max-chunks", type=int, default=None,
                    help="stop after this many new chunks (resume later)")
    distributed.add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        distributed.initialize_from(args)  # before any other JAX call
        if bool(args.out) == bool(args.npz):
            raise ValueError("give exactly one of --out (PNG grid) or --npz (with --num-samples)")
        class_ids = parse_class_ids(args.class_ids) if args.class_ids else None
        model = load_model(args.ckpt, dtype=args.dtype, precision=args.matmul_precision,
                           quantize=args.quantize)
        cfg_scale = model.default_cfg_scale if args.cfg_scale is None else args.cfg_scale
        if args.out:
            if not class_ids:
                raise ValueError("--out needs --class-ids")
            # (several processes: each samples the grid on its own devices, process 0 writes it)
            imgs = model.sample(class_ids, seed=args.seed, cfg_scale=cfg_scale,
                                num_sampling_steps=args.steps)
            if distributed.is_main():
                image_lib.save_png(image_lib.make_grid(imgs, args.ncol), args.out)
                print(f"wrote {args.out} ({len(imgs)} samples, cfg {cfg_scale})")
        else:
            if not args.num_samples:
                raise ValueError("--npz needs --num-samples")
            if class_ids:
                model.sampler.check_inputs(class_ids, cfg_scale, args.steps)
            path = sample_npz(model, args.npz, args.num_samples, seed=args.seed,
                              cfg_scale=cfg_scale, steps=args.steps, batch_size=args.batch_size,
                              class_ids=class_ids, max_chunks=args.max_chunks)
            if distributed.is_main():
                print(f"wrote {path}" if path else f"stopped after {args.max_chunks} "
                      "chunk(s); rerun to resume")
    except (ValueError, OSError, HubError, distributed.DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
