"""A filesystem of its own for an app's output: a tmpfs the worker mounts on the host folder
that becomes the app's ``/iexec_out``, sized to the output limit, so the limit is the
kernel's (the app meets ENOSPC) instead of a size the worker measures now and then.

Mounting needs root with CAP_SYS_ADMIN in the mount namespace of the Docker Engine (a worker
on the host, or in a container with the work directory bind-mounted ``rshared``). A worker
that cannot mount says so once and falls back to measuring the output while the app runs
(:class:`workers.runner.DockerRunner`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
from pathlib import Path

MS_NOSUID = 0x2
MS_NODEV = 0x4
MNT_DETACH = 0x2
# errors that mean "this node may not mount" (not root, no CAP_SYS_ADMIN, no tmpfs): the
# node then measures the output instead
NOT_PERMITTED = frozenset({errno.EPERM, errno.EACCES, errno.ENOSYS, errno.ENODEV})


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def inodes_for(size_bytes: int) -> int:
    """Files and folders a tmpfs of ``size_bytes`` may hold: one per KiB, at least 1024 (an
    app cannot exhaust the host's memory with empty files either)."""
    return max(1024, size_bytes // 1024)


def mount_tmpfs(target: Path, size_bytes: int) -> None:
    """Mount a tmpfs of ``size_bytes`` (and :func:`inodes_for` files) on the existing empty
    folder ``target``; OSError when the kernel refuses."""
    options = f"size={size_bytes},nr_inodes={inodes_for(size_bytes)},mode=0755"
    done = _libc().mount(
        b"tmpfs", os.fsencode(target), b"tmpfs", MS_NOSUID | MS_NODEV, options.encode()
    )
    if done != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(target))


def unmount(target: Path) -> bool:
    """Detach the filesystem mounted on ``target``; False when nothing was mounted there."""
    if not os.path.ismount(target):
        return False
    done = _libc().umount2(os.fsencode(target), MNT_DETACH)
    if done != 0:
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOENT):
            return False
        raise OSError(code, os.strerror(code), str(target))
    return True
