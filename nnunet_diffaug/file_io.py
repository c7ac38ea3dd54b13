"""Safe file I/O: atomic writes, cleanup after killed writers, folder locks, and reading JSON with clear errors.

Every file we write goes through :func:`atomic_path` (a temporary sibling, then ``os.replace``), so a
reader never sees half a file and a full disk leaves the old file untouched. Temporary names record
their owner (pid, host), so cleaning up after a killed run never touches a writer that still runs.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

from nnunet_diffaug.errors import DiffAugError

LOCK_FILE = ".diffaug.lock"
_TMP_PREFIX = ".partial-"
_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TMP_NAME = re.compile(r"^\.partial-(\d+)-([0-9a-f]{8})-")
_FOREIGN_TMP_MAX_AGE_S = 24 * 3600


def temporary_name(name: str) -> str:
    """A hidden name that records which process (pid, host) owns the temporary, so that cleaning up
    after a killed run never touches the files of a writer that is still running (-num_parts)."""
    return f"{_TMP_PREFIX}{os.getpid()}-{_HOST_TAG}-{name}"


def _temporary_sibling(path: Path) -> Path:
    # keep the full file name as suffix so writers that choose the format by extension still work
    return path.with_name(temporary_name(path.name))


def _owner_is_gone(path: Path) -> bool:
    m = _TMP_NAME.match(path.name)
    if m is None or m.group(2) != _HOST_TAG:
        # another host's (or an unknown) temporary: only when it is clearly abandoned
        try:
            return time.time() - path.stat().st_mtime > _FOREIGN_TMP_MAX_AGE_S
        except FileNotFoundError:
            return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary sibling of ``path``; on success it replaces ``path`` in one step.

    On failure (including a full disk) the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise DiffAugError(f"No space left on device while writing {path}; nothing was changed there.") from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_image(image, path: str | os.PathLike) -> None:
    """Writes a SimpleITK image atomically (the temporary name keeps the extension)."""
    import SimpleITK as sitk  # heavy: only writers of images pay for it
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Deletes leftovers of interrupted writes below ``folder`` whose writer is gone. Returns how many."""
    n = 0
    for p in sorted(Path(folder).rglob(f"{_TMP_PREFIX}*")):
        if p.exists() and _owner_is_gone(p):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            n += 1
    return n


def is_lock_file(path: Path) -> bool:
    """Whether ``path`` is one of our lock files (``.diffaug*.lock``), which outlive the runs that held them."""
    return path.name.startswith(".diffaug") and path.name.endswith(".lock")


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, timeout_s: float = 600.0, name: str = LOCK_FILE,
                holder: str = "another process") -> Iterator[None]:
    """An exclusive advisory lock on ``folder``. A second holder waits up to ``timeout_s``, then refuses.
    The lock dies with its process (flock), so a lock file left by a killed run blocks nothing."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / name
    with open(lock_path, "a+") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise DiffAugError(f"{folder} is locked by {holder} (lock file {lock_path}); waited "
                                       f"{timeout_s:.0f} s. Wait for it to finish, then run again.") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def read_json(path: str | os.PathLike, if_missing: str = ""):
    """Parses a JSON file; a missing or malformed file is a DiffAugError naming it (``if_missing`` says why
    the file matters or what to run)."""
    path = Path(path)
    if not path.is_file():
        raise DiffAugError(f"{path} does not exist{': ' + if_missing if if_missing else '.'}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DiffAugError(f"{path} is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise DiffAugError(f"{path} is not a text (JSON) file.") from None


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
