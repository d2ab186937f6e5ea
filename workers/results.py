"""What iexec-worker does after an app ran: logs files, computed.json, result digest, zip.

No Docker here: everything works on the host folder that was mounted at ``/iexec_out``
(``output_dir``), so it is unit-testable with plain files.

The digest rules are iexec's to the byte (iexec-common ``ResultUtils`` /
``FileHashUtils``): every worker of a task must find the same digest for consensus,
and apps are written against the official worker. What differs is safety: the app
controls the content of ``/iexec_out`` (symlinks included) and we run as a privileged
host process, so nothing here follows a link out of ``output_dir``, blocks on a FIFO,
or writes through a link the app planted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import posixpath
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_utils import keccak

from poco.results import callback_bytes as poco_callback_bytes

log = logging.getLogger(__name__)

IEXEC_OUT = "/iexec_out"
COMPUTED_JSON = "computed.json"
STDOUT_FILE = "stdout.txt"
STDERR_FILE = "stderr.txt"
ERROR_FILE = "error.txt"  # iexec-worker ResultService.ERROR_FILENAME
# iexec-worker PostComputeService.RESULT_FILE_NAME_MAX_LENGTH
RESULT_FILE_NAME_MAX_LENGTH = 31
MAX_COMPUTED_JSON_BYTES = 1024 * 1024
_CHUNK = 1024 * 1024
# a fixed entry date makes the zip a function of the files only
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class ResultError(Exception):
    """The app's output breaks the iExec contract (no computed.json, bad path, too big…):
    the replicate is COMPUTE_FAILED. Not retryable: the same output fails the same way."""

    retryable = False


class NameTooLongError(ResultError):
    """A result file name is longer than iexec allows (POST_COMPUTE_TOO_LONG_RESULT_FILE_NAME)."""


# --- computed.json ---------------------------------------------------------------


@dataclass(frozen=True)
class ComputedFile:
    """``computed.json`` (iexec-common ``ComputedFile``); unknown keys are ignored."""

    deterministic_output_path: str | None = None
    callback_data: str | None = None
    task_id: str | None = None
    result_digest: str | None = None
    enclave_signature: str | None = None
    error_message: str | None = None

    _KEYS = {
        "deterministic-output-path": "deterministic_output_path",
        "callback-data": "callback_data",
        "task-id": "task_id",
        "result-digest": "result_digest",
        "enclave-signature": "enclave_signature",
        "error-message": "error_message",
    }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComputedFile:
        """Build from the parsed JSON; a known key holding a non-string is a :class:`ResultError`
        (stricter than Jackson, which would coerce a number: no real app relies on that)."""
        values: dict[str, str | None] = {}
        for key, attr in cls._KEYS.items():
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise ResultError(
                    f"computed.json: {key!r} must be a string, got {type(value).__name__}"
                )
            values[attr] = value
        return cls(**values)

    def to_dict(self) -> dict[str, str]:
        """The set fields under their JSON keys."""
        return {
            key: getattr(self, attr)
            for key, attr in self._KEYS.items()
            if getattr(self, attr) is not None
        }


def _inside(root: Path, path: Path) -> bool:
    return path == root or root in path.parents


def _resolve_inside(output_dir: Path, relative: str, shown: str) -> Path:
    """``output_dir/relative`` with symlinks resolved, refused unless it stays in ``output_dir``.

    ``shown`` is the path as the app wrote it, for the error messages.
    """
    root = Path(output_dir).resolve(strict=True)
    candidate = root / relative if relative else root
    if not os.path.lexists(candidate):
        raise ResultError(f"{shown} does not exist in the app output")
    try:
        resolved = candidate.resolve(strict=True)
    except FileNotFoundError as exc:
        raise ResultError(f"{shown} is a broken symlink in the app output") from exc
    except (OSError, RuntimeError) as exc:  # symlink loop
        raise ResultError(f"{shown} cannot be resolved: {exc}") from exc
    if not _inside(root, resolved):
        raise ResultError(f"{shown} escapes {IEXEC_OUT} (it resolves outside the app output)")
    return resolved


def _open_regular(path: Path, shown: str) -> int:
    """An fd on a regular file; never blocks on a FIFO the app left in place of a file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ResultError(f"{shown} is a symlink") from exc
        raise ResultError(f"{shown} cannot be opened: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ResultError(f"{shown} is not a regular file")
    return fd


def read_computed(output_dir: Path) -> ComputedFile:
    """Read ``/iexec_out/computed.json``, which every standard app must write.

    Missing, unreadable, too big, not a JSON object → :class:`ResultError` (iexec-worker
    ends in COMPUTE / CONTRIBUTE failure too, only later). A symlink is followed only to a
    file inside the output.
    """
    shown = f"{IEXEC_OUT}/{COMPUTED_JSON}"
    if not os.path.lexists(Path(output_dir) / COMPUTED_JSON):
        raise ResultError(f"the app wrote no {shown} (every iExec app must write one)")
    path = _resolve_inside(output_dir, COMPUTED_JSON, shown)
    fd = _open_regular(path, shown)
    with os.fdopen(fd, "rb") as handle:
        raw = handle.read(MAX_COMPUTED_JSON_BYTES + 1)
    if len(raw) > MAX_COMPUTED_JSON_BYTES:
        raise ResultError(f"{shown} is larger than {MAX_COMPUTED_JSON_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ResultError(f"{shown} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ResultError(f"{shown} must hold a JSON object, got {type(data).__name__}")
    return ComputedFile.from_dict(data)


# --- error result ----------------------------------------------------------------------

# iexec-worker v9.2 ResultService.writeErrorToIexecOut: the computed.json of an error result,
# as Jackson writes iexec-common's ComputedFile (every field, null when unset, no spaces)
ERROR_COMPUTED_JSON = (
    '{"deterministic-output-path":"/iexec_out/error.txt","callback-data":null,'
    '"task-id":null,"result-digest":null,"enclave-signature":null,"error-message":null}'
)


def error_text(status: str, causes: list[str]) -> str:
    """``error.txt`` of an error result, byte for byte as iexec-worker v9.2 writes it:
    ``String.format("[IEXEC] Errors occurred while computing the task [error:%s, causes:%s]",
    status, causes)`` where each cause prints as the Java record ``WorkflowError[cause=<cause>,
    message=]`` (the message is always empty on this path), no trailing newline. Workers of
    one task with the same failure write the same bytes, so they agree on the digest."""
    listed = ", ".join(f"WorkflowError[cause={cause}, message=]" for cause in causes)
    return f"[IEXEC] Errors occurred while computing the task [error:{status}, causes:[{listed}]]"


def write_error_result(output_dir: Path, status: str, causes: list[str]) -> Path:
    """Write an error result into the empty folder ``output_dir`` (created): ``error.txt``
    (:func:`error_text`) and ``computed.json`` naming it as the deterministic output. Returns
    the path of ``error.txt``, whose sha256 is the result digest of a task without callback."""
    if not causes:
        raise ValueError("an error result needs at least one cause")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=False)
    error = output_dir / ERROR_FILE
    error.write_bytes(error_text(status, causes).encode("utf-8"))
    (output_dir / COMPUTED_JSON).write_bytes(ERROR_COMPUTED_JSON.encode("utf-8"))
    return error


def error_result_digest(output_dir: Path, has_callback: bool) -> str:
    """The digest of an error result written by :func:`write_error_result`: sha256 of
    ``error.txt``; for a callback deal keccak256 of no bytes, the digest of an empty
    ``resultsCallback`` (iexec-worker crashes there instead: upstream bug)."""
    if has_callback:
        return "0x" + keccak(b"").hex()
    return sha256_file(Path(output_dir) / ERROR_FILE)


# --- logs ----------------------------------------------------------------------


def _write_new_file(path: Path, content: str) -> None:
    """Write ``content`` to ``path`` without following a symlink the app may have put there."""
    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            raise ResultError(f"cannot write {IEXEC_OUT}/{path.name}: the app made it a directory")
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as handle:
        handle.write(content)


def write_logs(output_dir: Path, stdout: str, stderr: str) -> list[Path]:
    """Write the app's logs to ``stdout.txt`` / ``stderr.txt`` in ``/iexec_out``, each only
    if non-empty (iexec-worker ``ComputeManagerService.writeLogs``); return what was written.

    iexec-worker does this only after a *successful* app run, and before the digest and the
    zip, so with a directory as deterministic output the logs are part of the digest:
    call it in that same place. A file of the same name the app left is replaced.
    """
    written: list[Path] = []
    for name, content in ((STDOUT_FILE, stdout), (STDERR_FILE, stderr)):
        if content:
            path = Path(output_dir) / name
            _write_new_file(path, content)
            written.append(path)
    return written


# --- digest ----------------------------------------------------------------------


def _sha256_fd(fd: int) -> bytes:
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.digest()


def sha256_file(path: Path) -> str:
    """``0x`` + sha256 of a regular file (``FileHashUtils.sha256(File)``)."""
    return "0x" + _sha256_fd(_open_regular(Path(path), str(path))).hex()


def _java_sort_key(name: str) -> bytes:
    """Java ``File.compareTo`` order on Unix: compare UTF-16 code units, case-sensitive."""
    return name.encode("utf-16-be", errors="surrogatepass")


def file_tree_sha256(directory: Path, root: Path | None = None) -> str:
    """``FileHashUtils.getFileTreeSha256`` of a directory: keccak256 of the concatenated raw
    32-byte sha256 of its direct children, sorted by name.

    As in iexec, a sub-directory (or anything that is not a regular file) adds nothing and
    is not recursed into, and hidden files count. A symlinked child is hashed as its
    target when that stays under ``root`` (default: ``directory``) and refused otherwise,
    where iexec would read any file of the worker's host.
    """
    directory = Path(directory)
    root = Path(root or directory).resolve()
    hashes: list[bytes] = []
    entries = sorted(os.scandir(directory), key=lambda entry: _java_sort_key(entry.name))
    for entry in entries:
        target = Path(entry.path)
        shown = f"{IEXEC_OUT}/{target.relative_to(root)}" if _inside(root, target) else entry.name
        if entry.is_symlink():
            try:
                target = target.resolve(strict=True)
            except (OSError, RuntimeError):
                continue  # broken link: Java's read fails, the child adds nothing
            if not _inside(root, target):
                raise ResultError(f"{shown} escapes {IEXEC_OUT} (symlink to {target})")
        if not stat.S_ISREG(os.stat(target).st_mode):
            continue
        hashes.append(_sha256_fd(_open_regular(target, shown)))
    return "0x" + keccak(b"".join(hashes)).hex()


def resolve_output_path(output_dir: Path, container_path: str | None) -> Path:
    """Map an in-container path (``/iexec_out/...``) onto ``output_dir``, safely.

    iexec-worker just concatenates strings; here the path must be absolute and under
    ``/iexec_out`` once normalised, and must not leave ``output_dir`` through ``..`` or a
    symlink: otherwise :class:`ResultError` ("… escapes /iexec_out").
    """
    if not container_path:
        raise ResultError("computed.json has no deterministic-output-path (or it is empty)")
    if "\x00" in container_path:
        raise ResultError("deterministic-output-path contains a NUL character")
    if not container_path.startswith("/"):
        raise ResultError(
            f"deterministic-output-path {container_path!r} must be an absolute path "
            f"under {IEXEC_OUT}"
        )
    normal = posixpath.normpath(container_path)
    if normal != IEXEC_OUT and not normal.startswith(IEXEC_OUT + "/"):
        if container_path == IEXEC_OUT or container_path.startswith(IEXEC_OUT + "/"):
            raise ResultError(f"deterministic-output-path {container_path!r} escapes {IEXEC_OUT}")
        raise ResultError(f"deterministic-output-path {container_path!r} is not under {IEXEC_OUT}")
    relative = normal[len(IEXEC_OUT) :].lstrip("/")
    return _resolve_inside(output_dir, relative, f"deterministic-output-path {container_path!r}")


def web2_digest(output_dir: Path, computed: ComputedFile) -> str:
    """Digest of a task without callback: sha256 of the deterministic file, or the file-tree
    hash of the deterministic directory (``ResultUtils.computeWeb2ResultDigest``)."""
    path = resolve_output_path(output_dir, computed.deterministic_output_path)
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return sha256_file(path)
    if stat.S_ISDIR(mode):
        return file_tree_sha256(path, root=Path(output_dir))
    raise ResultError(
        f"deterministic-output-path {computed.deterministic_output_path!r} is neither a "
        "file nor a directory"
    )


def callback_bytes(callback_data: str | None) -> bytes:
    """The bytes of ``callback-data`` (:func:`poco.results.callback_bytes`: web3j's reading,
    optional ``0x``, an odd length reads the first digit alone). These exact bytes are the
    ``resultsCallback`` of ``finalize``; PoCo checks their keccak256 against the digest."""
    if callback_data is None:
        raise ResultError("callback deal, but computed.json has no callback-data")
    if callback_data in ("", "0x"):
        raise ResultError("callback deal, but computed.json has an empty callback-data")
    try:
        return poco_callback_bytes(callback_data)
    except ValueError as exc:
        raise ResultError(str(exc)) from exc


def web3_digest(computed: ComputedFile) -> str:
    """Digest of a callback task: keccak256 of the callback-data bytes
    (``ResultUtils.computeWeb3ResultDigest``)."""
    return "0x" + keccak(callback_bytes(computed.callback_data)).hex()


def result_digest(output_dir: Path, computed: ComputedFile, has_callback: bool) -> str:
    """The value the worker contributes and reveals (``ResultService.computeResultDigest``).

    Call it after :func:`write_logs`: a directory digest includes ``stdout.txt`` /
    ``stderr.txt`` and ``computed.json``, as in iexec. A ``result-digest`` the app wrote
    into computed.json is ignored (iexec-worker would take it as is: that shortcut is for
    TEE post-compute, which standard apps must not get).
    """
    if has_callback:
        return web3_digest(computed)
    return web2_digest(output_dir, computed)


# --- zip -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    name: str
    path: Path
    size: int
    symlink: bool


def _utf16_len(name: str) -> int:
    return len(name.encode("utf-16-le", errors="surrogatepass")) // 2


def _walk(root: Path, directory: Path, prefix: str) -> Iterator[_Entry]:
    """Files under ``directory`` as zip entries, sorted, without following any symlink."""
    for entry in sorted(os.scandir(directory), key=lambda item: item.name):
        name = f"{prefix}{entry.name}"
        info = entry.stat(follow_symlinks=False)
        if stat.S_ISLNK(info.st_mode):
            yield _Entry(name, Path(entry.path), 0, True)
        elif stat.S_ISDIR(info.st_mode):
            yield from _walk(root, Path(entry.path), name + "/")
        elif stat.S_ISREG(info.st_mode):
            yield _Entry(name, Path(entry.path), info.st_size, False)
        else:
            log.warning("result zip: skipping %s/%s: not a regular file", IEXEC_OUT, name)


def package(
    output_dir: Path,
    zip_path: Path,
    *,
    max_bytes: int,
    max_name_length: int | None = RESULT_FILE_NAME_MAX_LENGTH,
) -> Path:
    """Zip ``/iexec_out`` into ``zip_path`` as iexec-worker does (``FileHelper.zipFolder``):
    entries are the files, named by their path relative to ``/iexec_out``, without directory
    entries; ``computed.json`` and the log files are included.

    Safe where iexec is not: a symlink is never followed, it gets an empty entry (iexec
    writes an empty entry too, but follows links to directories); FIFOs, sockets and
    devices are skipped; entry names are relative and never contain ``..``; the total
    uncompressed size must not exceed ``max_bytes``, else :class:`ResultError`.
    As iexec (``POST_COMPUTE_TOO_LONG_RESULT_FILE_NAME``) a file name longer than
    ``max_name_length`` (31) characters is refused; ``None`` turns that check off.
    Entries are sorted and dated 1980-01-01, so the same files give the same zip bytes.
    ``zip_path`` must be outside ``output_dir``; it is written atomically.
    """
    output_dir = Path(output_dir)
    zip_path = Path(zip_path)
    if not output_dir.is_dir():
        raise ResultError(f"no app output folder at {output_dir}")
    root = output_dir.resolve()
    if _inside(root, zip_path.parent.resolve()):
        raise ValueError(f"the result zip {zip_path} must not be inside {output_dir}")

    try:
        entries = list(_walk(root, root, ""))
    except (OSError, RecursionError) as exc:  # a tree deeper than the paths the system takes
        why = exc.strerror if isinstance(exc, OSError) else "too many levels"
        raise ResultError(f"{IEXEC_OUT} cannot be zipped: {why}") from exc
    total = 0
    for entry in entries:
        base = entry.name.rsplit("/", 1)[-1]
        if max_name_length is not None and _utf16_len(base) > max_name_length:
            raise NameTooLongError(
                f"result file name {entry.name!r} is longer than {max_name_length} characters"
            )
        if entry.name.startswith("/") or ".." in entry.name.split("/"):
            raise ResultError(f"unsafe result entry name {entry.name!r}")
        total += entry.size
    if total > max_bytes:
        raise ResultError(f"result is {total} bytes, over the limit of {max_bytes} bytes")
    skipped = [entry.name for entry in entries if entry.symlink]
    if skipped:
        log.warning("result zip: symlinks stored as empty entries: %s", ", ".join(skipped))

    part = zip_path.with_name(zip_path.name + ".part")
    try:
        with zipfile.ZipFile(part, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for entry in entries:
                info = zipfile.ZipInfo(entry.name, date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                if entry.symlink:
                    archive.writestr(info, b"")
                    continue
                _copy_into(archive, info, entry)
        os.replace(part, zip_path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    log.info("result zip %s: %d entries, %d bytes of files", zip_path, len(entries), total)
    return zip_path


def _copy_into(archive: zipfile.ZipFile, info: zipfile.ZipInfo, entry: _Entry) -> None:
    """Copy one file into the archive, reading at most the size seen during the scan."""
    fd = _open_regular(entry.path, f"{IEXEC_OUT}/{entry.name}")
    with os.fdopen(fd, "rb") as source, archive.open(info, "w", force_zip64=True) as target:
        left = entry.size
        while left > 0:
            chunk = source.read(min(_CHUNK, left))
            if not chunk:
                break
            target.write(chunk)
            left -= len(chunk)
        if source.read(1):
            raise ResultError(f"{IEXEC_OUT}/{entry.name} grew while being zipped")
