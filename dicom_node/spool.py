"""Durable spool of received instances: one file per SOP instance, written atomically.

Layout: ``<spool_dir>/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` (names sanitised). A file is
written to a temporary name in the same directory, flushed and ``fsync``-ed, renamed into
place, and the directory is ``fsync``-ed, so after a crash a spool file is either complete or
absent. The first copy of an instance wins: writing an instance whose file already exists
keeps the existing file (the peer's retry of an acknowledged instance changes nothing).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_MAX_NAME = 64


def safe_name(uid: str) -> str:
    """A file-system-safe name for a UID.

    A valid DICOM UID (digits and dots, at most 64 characters) is used as it is; anything else
    (an empty value, path separators, ``..``, odd characters) becomes ``x`` + a SHA-256 prefix
    of the value, so a malicious or broken header can never escape the spool directory.
    """
    if not isinstance(uid, str):
        raise TypeError('Argument "uid" must be a str.')
    uid = uid.strip().rstrip("\x00")
    if _UID_RE.match(uid) and len(uid) <= _MAX_NAME:
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def spool_path(spool_dir: Path, study_instance_uid: str, sop_instance_uid: str) -> Path:
    """Where an instance lives in the spool (the file may not exist yet)."""
    return Path(spool_dir) / safe_name(study_instance_uid) / f"{safe_name(sop_instance_uid)}.dcm"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | memoryview, *, replace: bool = False,
                 root: Path | None = None) -> bool:
    """Write ``data`` to ``path`` atomically and durably.

    Parameters
    ----------
    path
        Final location; its parent directories are created (and made durable) when missing.
    data
        The complete file content.
    replace
        When ``False`` (the default) an existing file is kept and nothing is written; it is made durable
        first, since a concurrent writer may have linked it without having synced its directory yet.
    root
        A directory that must already exist (the spool): when it is missing, ``FileNotFoundError`` instead
        of creating it, so that an unmounted volume is not replaced by an empty directory on another disk.

    Returns
    -------
    bool
        ``True`` when the file was written, ``False`` when an existing file was kept.

    Raises
    ------
    OSError
        The disk is full, the directory is not writable, ...; no partial file is left behind.
    """
    path = Path(path)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError('Argument "data" must be bytes.')
    if root is not None and not Path(root).is_dir():
        raise FileNotFoundError(errno.ENOENT, "directory missing (is its volume mounted?)", str(root))
    if not replace and path.exists():
        _fsync_file(path)
        _fsync_dir(path.parent)
        return False
    parent = path.parent
    if not parent.is_dir():
        missing = [p for p in [parent, *parent.parents] if not p.exists()]
        parent.mkdir(parents=True, exist_ok=True)
        for directory in reversed(missing):
            _fsync_dir(directory.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                # link + unlink never overwrites: a concurrent writer of the same instance wins cleanly
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                tmp.unlink()
        _fsync_dir(parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def free_mb(directory: Path) -> float:
    """Free space, in MiB, on the volume holding ``directory`` (or its nearest existing parent)."""
    directory = Path(directory)
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return shutil.disk_usage(directory).free / (1024 * 1024)
