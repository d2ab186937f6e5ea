#!/usr/bin/env python3
"""Prepare the host folders of a docker-compose workerpool (installed in the image as
``workerpool-prepare``; the one-shot ``prepare`` service runs it as root before the workers).

A worker node runs each app as a sibling container through the host's Docker socket, so the
folders it hands to an app (``<IEXEC_WORKER_BASE_DIR>/<worker>/<task>/iexec_in|iexec_out``) are
*host* paths, created by the worker's non-root user (uid 10001). Apps usually run as root, but
with every capability dropped (see workers/runner.py), so root in the app cannot write into a
folder owned by uid 10001 with mode 0755. This script gives the base folder:

* owner uid:gid 10001, mode 0700: only the worker (and root) can enter it on the host;
* a *default* POSIX ACL ``user::rwx,group::rwx,other::rwx``: every folder and file created
  below it, by the worker or by an app, is open to both (the ACL overrides their umask), so
  apps can write ``/iexec_out`` and the worker can read and delete whatever an app wrote.

The ACL is written as the raw ``system.posix_acl_default`` extended attribute (no ``setfacl``
needed in the image). The host file system must support POSIX ACLs (ext4, xfs and btrfs do);
where it does not, the script says so and fails, and docs/deploy.md gives the alternative.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

WORKERPOOL_UID = 10001
WORKERPOOL_GID = 10001
RESULTS_DIR = Path("/var/lib/workerpool/results")

# Linux POSIX ACL xattr format (include/uapi/linux/posix_acl_xattr.h): a version header, then
# (tag, perm, id) entries; the *_OBJ and OTHER entries carry the undefined id.
ACL_XATTR_VERSION = 0x0002
ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_OTHER = 0x01, 0x04, 0x20
ACL_UNDEFINED_ID = 0xFFFFFFFF
RWX = 0o7


def open_default_acl() -> bytes:
    """``default:user::rwx,group::rwx,other::rwx`` as the kernel's xattr value."""
    entries = b"".join(
        struct.pack("<HHI", tag, RWX, ACL_UNDEFINED_ID)
        for tag in (ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_OTHER)
    )
    return struct.pack("<I", ACL_XATTR_VERSION) + entries


def prepare_work_dir(path: Path, uid: int = WORKERPOOL_UID, gid: int = WORKERPOOL_GID) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    path.chmod(0o700)
    os.setxattr(path, "system.posix_acl_default", open_default_acl())


def prepare_owned_dir(path: Path, uid: int = WORKERPOOL_UID, gid: int = WORKERPOOL_GID) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    path.chmod(0o750)


def main() -> int:
    base = os.environ.get("IEXEC_WORKER_BASE_DIR", "")
    if not base.startswith("/"):
        print(f"workerpool-prepare: IEXEC_WORKER_BASE_DIR must be an absolute path, not {base!r}")
        return 2
    try:
        prepare_work_dir(Path(base))
    except OSError as exc:
        print(
            f"workerpool-prepare: cannot set a default ACL on {base} ({exc}). The host file "
            "system needs POSIX ACLs; see docs/deploy.md, 'The worker's work directory'."
        )
        return 1
    prepare_owned_dir(RESULTS_DIR)
    print(f"workerpool-prepare: {base} (uid {WORKERPOOL_UID}, 0700, default ACL rwx) ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
