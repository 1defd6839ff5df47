"""A checkpoint's manifest: the size and SHA-256 of every file in its folder, written with it and verified before it
is read, so a truncated or corrupted checkpoint is named in one line instead of failing deep inside a loader.

    step_00000100/manifest.json   {"version": 1, "files": {"trainer.pt": {"size": N, "sha256": HEX}, ...}}

Written by rank 0 once every rank's files are in the folder, before the folder is published (atomic rename), and
itself written atomically (lsp/train/files.py), so a complete checkpoint always has a whole manifest. A checkpoint
saved before manifests existed has none and is read as before. Torch-free: `lsp eval` checks before importing torch.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Optional

from .files import write_text_atomic

MANIFEST = "manifest.json"
CHUNK = 1 << 24   # bytes hashed per read


def _files(folder: str) -> Dict[str, str]:
    # relative path (with "/") -> absolute path of every file under folder but the manifest
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), folder).replace(os.sep, "/")
            if rel != MANIFEST:
                out[rel] = os.path.join(dirpath, name)
    return out


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str) -> None:
    """Record the size and SHA-256 of every file under folder in `folder/manifest.json`."""
    files = {rel: {"size": os.path.getsize(path), "sha256": sha256_of(path)}
             for rel, path in sorted(_files(folder).items())}
    write_text_atomic(os.path.join(folder, MANIFEST), json.dumps({"version": 1, "files": files}, indent=1) + "\n",
                      sync=True)


def manifest_problem(folder: str) -> Optional[str]:
    """None when folder matches its manifest (or has none: saved before manifests), else the first problem in a few
    words naming the file, e.g. "__0_0.distcp is 812 bytes, 1624 when saved"."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            recorded = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__})"
    present = _files(folder)
    for rel, entry in recorded.items():
        if rel not in present:
            return f"{rel} is missing"
        size = os.path.getsize(present[rel])
        if size != entry["size"]:
            return f"{rel} is {size} bytes, {entry['size']} when saved"
    for rel, entry in recorded.items():   # sizes first: a truncation is found without reading anything
        if sha256_of(present[rel]) != entry["sha256"]:
            return f"{rel} has changed since it was saved (another SHA-256)"
    return None
