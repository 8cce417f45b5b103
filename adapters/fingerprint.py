"""A cheap test of whether an adapter's files changed since they were validated.

Hashing every registered adapter at start-up costs seconds per thousand; a `stat` of its two
files costs microseconds. A fingerprint is the size, modification time and inode of the config
and of the weights file: any rewrite, replacement or truncation changes at least one of them
(a copy with preserved times gets a new inode). A changed fingerprint is not proof of a changed
adapter (a copied state volume has new inodes), so the caller re-hashes before it refuses.
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # the order vLLM reads them


def folder_fingerprint(folder: Path) -> list[int] | None:
    """Size, mtime (ns) and inode of the config and the weights file; None if one is missing."""
    try:
        config = os.stat(folder / CONFIG_FILE)
    except OSError:
        return None
    for name in WEIGHT_FILES:
        try:
            weights = os.stat(folder / name)
        except OSError:
            continue
        return [
            config.st_size,
            config.st_mtime_ns,
            config.st_ino,
            weights.st_size,
            weights.st_mtime_ns,
            weights.st_ino,
        ]
    return None
