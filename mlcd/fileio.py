"""Atomic file writes: the one way every stage writes an output, so nothing half-written is ever read back.

Each writer writes to a temporary name in the same directory (unique per process) and renames it over the
target with os.replace, which is atomic on POSIX: a reader sees the old file or the new one, never a mix.
"""
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_path(path):
    """Yield a temporary path to write; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, obj, indent: int = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n")


def save_npy(path, arr) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def replace_dir(tmp_dir, final_dir) -> None:
    """Move a fully written directory into place, replacing an existing one (old moved aside, then deleted)."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp_dir, final_dir)
