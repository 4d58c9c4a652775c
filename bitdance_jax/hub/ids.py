"""Hub ids: ``hf:owner/name[/path/in/repo][@revision]`` parsed and checked (untrusted input:
every part later becomes a path under the caches), and the errors of ``bitdance_jax.hub``."""
from __future__ import annotations

import dataclasses
import re

PREFIXES = ("hf://", "hf:")
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
