"""A local Hugging Face Hub cache in the exact layout ``huggingface_hub`` writes, for tests
that must not touch the network:

    <HF_HOME>/hub/models--owner--name/
        blobs/<sha256 of the file>
        refs/<branch>                      (the commit hash, no newline)
        snapshots/<commit>/<path>  ->  ../../blobs/<sha256>   (relative symlinks)
"""
from __future__ import annotations

import hashlib
import os


def repo_folder(hf_home: str, repo_id: str) -> str:
    return os.path.join(hf_home, "hub", "models--" + repo_id.replace("/", "--"))


def add_snapshot(hf_home: str, repo_id: str, files: dict[str, str | bytes], *,
                 branch: str | None = "main", commit: str | None = None) -> str:
    """Add one commit holding ``files`` ({path in repo: source file path or bytes}); point
    ``refs/<branch>`` at it. Returns the commit hash."""
    repo = repo_folder(hf_home, repo_id)
    contents = {}
    for rel, src in files.items():
        if isinstance(src, (bytes, bytearray)):
            contents[rel] = bytes(src)
        else:
            with open(src, "rb") as f:
                contents[rel] = f.read()
    if commit is None:
        h = hashlib.sha1(repo_id.encode())
        for rel in sorted(contents):
            h.update(rel.encode() + b"\0" + hashlib.sha256(contents[rel]).digest())
        commit = h.hexdigest()
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    for rel, data in contents.items():
        blob = hashlib.sha256(data).hexdigest()
        blob_path = os.path.join(repo, "blobs", blob)
        if not os.path.exists(blob_path):
            with open(blob_path, "wb") as f:
                f.write(data)
        link = os.path.join(snapshot, rel)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.relpath(blob_path, os.path.dirname(link)), link)
    if branch is not None:
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", branch), "w") as f:
            f.write(commit)
    return commit


def add_folder(hf_home: str, repo_id: str, folder: str, **kwargs) -> str:
    """A commit holding every file of ``folder`` (recursively)."""
    files = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            full = os.path.join(dirpath, n)
            files[os.path.relpath(full, folder)] = full
    return add_snapshot(hf_home, repo_id, files, **kwargs)
