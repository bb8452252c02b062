"""kalm.durable: atomic writes, directory locks, manifests and JSONL logs under faults."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch

from kalm.durable import (
    LOCK_NAME,
    LockTimeout,
    RunStoreError,
    StoreWarning,
    append_jsonl,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_writer,
    lock_directory,
    read_json,
    read_jsonl,
    verify_manifest,
    write_manifest,
)

CTX = mp.get_context("fork")  # children inherit the imported module; no re-import per process


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- atomic writes ------------------------------------------------------------------------------


def test_atomic_writes_round_trip_and_leave_only_the_target(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "a" / "c.txt", "héllo")
    atomic_write_json(tmp_path / "a" / "d.json", {"b": 1, "a": [1.5]})
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "a" / "e.pt")
    folder = tmp_path / "a"
    assert names(folder) == ["b.bin", "c.txt", "d.json", "e.pt"]
    assert (folder / "b.bin").read_bytes() == b"\x00\x01"
    assert (folder / "c.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((folder / "d.json").read_text()) == {"a": [1.5], "b": 1}
    assert torch.equal(torch.load(folder / "e.pt", weights_only=True)["w"], torch.arange(3))


def test_files_get_the_usual_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("existed", [True, False])
def test_an_error_mid_write_keeps_the_old_file_and_leaves_nothing(
    tmp_path: Path, existed: bool
) -> None:
    target = tmp_path / "state.bin"
    if existed:
        target.write_bytes(b"old")
    with pytest.raises(KeyError), atomic_writer(target) as out:
        out.write(b"half of the new")
        raise KeyError("killed")
    assert names(tmp_path) == (["state.bin"] if existed else [])
    if existed:
        assert target.read_bytes() == b"old"


def test_a_failed_torch_save_keeps_the_old_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.pt"
    atomic_torch_save({"step": 1}, target)
    with pytest.raises(Exception, match="lambda"):
        atomic_torch_save({"step": 2, "bad": lambda: 0}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert names(tmp_path) == ["checkpoint.pt"]


def _hammer(target: str, fill: int, rounds: int) -> None:
    for _ in range(rounds):
        atomic_write_bytes(Path(target), bytes([fill]) * 65_536)


def test_concurrent_writers_of_one_file_never_tear_it(tmp_path: Path) -> None:
    """Writers with shared temporary names used to rename each other's files away."""
    target = tmp_path / "metrics.bin"
    atomic_write_bytes(target, bytes([0]) * 65_536)
    writers = [CTX.Process(target=_hammer, args=(str(target), i, 150)) for i in (1, 2)]
    for w in writers:
        w.start()
    seen = set()
    while any(w.is_alive() for w in writers):
        data = target.read_bytes()
        assert len(data) == 65_536 and len(set(data)) == 1, "a reader saw a torn file"
        seen.add(data[0])
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert names(tmp_path) == ["metrics.bin"]


# --- locks --------------------------------------------------------------------------------------


def _locked_writer(directory: str, name: str, log: str, entered: object, release: object) -> None:
    """Take the lock, log "start", wait for ``release``, log "end"; log warnings as they come."""

    def record(message: Warning | str, *_: object, **__: object) -> None:
        append_jsonl(Path(log), {"who": name, "event": "warning", "text": str(message)})

    warnings.simplefilter("always")
    warnings.showwarning = record
    with lock_directory(Path(directory), timeout=60, poll=0.01):
        entered.set()  # type: ignore[attr-defined]
        append_jsonl(Path(log), {"who": name, "event": "start"})
        assert release.wait(60)  # type: ignore[attr-defined]
        append_jsonl(Path(log), {"who": name, "event": "end"})


def test_a_second_process_waits_for_the_lock_holder(tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "log.jsonl"
    a_in, b_in, release = CTX.Event(), CTX.Event(), CTX.Event()
    first = CTX.Process(target=_locked_writer, args=(str(run), "A", str(log), a_in, release))
    second = CTX.Process(target=_locked_writer, args=(str(run), "B", str(log), b_in, release))
    first.start()
    assert a_in.wait(60)
    second.start()
    while not any(r["event"] == "warning" for r in read_jsonl(log)):  # B is waiting for A
        assert second.is_alive() and not b_in.is_set(), "B got the lock that A holds"
        time.sleep(0.01)
    release.set()
    for p in (first, second):
        p.join(60)
        assert p.exitcode == 0
    records = read_jsonl(log)
    events = [(r["who"], r["event"]) for r in records]
    assert events == [("A", "start"), ("B", "warning"), ("A", "end"), ("B", "start"), ("B", "end")]
    assert str(run) in records[1]["text"] and f"locked by process {first.pid}" in records[1]["text"]


def test_lock_timeout_names_directory_and_holder(tmp_path: Path) -> None:
    with lock_directory(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
        with (
            pytest.warns(StoreWarning, match=f"locked by process {os.getpid()}"),
            pytest.raises(LockTimeout) as err,
            lock_directory(tmp_path, timeout=0.05, poll=0.01, purpose="train"),
        ):
            pass
    message = str(err.value)
    assert str(tmp_path) in message and f"process {os.getpid()}" in message
    assert "to train" in message and "Wait for that process" in message
    assert isinstance(err.value, RunStoreError)
    with lock_directory(tmp_path, timeout=0.05):  # released on exit
        pass


def _hold_forever(directory: str, started: object) -> None:
    with lock_directory(Path(directory)):
        started.set()  # type: ignore[attr-defined]
        CTX.Event().wait(600)


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    started = CTX.Event()
    holder = CTX.Process(target=_hold_forever, args=(str(tmp_path), started))
    holder.start()
    assert started.wait(30)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    with lock_directory(tmp_path, timeout=10, poll=0.01):
        pass


# --- manifests ----------------------------------------------------------------------------------


@pytest.fixture
def finished(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    atomic_write_bytes(run / "adapter" / "adapter_model.safetensors", bytes(range(256)) * 4)
    atomic_write_json(run / "adapter" / "adapter_config.json", {"r": 4})
    atomic_write_text(run / "train_log.jsonl", '{"step": 1}\n')
    atomic_write_bytes(run / "cache" / "entities.pt", b"cache")
    (run / ".orphan.123.abcd.part").write_bytes(b"left by a killed writer")
    with lock_directory(run):
        write_manifest(run, "done.json", {"steps": 4}, ignore=["cache/*"])
    return run


def test_manifest_lists_every_file_but_lock_partials_and_ignored(finished: Path) -> None:
    record = verify_manifest(finished, "done.json")
    assert record["steps"] == 4
    assert sorted(record["files"]) == [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "train_log.jsonl",
    ]
    assert record["files"]["train_log.jsonl"]["size"] == len('{"step": 1}\n')
    (finished / "metrics.json").write_text("{}")  # files added later are not checked
    verify_manifest(finished, "done.json")


@pytest.mark.parametrize(
    "edit",
    [
        lambda record: record | {"steps": 999},  # a field beside the files
        lambda record: record | {"note": "added"},
        lambda record: {k: v for k, v in record.items() if k != "seal"},
        lambda record: record | {"seal": "0" * 64},
    ],
    ids=["changed field", "added field", "seal removed", "seal replaced"],
)
def test_an_edited_manifest_fails_its_seal(finished: Path, edit) -> None:
    """The whole record is sealed, not only its file list: an edited step count is not served."""
    path = finished / "done.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(RunStoreError, match=r"file done\.json does not match its `seal`"):
        verify_manifest(finished, "done.json")


def test_a_manifest_listing_no_files_is_refused(tmp_path: Path, finished: Path) -> None:
    """An empty list would vouch for any file put there later (another run's adapter)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=rf"{re.escape(str(empty))} holds no files"):
        write_manifest(empty, "done.json", {"steps": 4})
    record = {"steps": 4, "files": {}}
    blob = json.dumps(record, sort_keys=True).encode()
    record["seal"] = hashlib.sha256(blob).hexdigest()  # sealed as the store seals
    (finished / "done.json").write_text(json.dumps(record))
    with pytest.raises(RunStoreError, match=r"file done\.json lists no files"):
        verify_manifest(finished, "done.json")


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:100])


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[500] ^= 0x01
    p.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (_truncate, r"has 100 bytes, done\.json recorded 1,024"),
        (_empty, r"has 0 bytes"),
        (Path.unlink, r"is missing \(listed in done\.json\)"),
        (_flip, r"differs from its sha256 in done\.json"),
    ],
)
def test_a_damaged_file_fails_verification_by_name(finished: Path, damage, problem: str) -> None:
    damage(finished / "adapter" / "adapter_model.safetensors")
    with pytest.raises(RunStoreError, match=problem) as err:
        verify_manifest(finished, "done.json", remedy="Retrain with retrain=True.")
    message = str(err.value)
    assert message.startswith(f"{finished}: file adapter/adapter_model.safetensors ")
    assert message.endswith("Retrain with retrain=True.")
    assert err.value.file == finished / "adapter" / "adapter_model.safetensors"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, r"file done\.json is missing"),
        ("{not json", r"file done\.json is not valid JSON"),
        ('{"files": [1]}', r"file done\.json is not a manifest"),
    ],
)
def test_a_missing_or_invalid_manifest_is_named(
    finished: Path, content: str | None, problem: str
) -> None:
    if content is None:
        (finished / "done.json").unlink()
    else:
        (finished / "done.json").write_text(content)
    with pytest.raises(RunStoreError, match=rf"^{re.escape(str(finished))}: {problem}"):
        verify_manifest(finished, "done.json")


def test_read_json_names_the_run_directory_and_file(tmp_path: Path) -> None:
    path = tmp_path / "adapter" / "adapter_config.json"
    path.parent.mkdir()
    path.write_text('{"r": ')
    with pytest.raises(RunStoreError, match=r"file adapter/adapter_config\.json is not valid JSON"):
        read_json(path, directory=tmp_path, remedy="Retrain.")


# --- JSONL logs ---------------------------------------------------------------------------------


def test_jsonl_round_trip_and_missing_file(tmp_path: Path) -> None:
    log = tmp_path / "train_log.jsonl"
    assert read_jsonl(log) == []
    for step in range(3):
        append_jsonl(log, {"step": step, "loss": 0.5})
    assert read_jsonl(log) == [{"loss": 0.5, "step": s} for s in range(3)]


def test_a_torn_last_line_is_dropped_and_repaired(tmp_path: Path) -> None:
    log = tmp_path / "train_log.jsonl"
    append_jsonl(log, {"step": 1})
    with log.open("ab") as f:
        f.write(b'{"step": 2, "lo')  # a kill during the write
    with pytest.warns(StoreWarning, match=r"train_log\.jsonl: dropped a torn last line"):
        assert read_jsonl(log) == [{"step": 1}]
    assert log.read_bytes().endswith(b'"lo')  # not repaired unless asked
    with pytest.warns(StoreWarning):
        read_jsonl(log, repair=True)
    append_jsonl(log, {"step": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_jsonl(log) == [{"step": 1}, {"step": 2}]


def test_a_whole_last_record_without_newline_is_kept(tmp_path: Path) -> None:
    log = tmp_path / "train_log.jsonl"
    log.write_bytes(b'{"step": 1}\n{"step": 2}')
    assert read_jsonl(log, repair=True) == [{"step": 1}, {"step": 2}]
    append_jsonl(log, {"step": 3})
    assert [r["step"] for r in read_jsonl(log)] == [1, 2, 3]


@pytest.mark.parametrize(
    ("content", "line"),
    [
        (b'{"step": 1}\n{"st\n{"step": 3}\n', 2),  # damage inside the log
        (b'{"step": 1}\n{"step": 2\n', 2),  # a complete, terminated line that is not JSON
        (b'{"step": 1}\n\n{"step": 3}\n', 2),  # an empty line
        (b'{"step": 1}\n[1, 2]\n', 2),  # JSON, but not a record
        (b'\xff\xfe\n{"step": 2}\n', 1),  # not UTF-8
    ],
)
def test_corruption_before_the_last_line_is_an_error(
    tmp_path: Path, content: bytes, line: int
) -> None:
    log = tmp_path / "train_log.jsonl"
    log.write_bytes(content)
    with pytest.raises(RunStoreError, match=rf"file train_log\.jsonl line {line} is not") as err:
        read_jsonl(log, repair=True)
    assert str(tmp_path) in str(err.value)
    assert log.read_bytes() == content  # an error never rewrites the log
