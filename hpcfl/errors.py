"""Errors a user must fix (bad config, bad data, the environment): reported as one clear message with exit code 2."""

from __future__ import annotations

import errno
import os
import sys


class UsageError(Exception):
    """Bad input: the message names the key, file or value; no traceback is shown."""


def describe_os_error(e: OSError) -> str:
    """One line for an environment error: what, where, and what to do."""
    what = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{what}: the disk is full (or a quota is reached): free space, then run the same command again " \
               "(finished work is kept)"
    if e.errno == errno.EFBIG:
        return f"{what}: raise the limit (ulimit -f) or write elsewhere, then run the same command again"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{what}: cannot write there: choose another place or fix its permissions"
    return what


def exit_now(code: int) -> None:
    """End this process at once, after flushing its output: after a failed write, the HDF5 library can be left in
    a state that crashes its own clean-up at interpreter exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
