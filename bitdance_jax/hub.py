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

import dataclasses
import json
import os
import re
import uuid
import warnings
from urllib.parse import quote

from bitdance_jax.checkpointing import atomic
from bitdance_jax.checkpointing.param_dir import META_FILE  # a ported (bitdance-jax) directory

PREFIXES = ("hf://", "hf:")
DONE_FILE = "bitdance_hub.json"   # written last, inside the port, before the rename
MODEL_EXTS = (".pt", ".pth")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# A branch or tag name (``refs/pr/1`` too): it becomes a path under the caches, so only
# plain components, none of them ``..`` or hidden, and never absolute.
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*"
                       r"(?:/[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*)*$")


class HubError(RuntimeError):
    """A Hub id that cannot be turned into a local model directory."""


class HubOfflineError(HubError):
    """Offline (``HF_HUB_OFFLINE`` or no connection) and the files are not cached."""


class HubNotFoundError(HubError):
    """No such repository, revision or file."""


class HubFormatError(HubError):
    """The repository's files are not a BitDance checkpoint this package can port."""


@dataclasses.dataclass(frozen=True)
class HubId:
    repo_id: str                 # "owner/name"
    revision: str | None = None  # branch, tag or commit; None: "main"
    subpath: str | None = None   # a file or folder inside the repo; None: the whole repo

    def __str__(self) -> str:
        s = "hf:" + self.repo_id + (f"/{self.subpath}" if self.subpath else "")
        return s + (f"@{self.revision}" if self.revision else "")


def is_hub_id(path_or_id) -> bool:
    return isinstance(path_or_id, str) and path_or_id.startswith(PREFIXES)


def parse(hub_id: str) -> HubId:
    """``hf:owner/name[/path/in/repo][@revision]`` (``hf://`` works too)."""
    if not is_hub_id(hub_id):
        raise HubError(f"{hub_id!r} is not a Hub id (expected hf:owner/name[/file][@revision])")
    body = hub_id[len(next(p for p in PREFIXES if hub_id.startswith(p))):]
    revision = None
    if "@" in body:
        body, revision = body.rsplit("@", 1)
        if not revision:
            raise HubError(f"{hub_id!r}: empty revision after '@'")
        if not _REVISION.match(revision):
            raise HubError(f"{hub_id!r}: {revision!r} is not a revision: expected a branch or "
                           "tag name (letters, digits, '.', '_', '-', '/'-separated parts) or "
                           "a 40-character commit hash")
    parts = [p for p in body.split("/")]
    if len(parts) < 2 or not all(_REPO_PART.match(p) for p in parts[:2]):
        raise HubError(f"{hub_id!r} is not a Hub id: expected hf:owner/name[/file][@revision], "
                       "e.g. hf:owner/BitDance-ImageNet/BitDance_B_16x.pt@main")
    sub = "/".join(parts[2:]).strip("/") or None
    if sub and any(p in ("", ".", "..") for p in sub.split("/")):
        raise HubError(f"{hub_id!r}: bad path inside the repo {sub!r}")
    return HubId("/".join(parts[:2]), revision, sub)


# ----------------------------------------------------------------------------- locations

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


def _variant(spec: HubId, use_ema: bool, param_dtype: str, num_codebooks: int | None) -> str:
    name = quote(spec.subpath, safe="") if spec.subpath else "_repo"
    if not use_ema:
        name += "+model-weights"
    if param_dtype != "float32":
        name += f"+{param_dtype}"
    if num_codebooks:
        name += f"+codebooks{int(num_codebooks)}"
    return name


def ported_dir(spec: HubId, commit: str, *, use_ema: bool = True, param_dtype: str = "float32",
               num_codebooks: int | None = None) -> str:
    return _inside(_repo_dir(spec.repo_id), commit,
                   _variant(spec, use_ema, param_dtype, num_codebooks))


def _complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, DONE_FILE)) and os.path.isfile(os.path.join(path, META_FILE))


# ----------------------------------------------------------------------------- revisions

def _hub_errors():
    from huggingface_hub import errors
    get = lambda name: getattr(errors, name, None) or type(name, (Exception,), {})
    return {n: get(n) for n in (
        "LocalEntryNotFoundError", "IncompleteSnapshotError", "GatedRepoError",
        "RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError",
        "DisabledRepoError", "HFValidationError", "OfflineModeIsEnabled", "HfHubHTTPError")}


def _translate(e: Exception, spec: HubId, revision: str, offline: bool) -> HubError:
    """huggingface_hub's exception -> a HubError that says what to do."""
    E = _hub_errors()
    where = f"HF_HOME={hf_home()}"
    if isinstance(e, E["GatedRepoError"]):
        return HubNotFoundError(f"{spec}: {spec.repo_id} is gated: accept its terms on "
                                f"https://huggingface.co/{spec.repo_id} and log in "
                                "(`hf auth login` or HF_TOKEN)")
    if isinstance(e, E["RepositoryNotFoundError"]):
        return HubNotFoundError(f"{spec}: no repository {spec.repo_id!r} on the Hub (check the "
                                "name; a private repo needs `hf auth login` or HF_TOKEN)")
    if isinstance(e, E["RevisionNotFoundError"]):
        return HubNotFoundError(f"{spec}: {spec.repo_id} has no revision {revision!r} (a "
                                "branch, tag or 40-character commit hash)")
    if isinstance(e, E["DisabledRepoError"]):
        return HubNotFoundError(f"{spec}: {spec.repo_id} has been disabled on the Hub")
    if isinstance(e, (E["LocalEntryNotFoundError"], E["OfflineModeIsEnabled"])):
        partial = isinstance(e, E["IncompleteSnapshotError"])
        what = "only partly in" if partial else "not in"
        if offline:
            return HubOfflineError(
                f"{spec} (revision {revision!r}) is {what} the local Hub cache ({where}) and "
                "HF_HUB_OFFLINE is set: download it once online (unset HF_HUB_OFFLINE, or "
                f"`hf download {spec.repo_id}`), or point HF_HOME at a cache that holds it")
        return HubOfflineError(
            f"{spec}: the Hub cannot be reached and the files are {what} the local cache "
            f"({where}): check the connection (or proxy) and retry")
    if isinstance(e, E["EntryNotFoundError"]):
        return HubNotFoundError(f"{spec}: file not found in {spec.repo_id}@{revision}: {e}")
    if isinstance(e, E["HFValidationError"]):
        return HubError(f"{spec}: invalid repository id or revision: {e}")
    return HubError(f"{spec}: download failed ({type(e).__name__}: {e})")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the Hub could not be reached" for the HTTP clients
    huggingface_hub may use (each optional)."""
    found: list[type[BaseException]] = [OSError, TimeoutError]  # requests' errors are OSErrors
    for module in ("httpx", "httpx2"):
        try:
            found.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _remote_commit(spec: HubId, token) -> str | None:
    """The commit a branch/tag points to now; None when the Hub cannot be reached or answers
    with a server error (then the cache decides, with a warning). Refused credentials are
    an error: a silent fall-back would serve a stale cache to a user whose token is wrong."""
    from huggingface_hub import HfApi
    E = _hub_errors()
    rev = spec.revision or "main"
    try:
        return HfApi().repo_info(spec.repo_id, revision=rev, token=token).sha
    except (E["RepositoryNotFoundError"], E["RevisionNotFoundError"], E["DisabledRepoError"],
            E["HFValidationError"], E["GatedRepoError"]) as e:
        raise _translate(e, spec, rev, offline=False) from e
    except E["OfflineModeIsEnabled"]:
        return None
    except E["HfHubHTTPError"] as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubError(f"{spec}: the Hub refused the credentials (HTTP {status}): check "
                           "HF_TOKEN or `hf auth login`") from e
        if status is not None and status >= 500:
            warnings.warn(f"{spec}: the Hub answered HTTP {status}; using the cached copy of "
                          f"revision {rev!r} if there is one", RuntimeWarning, stacklevel=3)
            return None
        raise HubError(f"{spec}: the Hub refused the request (HTTP {status}): {e}") from e
    except _transport_errors():
        return None


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


# ----------------------------------------------------------------------------- download

def _allow_patterns(spec: HubId) -> list[str] | None:
    if not spec.subpath:
        return None
    patterns = [spec.subpath, spec.subpath + "/*"]
    if spec.subpath.endswith(".safetensors"):  # a tokenizer needs its config beside it
        parent = os.path.dirname(spec.subpath)
        patterns += [os.path.splitext(spec.subpath)[0] + "_config.json",
                     os.path.join(parent, "ae_config.json") if parent else "ae_config.json"]
    return patterns


def download(spec: HubId, revision: str, *, offline: bool, token=None) -> str:
    """``snapshot_download`` into the Hub cache; returns ``.../snapshots/<commit>``."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise HubError("loading hf: ids needs huggingface_hub (pip install huggingface_hub)") from e
    try:
        return snapshot_download(spec.repo_id, revision=revision, cache_dir=hub_cache_dir(),
                                 local_files_only=offline, allow_patterns=_allow_patterns(spec),
                                 token=token)
    except HubError:
        raise
    except Exception as e:
        E = _hub_errors()
        known = tuple(E[n] for n in E)
        if isinstance(e, known) or isinstance(e, OSError):
            raise _translate(e, spec, revision, offline) from e
        raise


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
            num_codebooks: int | None = None, token=None) -> str:
    """A local directory for ``path_or_id``: plain paths unchanged; ``hf:owner/name[/path]
    [@revision]`` downloaded (or read from the cache) and ported once.

    ``use_ema``: the EMA weights of a class-conditional training checkpoint (as the
    reference's sampler); ``param_dtype``: stored dtype of a text-to-image port;
    ``num_codebooks``: a tokenizer's bit groups (default 8 bits per group). Each choice is
    its own cached port. Raises ``HubOfflineError``, ``HubNotFoundError`` or
    ``HubFormatError`` (all ``HubError``) with what to do.
    """
    if not is_hub_id(path_or_id):
        return os.fspath(path_or_id) if path_or_id is not None else path_or_id
    spec = parse(path_or_id)
    options = dict(use_ema=use_ema, param_dtype=str(param_dtype), num_codebooks=num_codebooks)
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
    kwargs.update(use_ema=use_ema, param_dtype=str(param_dtype), num_codebooks=num_codebooks)
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
    args = p.parse_args(argv)
    try:
        print(resolve(args.hub_id, use_ema=not args.no_ema, param_dtype=args.param_dtype,
                      num_codebooks=args.num_codebooks))
    except HubError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
