"""Talking to the Hub: the commit a revision points to now, ``snapshot_download`` into the Hub
cache, and huggingface_hub's exceptions translated into ``HubError`` s that say what to do."""
from __future__ import annotations

import os
import warnings

from bitdance_jax.hub.cache import hf_home, hub_cache_dir
from bitdance_jax.hub.ids import HubError, HubId, HubNotFoundError, HubOfflineError


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
