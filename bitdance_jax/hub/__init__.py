"""Models from the Hugging Face Hub: ``hf:owner/name[/path/in/repo][@revision]`` -> a local,
ported directory that ``load_model`` / ``load_tokenizer`` / ``load_t2i`` read.

    from bitdance_jax import hub
    model = bd.load_model(hub.resolve("hf:owner/BitDance-ImageNet/BitDance_B_16x.pt"))

* Files come through ``huggingface_hub.snapshot_download`` into its cache (``HF_HOME`` /
  ``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` reads only what is cached).
* The released PyTorch files (class-conditional ``{"model", "ema"}`` ``.pt``, tokenizer ``.pt``
  or ``ae.safetensors`` + ``ae_config.json``, text-to-image folders) are ported once, into
  ``$BITDANCE_JAX_CACHE`` (default ``$HF_HOME/bitdance_jax``) under
  ``ported/<owner>--<name>/<commit>/<what>``: keyed by the resolved commit, so a moved
  branch gets a new port and a pinned commit never changes. Later calls read the port.
* A port is written into a temporary sibling and renamed into place when complete (under a
  file lock), so a failed or interrupted download or port leaves nothing that looks
  complete; the next call starts over.
* A repo that already holds a ported directory (``bitdance.json``) is used as it is.
* Plain paths are returned unchanged.
"""
from __future__ import annotations

import json
import os
import uuid

from bitdance_jax.checkpointing import atomic
from bitdance_jax.hub.cache import (DONE_FILE, META_FILE, _complete, _inside, _local_commit,  # noqa: F401
                                    _repo_dir, cache_root, hf_home, hub_cache_dir, is_offline,
                                    ported_dir)
from bitdance_jax.hub.ids import (_COMMIT, PREFIXES, HubError, HubFormatError, HubId,  # noqa: F401
                                  HubNotFoundError, HubOfflineError, is_hub_id, parse)
from bitdance_jax.hub.remote import _remote_commit, download

MODEL_EXTS = (".pt", ".pth")


# ----------------------------------------------------------------------------- porting

def _port_function():
    """The porting entry point that detects the kind of a released file or folder (imported
    when a port is due: resolving a plain path or a cached port needs none of porting)."""
    from bitdance_jax.porting.cli import port
    return port


def _is_tokenizer_name(name: str) -> bool:
    base = os.path.basename(name).lower()
    return base.startswith(("ae", "vae")) or "tokenizer" in base


def _listing(root: str, limit: int = 20) -> str:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames
                  if not f.startswith(".")]
    found.sort()
    more = f" (+{len(found) - limit} more)" if len(found) > limit else ""
    return (", ".join(found[:limit]) + more) if found else "no files"


def plan(snapshot: str, spec: HubId) -> tuple[str, dict] | None:
    """What to port from a downloaded snapshot: ``(source path, port kwargs)``, or ``None``
    when the target already is a ported directory."""
    target = _inside(snapshot, spec.subpath) if spec.subpath else snapshot
    if not os.path.exists(target):
        raise HubNotFoundError(f"{spec}: {spec.subpath!r} is not in {spec.repo_id} at commit "
                               f"{os.path.basename(snapshot)} (files: {_listing(snapshot)})")
    if os.path.isfile(target):
        return target, {}
    if os.path.isfile(os.path.join(target, META_FILE)):
        return None
    if os.path.isfile(os.path.join(target, "config.json")) or \
            os.path.isfile(os.path.join(target, "ae_config.json")):
        return target, {}
    pts = sorted(f for f in os.listdir(target) if f.endswith(MODEL_EXTS))
    models = [f for f in pts if not _is_tokenizer_name(f)]
    tokenizers = [f for f in pts if _is_tokenizer_name(f)]
    prefix = "hf:" + spec.repo_id + (f"/{spec.subpath}" if spec.subpath else "")
    rev = f"@{spec.revision}" if spec.revision else ""
    if len(models) > 1:
        choices = ", ".join(f"{prefix}/{m}{rev}" for m in models)
        raise HubFormatError(f"{spec} holds several models; name one: {choices}")
    if len(tokenizers) > 1:
        choices = ", ".join(f"{prefix}/{t}{rev}" for t in tokenizers)
        if not models:
            raise HubFormatError(f"{spec} holds several tokenizers; name one: {choices}")
        tokenizers = []  # the model's own vae.* weights
    if models:
        kw = {"tokenizer": os.path.join(target, tokenizers[0])} if tokenizers else {}
        return os.path.join(target, models[0]), kw
    if tokenizers:
        return os.path.join(target, tokenizers[0]), {}
    raise HubFormatError(
        f"{spec} holds no BitDance checkpoint: expected a class-conditional or tokenizer .pt, "
        "ae.safetensors + ae_config.json, a text-to-image folder (config.json + ae/vision "
        f"head/projector files) or a ported directory ({META_FILE}); found {_listing(target)}")


def _port(src: str, dst: str, **kwargs) -> str:
    """Port ``src`` into the new directory ``dst`` (kept apart so tests can interrupt it)."""
    return _port_function()(src, dst, **kwargs)


def _port_atomically(spec: HubId, snapshot: str, src: str, dst: str, kwargs: dict) -> str:
    from filelock import FileLock
    parent, name = os.path.split(dst)
    os.makedirs(parent, exist_ok=True)
    with FileLock(os.path.join(parent, f".{name}.lock")):
        if _complete(dst):       # another process finished it meanwhile
            return dst
        for stale in os.listdir(parent):   # left by an interrupted earlier attempt
            if stale.startswith(f".{name}.tmp-") or stale == name:
                atomic.remove(os.path.join(parent, stale))
        tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            try:
                _port(src, tmp, **kwargs)
            except (ValueError, KeyError, OSError, EOFError) as e:
                rel = os.path.relpath(src, snapshot)
                raise HubFormatError(
                    f"{spec}: {rel if rel != '.' else 'the repository'} (commit "
                    f"{os.path.basename(snapshot)}) does not match a BitDance checkpoint: {e}. "
                    "If a download was interrupted, remove that snapshot from the Hub cache "
                    f"({hub_cache_dir()}) and retry online") from e
            info = {"hub_id": str(spec), "repo_id": spec.repo_id, "revision": spec.revision,
                    "commit": os.path.basename(snapshot), "subpath": spec.subpath,
                    "source": os.path.relpath(src, snapshot),
                    "options": {k: v for k, v in kwargs.items() if k != "tokenizer"},
                    "tokenizer": os.path.relpath(kwargs["tokenizer"], snapshot)
                    if kwargs.get("tokenizer") else None}
            with open(os.path.join(tmp, DONE_FILE), "w") as f:
                json.dump(info, f, indent=2)
            os.rename(tmp, dst)
        finally:
            atomic.remove(tmp)
    return dst


def resolve(path_or_id, *, use_ema: bool = True, param_dtype: str = "float32",
            num_codebooks: int | None = None, quantize: str | None = None, token=None) -> str:
    """A local directory for ``path_or_id``: plain paths unchanged; ``hf:owner/name[/path]
    [@revision]`` downloaded (or read from the cache) and ported once.

    ``use_ema``: the EMA weights of a class-conditional training checkpoint (as the
    reference's sampler); ``param_dtype``: stored dtype of a text-to-image port;
    ``num_codebooks``: a tokenizer's bit groups (default 8 bits per group); ``quantize``
    ("int8", "fp8"): a model port with quantized kernels (``nn.quant``). Each choice is its
    own cached port. Raises ``HubOfflineError``, ``HubNotFoundError`` or
    ``HubFormatError`` (all ``HubError``) with what to do.
    """
    if not is_hub_id(path_or_id):
        return os.fspath(path_or_id) if path_or_id is not None else path_or_id
    spec = parse(path_or_id)
    options = dict(use_ema=use_ema, param_dtype=str(param_dtype), num_codebooks=num_codebooks,
                   quantize=quantize)
    offline = is_offline()
    rev = spec.revision or "main"
    commit = rev if _COMMIT.match(rev) else None
    if commit is None and not offline:
        commit = _remote_commit(spec, token)
    if commit is None:
        commit = _local_commit(spec)
    if commit is not None and _complete(dst := ported_dir(spec, commit, **options)):
        return dst
    snapshot = download(spec, commit or rev, offline=offline, token=token)
    commit = os.path.basename(os.path.normpath(snapshot))
    if not _COMMIT.match(commit):
        raise HubError(f"{spec}: the Hub cache returned {snapshot!r}, not a snapshot folder")
    todo = plan(snapshot, spec)
    if todo is None:   # the repo holds a ported directory
        return os.path.join(snapshot, spec.subpath) if spec.subpath else snapshot
    src, kwargs = todo
    kwargs.update(options)
    dst = _port_atomically(spec, snapshot, src, ported_dir(spec, commit, **options), kwargs)
    if not _COMMIT.match(rev):   # remember the branch for offline use without the Hub cache
        with atomic.atomic_write(_inside(_repo_dir(spec.repo_id), "refs", rev),
                                 directory=False) as tmp:
            with open(tmp, "w") as f:
                f.write(commit)
    return dst


def main(argv=None) -> int:
    """``python -m bitdance_jax.hub hf:owner/name[/file][@rev]``: fetch, port, print the dir."""
    import argparse
    import sys
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("hub_id")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--num-codebooks", type=int, default=None)
    p.add_argument("--quantize", choices=("int8", "fp8"), default=None,
                   help="port with weight-only quantized kernels")
    args = p.parse_args(argv)
    try:
        print(resolve(args.hub_id, use_ema=not args.no_ema, param_dtype=args.param_dtype,
                      num_codebooks=args.num_codebooks, quantize=args.quantize))
    except HubError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

