"""Atomic file writes: a file either has its old content or its complete new content, never half of it; and the
check that there is room for a large write before it starts (a full disk found half-way through an HDF5 file
leaves the HDF5 library in a state it cannot always leave cleanly)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def check_room(directory: str | Path, total_bytes: int, largest_file_bytes: int) -> None:
    """Refuse (OSError ENOSPC or EFBIG, naming the directory) a write of ``total_bytes`` in files of up to
    ``largest_file_bytes`` that cannot fit: the free space of the directory's file system, and this process's
    file-size limit (``ulimit -f``). Quotas are not visible here; a write that meets one fails as it happens."""
    where = Path(directory)
    while not where.exists() and where != where.parent:
        where = where.parent
    if os.statvfs(where).f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, "Read-only file system", str(where))
    if not os.access(where, os.W_OK):
        raise OSError(errno.EACCES, "Permission denied", str(where))
    free = shutil.disk_usage(where).free
    need = int(total_bytes * 1.05) + (1 << 20)  # HDF5 metadata and checksums' worth of slack
    if need > free:
        raise OSError(errno.ENOSPC, f"No space left on device: needs about {need / 2**20:.0f} MiB, "
                                    f"{free / 2**20:.0f} MiB free", str(directory))
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and largest_file_bytes * 1.05 + (1 << 16) > limit:
        raise OSError(errno.EFBIG, f"File too large: a file of about {largest_file_bytes / 2**20:.1f} MiB is over "
                                   f"this process's file-size limit ({limit / 2**20:.1f} MiB, ulimit -f)",
                      str(directory))
