"""Atomic, durable file writes: the one way every stage writes an output, so nothing half-written is ever read back,
not after a killed process and not after a lost node.

Each writer writes to a temporary name in the same directory (unique per process), flushes it to disk (fsync),
renames it over the target with os.replace (atomic on POSIX: a reader sees the old file or the new one, never a mix)
and then fsyncs the directory, so the rename itself survives a power loss. Without the fsyncs a crash soon after a
rename can leave the new name pointing at data that never reached the disk (ext4, XFS, NFS and Lustre all allow it).
"""
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync(path) -> None:
    """Flush a file's data, or a directory's entries, to disk (a read-only descriptor is enough on POSIX)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path):
    """Yield a temporary path to write; on success it is fsynced and replaces `path` (then the directory is
    fsynced); on error it is removed."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
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
    """Move a fully written (and fsynced) directory into place, replacing an existing one (old moved aside, then
    deleted); the parent is fsynced so the new name is on disk before anyone is told it exists."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        fsync(final_dir.parent)
        shutil.rmtree(old)
    else:
        os.replace(tmp_dir, final_dir)
        fsync(final_dir.parent)
