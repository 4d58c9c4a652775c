"""Where the Hub's files and the ported copies live (read at call time, never at import),
and the commit a branch or tag was last seen at."""
from __future__ import annotations

import os
from urllib.parse import quote

from bitdance_jax.checkpointing.param_dir import META_FILE  # a ported (bitdance-jax) directory
from bitdance_jax.hub.ids import _COMMIT, HubError, HubId

DONE_FILE = "bitdance_hub.json"   # written last, inside the port, before the rename


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now, not at import time."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def hf_home() -> str:
    home = os.environ.get("HF_HOME")
    if not home:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        home = os.path.join(xdg, "huggingface")
    return os.path.expanduser(os.path.expandvars(home))


def hub_cache_dir() -> str:
    """Where ``huggingface_hub`` keeps ``models--owner--name`` (read at call time)."""
    d = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return os.path.expanduser(os.path.expandvars(d)) if d else os.path.join(hf_home(), "hub")


def cache_root() -> str:
    """Root of the ported copies: ``$BITDANCE_JAX_CACHE``, else ``$HF_HOME/bitdance_jax``."""
    d = os.environ.get("BITDANCE_JAX_CACHE")
    return os.path.expanduser(os.path.expandvars(d)) if d else os.path.join(hf_home(), "bitdance_jax")


def _inside(root: str, *parts: str) -> str:
    """``root/parts...``, refusing a result that leaves ``root`` by its components (``..``, an
    absolute part), since Hub ids, revisions and refs are untrusted input. Lexical on
    purpose: a Hub snapshot's files are symlinks into its blob store."""
    path = os.path.join(root, *parts)
    norm_root = os.path.normpath(os.path.abspath(root))
    if os.path.commonpath([norm_root, os.path.normpath(os.path.abspath(path))]) != norm_root:
        raise HubError(f"{os.path.join(*parts)!r} would leave the cache {root}")
    return path


def _repo_dir(repo_id: str) -> str:
    return _inside(cache_root(), "ported", repo_id.replace("/", "--"))


def _variant(spec: HubId, use_ema: bool, param_dtype: str, num_codebooks: int | None,
             quantize: str | None = None) -> str:
    name = quote(spec.subpath, safe="") if spec.subpath else "_repo"
    if not use_ema:
        name += "+model-weights"
    if param_dtype != "float32":
        name += f"+{param_dtype}"
    if num_codebooks:
        name += f"+codebooks{int(num_codebooks)}"
    if quantize:
        name += f"+{quantize}"
    return name


def ported_dir(spec: HubId, commit: str, *, use_ema: bool = True, param_dtype: str = "float32",
               num_codebooks: int | None = None, quantize: str | None = None) -> str:
    return _inside(_repo_dir(spec.repo_id), commit,
                   _variant(spec, use_ema, param_dtype, num_codebooks, quantize))


def _complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, DONE_FILE)) and os.path.isfile(os.path.join(path, META_FILE))


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _local_commit(spec: HubId) -> str | None:
    """The commit a branch/tag pointed to when last seen: huggingface_hub's refs, else ours."""
    rev = spec.revision or "main"
    hf_ref = _inside(hub_cache_dir(), "models--" + spec.repo_id.replace("/", "--"), "refs", rev)
    commit = _read(hf_ref) or _read(_inside(_repo_dir(spec.repo_id), "refs", rev))
    return commit if commit and _COMMIT.match(commit) else None
