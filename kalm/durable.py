"""File operations that survive kills, crashes and concurrent writers: the run store's footing.

A run directory is written by long jobs that may be killed at any moment and, by accident, by two
processes at once. Its files must therefore never be seen half-written, never be trusted without
a check, and never be written by two processes at the same time. This module supplies the pieces:

* :func:`atomic_writer` (and :func:`atomic_write_bytes`, :func:`atomic_write_text`,
  :func:`atomic_write_json`, :func:`atomic_torch_save`): write to a temporary file with a name
  unique to the process, flush it to disk, then rename it over the target; on error nothing is
  left behind and the old file stays.
* :func:`lock_directory`: one writer per directory (``fcntl.flock``, released by the kernel when
  the holder dies, so a killed process never leaves a stale lock).
* :func:`write_manifest` / :func:`verify_manifest`: a record of every file with its size and
  sha256, written last and sealed whole (a digest of all its fields), so a directory counts as
  complete only if its files are the ones written and its record is the one written.
* :func:`append_jsonl` / :func:`read_jsonl`: an append-only log whose torn last line (a kill
  during the write) is dropped, while damage anywhere else is an error.

Every failure to read or verify raises :class:`RunStoreError`, which names the directory, the
file and what to do next.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import gzip
import hashlib
import json
import os
import secrets
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal

__all__ = [
    "LOCK_NAME",
    "PARTIAL_PATTERN",
    "SEAL",
    "LockTimeout",
    "RunStoreError",
    "StoreWarning",
    "append_jsonl",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_jsonl",
    "atomic_write_text",
    "atomic_writer",
    "lock_directory",
    "read_json",
    "read_jsonl",
    "sha256_file",
    "verify_manifest",
    "write_manifest",
]

LOCK_NAME = ".lock"
SEAL = "seal"
"""The field of a manifest holding the sha256 of all its other fields."""
# Temporary files of atomic writes: ``.<name>.<pid>.<random>.part`` next to the target.
PARTIAL_PATTERN = ".*.part"
_CHUNK = 1 << 20
_DEFAULT_REMEDY = "Delete it so that it is computed again."


class RunStoreError(RuntimeError):
    """A file of a run directory is missing, unreadable or not the one that was written.

    One type for every such failure, so callers can catch it around any read of the store; the
    message names the directory, the file, the problem and what happens next (``remedy``).
    """

    def __init__(self, directory: Path, file: Path | None, problem: str, remedy: str) -> None:
        self.directory = Path(directory)
        self.file = None if file is None else Path(file)
        self.problem = problem
        self.remedy = remedy
        if self.file is None:
            where = f"{self.directory}"
        elif self.file.is_relative_to(self.directory):
            where = f"{self.directory}: file {self.file.relative_to(self.directory)}"
        else:
            where = f"{self.directory}: file {self.file}"
        super().__init__(f"{where} {problem}. {remedy}")


class LockTimeout(RunStoreError):
    """Another process held a directory lock for longer than the caller would wait."""


class StoreWarning(UserWarning):
    """Something in the store was recovered from (a torn log line, a wait for a lock)."""


def sha256_file(path: Path, *, decompress: bool = False) -> str:
    """Hex sha256 of a file's bytes (of its gunzipped content with ``decompress=True``)."""
    digest = hashlib.sha256()
    opener = gzip.open if decompress else open
    with opener(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- atomic writes ------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_writer(path: Path, mode: Literal["w", "wb"] = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on a clean exit make it ``path`` atomically.

    The temporary name holds the process id and random bits, so concurrent writers of one
    target never share (and tear) a temporary file; the last rename wins with a whole file.
    Contents are fsynced before the rename and the directory after it, so a crash leaves either
    the old or the new file. On any error the temporary file is removed and ``path`` is
    untouched. Files get the usual permissions (0666 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode, encoding="utf-8" if "b" not in mode else None) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable; some file systems refuse, which costs nothing."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, "wb") as out:
        out.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8) atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, "w") as out:
        out.write(text)


def atomic_write_json(path: Path, value: Any) -> None:
    """Replace ``path`` by ``value`` as indented, key-sorted JSON, atomically."""
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(value: Any, path: Path) -> None:
    """``torch.save(value, path)`` atomically: a kill mid-save leaves the previous file whole.

    torch is imported here, not at module level, because the data code uses this module too and
    should not pay for importing torch.
    """
    import torch

    with atomic_writer(path, "wb") as out:
        torch.save(value, out)


# --- reading ------------------------------------------------------------------------------------


def read_json(path: Path, *, directory: Path | None = None, remedy: str = _DEFAULT_REMEDY) -> Any:
    """The JSON value in ``path``; a missing, unreadable or invalid file raises RunStoreError.

    ``directory`` is the run directory named in the error (default: the file's parent).
    """
    directory = path.parent if directory is None else directory
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunStoreError(directory, path, "is missing", remedy) from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise RunStoreError(directory, path, f"is not valid JSON ({err})", remedy) from err


def atomic_write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Replace the JSONL log ``path`` by ``records``, one line each, in the format of
    :func:`append_jsonl` (atomically: a kill leaves the old log)."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one line to a JSONL log, in a single write, then fsync.

    One ``write`` of the whole line on an ``O_APPEND`` descriptor means a kill can tear only the
    last line, which :func:`read_jsonl` then drops.
    """
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(
    path: Path,
    *,
    repair: bool = False,
    directory: Path | None = None,
    remedy: str = _DEFAULT_REMEDY,
) -> list[dict[str, Any]]:
    """The records (JSON objects, one per line) of a JSONL log; ``[]`` if there is no file.

    An unterminated last line that is not valid JSON is what a kill during
    :func:`append_jsonl` leaves: it is dropped with a :class:`StoreWarning`, and with
    ``repair=True`` cut from the file so that later appends start on a fresh line. Any other
    unreadable line is corruption and raises RunStoreError naming the file and the line.
    """
    directory = path.parent if directory is None else directory
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    records = [
        _parse_line(raw, path, number, directory, remedy) for number, raw in enumerate(lines, 1)
    ]
    if tail:
        try:
            records.append(_parse_line(tail, path, len(lines) + 1, directory, remedy))
        except RunStoreError:
            warnings.warn(
                f"{path}: dropped a torn last line ({len(tail)} bytes, line {len(lines) + 1}), "
                "left by a process killed while writing it",
                StoreWarning,
                stacklevel=2,
            )
            if repair:
                os.truncate(path, len(data) - len(tail))
        else:
            if repair:  # a whole record that only lacks its newline
                with path.open("ab") as out:
                    out.write(b"\n")
    return records


def _parse_line(
    raw: bytes, path: Path, number: int, directory: Path, remedy: str
) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:
        raise RunStoreError(
            directory, path, f"line {number} is not valid JSON ({err})", remedy
        ) from err
    if not isinstance(record, dict):
        raise RunStoreError(directory, path, f"line {number} is not a JSON object", remedy)
    return record


# --- one writer per directory -------------------------------------------------------------------


@contextlib.contextmanager
def lock_directory(
    directory: Path, *, timeout: float = 3600.0, poll: float = 0.2, purpose: str = "write"
) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` for the ``with`` block (created if missing).

    A second process asking for the same lock waits (one :class:`StoreWarning` says for whom)
    and raises :class:`LockTimeout` after ``timeout`` seconds. The lock is ``fcntl.flock`` on
    ``directory/.lock``, which also holds the holder's pid for messages; the kernel releases it
    when the holder exits or is killed, so there are no stale locks to clean up. Not re-entrant:
    a process that takes the lock twice waits for itself.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock_path = directory / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _acquire(fd, directory, lock_path, timeout, poll, purpose)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(
    fd: int, directory: Path, lock_path: Path, timeout: float, poll: float, purpose: str
) -> None:
    deadline = time.monotonic() + timeout
    warned = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = _holder(lock_path)
            if time.monotonic() >= deadline:
                raise LockTimeout(
                    directory,
                    None,
                    f"is locked by {holder}; gave up after waiting {timeout:g} s to {purpose}",
                    "Wait for that process to finish (or stop it), then run again; the lock "
                    "disappears when its holder exits.",
                ) from None
            if not warned:
                warnings.warn(
                    f"{directory} is locked by {holder}; waiting up to {timeout:g} s to {purpose}",
                    StoreWarning,
                    stacklevel=4,
                )
                warned = True
            time.sleep(poll)


def _holder(lock_path: Path) -> str:
    """ "process <pid>" of the lock's holder as written in the lock file, if it got that far."""
    with contextlib.suppress(OSError, ValueError):
        return f"process {int(lock_path.read_text().strip())}"
    return "another process"


# --- manifests ----------------------------------------------------------------------------------


def _listed(directory: Path, manifest: str, ignore: Sequence[str]) -> list[Path]:
    """Files under ``directory`` that a manifest covers, in a stable order."""
    skip = (manifest, LOCK_NAME, PARTIAL_PATTERN, *ignore)
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file()
        and not any(
            fnmatch.fnmatch(p.relative_to(directory).as_posix(), pattern)
            or fnmatch.fnmatch(p.name, pattern)
            for pattern in skip
        )
    )


def _seal(record: Mapping[str, Any]) -> str:
    """The sha256 of every field of a manifest but its seal (key-sorted JSON)."""
    fields = {k: v for k, v in record.items() if k != SEAL}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def write_manifest(
    directory: Path,
    name: str,
    extra: Mapping[str, Any] | None = None,
    *,
    ignore: Sequence[str] = (),
) -> dict[str, Any]:
    """Record every file under ``directory`` with its size and sha256 in ``directory/name``.

    Write it last: it is the proof that the files it lists are complete and the ones written.
    ``extra`` adds fields (e.g. steps, seconds); ``ignore`` holds glob patterns (matched against
    the relative path or the file name) of files that may change later, such as caches. The
    lock file and temporary files of atomic writes are never listed. The record carries a
    :data:`SEAL` over all its fields, so an edit of any of them (``extra`` too) is detected.
    A directory without files gets no manifest (ValueError): a manifest listing nothing would
    vouch for whatever is put there later. Returns what was written.
    """
    files = {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in _listed(directory, name, ignore)
    }
    if not files:
        raise ValueError(f"{directory} holds no files to record in {name}")
    record = {**(extra or {}), "files": files}
    record[SEAL] = _seal(record)
    atomic_write_json(directory / name, record)
    return record


def verify_manifest(directory: Path, name: str, *, remedy: str = _DEFAULT_REMEDY) -> dict[str, Any]:
    """The manifest ``directory/name`` if its seal matches and every file it lists has its
    recorded size and sha256.

    Raises RunStoreError naming the manifest (unreadable, listing no files, or edited after it
    was written: its :data:`SEAL` does not match its fields) or the first file that is missing,
    has another size or other bytes (a truncated, replaced or bit-flipped file); ``remedy`` says
    what to do. Files not in the manifest are not checked.
    """
    path = directory / name
    record = read_json(path, directory=directory, remedy=remedy)
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and {"size", "sha256"} <= set(v) for v in files.values()
    ):
        raise RunStoreError(directory, path, "is not a manifest (no valid `files` list)", remedy)
    if not files:
        raise RunStoreError(directory, path, "lists no files, so it vouches for none", remedy)
    if record.get(SEAL) != _seal(record):
        raise RunStoreError(
            directory,
            path,
            f"does not match its `{SEAL}` (edited or damaged after it was written)",
            remedy,
        )
    for relative, expected in files.items():
        file = directory / relative
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise RunStoreError(directory, file, f"is missing (listed in {name})", remedy) from None
        if size != expected["size"]:
            raise RunStoreError(
                directory,
                file,
                f"has {size:,} bytes, {name} recorded {expected['size']:,} (truncated or replaced)",
                remedy,
            )
        if sha256_file(file) != expected["sha256"]:
            raise RunStoreError(
                directory, file, f"differs from its sha256 in {name} (changed or damaged)", remedy
            )
    return record
