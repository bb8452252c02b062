"""The training command line ``python -m kalm.train``: alone, and under ``torchrun`` with two
CPU processes (gloo) on a tiny random Llama in a local directory."""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from kalm import experiment
from kalm.config import REPO_ROOT, ConfigError, resolve
from kalm.runs import Run
from kalm.train import _assignment, main, parser
from kalm.trainer import Trainer


def _commands(text: str) -> list[list[str]]:
    """The arguments of every ``-m kalm.train`` command in ``text``, continuation lines
    joined and comments dropped."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        if "-m kalm.train" in line:
            words = shlex.split(line, comments=True)
            commands.append(words[words.index("kalm.train") + 1 :])
    return commands


def _code_blocks(path: Path) -> str:
    return "\n".join(re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.DOTALL))


def test_every_command_shown_parses_and_resolves(capsys: pytest.CaptureFixture[str]) -> None:
    """The commands of ``--help``, README's and the book's GPU sections, read by the real parser;
    their configurations resolve (so every ``--set`` names a field), except local directories,
    which do not exist here."""
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--model", "--dataset", "--profile", "--seed", "--set", "--runs-dir"):
        assert option in help_text
    shown = {
        "--help": _commands(help_text.partition("launch commands:")[2]),
        "README.md": _commands(_code_blocks(REPO_ROOT / "README.md")),
        "book/reproducing.md": _commands(_code_blocks(REPO_ROOT / "book" / "reproducing.md")),
    }
    assert {where: len(commands) for where, commands in shown.items()} == {
        "--help": 6,
        "README.md": 3,
        "book/reproducing.md": 4,
    }
    cli = parser()
    for where, commands in shown.items():
        for words in commands:
            try:
                args = cli.parse_args(words)
            except SystemExit:
                pytest.fail(f"{where}: `{shlex.join(words)}` does not parse")
            if args.model.startswith("/path/to/"):
                continue
            try:
                resolve(
                    model=args.model,
                    dataset=args.dataset,
                    profile=args.profile,
                    seed=args.seed,
                    **dict(args.overrides),
                )
            except ConfigError as err:
                pytest.fail(f"{where}: `{shlex.join(words)}`: {err}")


def test_help_answers_without_torch() -> None:
    """Arguments are parsed before torch and transformers are imported (seconds of loading)."""
    code = (
        "import sys\n"
        "from kalm.train import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('imported:', [m for m in ('torch', 'transformers') if m in sys.modules])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert proc.stdout.splitlines()[-1] == "imported: []"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lam=0.1", ("lam", 0.1)),
        ("lr=1e-4", ("lr", 1e-4)),
        ("max_steps=2", ("max_steps", 2)),
        ("gather_negatives=true", ("gather_negatives", True)),
        ("lora_targets=[q_proj, v_proj]", ("lora_targets", ["q_proj", "v_proj"])),
        ("precision=bf16", ("precision", "bf16")),
    ],
)
def test_set_values_are_read_as_yaml(text: str, expected: tuple) -> None:
    assert _assignment(text) == expected


def test_a_bad_value_is_refused_before_anything_loads(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--profile", "smoke", "--set", "lam=-1"]) == 2
    error = capsys.readouterr().err
    assert "train.lam = -1.0 is invalid" in error and "from the override lam=-1" in error
    with pytest.raises(SystemExit):
        main(["--set", "lam"])
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_a_launch_of_another_size_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A run configured for 4 processes does not train on this one, and leaves no directory."""
    argv = ["--profile", "smoke", "--set", "processes=4", "--runs-dir", str(tmp_path)]
    assert main(argv) == 2
    assert "configured for train.processes = 4" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_torchrun_two_processes_then_a_notebook_loads_the_run(
    llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two steps of smoke under ``torchrun --nproc_per_node 2`` on WN18RR; then the run is
    found by what a notebook calls, with the overrides the command printed."""
    runs = tmp_path / "runs"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "kalm.train", "--model", str(llama_dir), "--dataset", "wn18rr",
        "--profile", "smoke", "--set", "max_steps=2", "--runs-dir", str(runs),
    ]  # fmt: skip
    proc = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "16 examples per step = 8 x 1 accumulated x 2 process(es)" in proc.stdout
    assert proc.stdout.count("a notebook loads it with:") == 1  # the main process alone
    assert '"processes": 2' in proc.stdout and "-p model " + str(llama_dir.resolve()) in proc.stdout

    (path,) = [p for p in runs.iterdir() if (p / "done.json").is_file()]
    log = [json.loads(line) for line in (path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]  # one line per step
    assert (path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (path / "checkpoint.pt").exists()
    assert json.loads((path / "config.json").read_text())["train"]["processes"] == 2

    monkeypatch.setenv("KALM_RUNS_DIR", str(runs))
    monkeypatch.setattr(experiment, "Trainer", None)  # loading must not train
    cfg = resolve(model=str(llama_dir), dataset="wn18rr", profile="smoke", max_steps=2, processes=2)
    _, _, run = experiment.train_or_load(cfg, progress=False)
    assert run.path == path


def _train(llama_dir: Path, runs: Path, *settings: str) -> list[str]:
    """The arguments of two smoke steps on WN18RR of the model in ``llama_dir``."""
    argv = ["--model", str(llama_dir), "--dataset", "wn18rr", "--profile", "smoke"]
    argv += ["--runs-dir", str(runs), "--set", "max_steps=2"]
    for setting in settings:
        argv += ["--set", setting]
    return argv


def test_bf16_checkpointing_and_lora_dropout_train(
    llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The paper's profile without 8 bit: bf16, gradient checkpointing and LoRA dropout. The
    recomputation of a checkpointed layer in the backward must cast as its forward did."""
    settings = ("precision=bf16", "gradient_checkpointing=true", "lora_dropout=0.05")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 may be emulated on this CPU
        status = main(_train(llama_dir, tmp_path, *settings))
    assert status == 0, capsys.readouterr().err
    (run,) = tmp_path.iterdir()
    assert json.loads((run / "done.json").read_text())["steps"] == 2


def test_the_run_store_is_passed_not_exported(
    llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--runs-dir reaches the library as an argument; the environment is left as it was."""
    monkeypatch.delenv("KALM_RUNS_DIR", raising=False)
    assert main(_train(llama_dir, tmp_path / "runs", "max_steps=1")) == 0
    assert "KALM_RUNS_DIR" not in os.environ
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "done.json").is_file()


def _quiet_failure(capsys: pytest.CaptureFixture[str]) -> str:
    """The one ``error: ...`` line of a failed command (no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_divergence_ends_in_one_message(
    llama_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loss = Trainer.loss

    def diverging(self: Trainer, batch: object) -> dict[str, torch.Tensor]:
        parts = loss(self, batch)
        return {**parts, "total": parts["total"] * float("nan")}

    monkeypatch.setattr(Trainer, "loss", diverging)
    assert main(_train(llama_dir, tmp_path)) == 1
    assert "training diverged at step 1: the loss is not finite" in _quiet_failure(capsys)


def test_a_full_disk_is_reported_and_leaves_no_run(
    llama_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def full(path: Path, record: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("kalm.trainer.append_jsonl", full)
    assert main(_train(llama_dir, tmp_path)) == 2
    assert f"no space left on the device of {tmp_path}" in _quiet_failure(capsys)
    assert list(tmp_path.iterdir()) == []  # no checkpoint yet: nothing to resume from


def test_bad_data_is_reported_before_the_model_loads(
    llama_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A damaged training split (the first file read) fails in seconds, with no run left."""
    data = (tmp_path / "data").resolve()
    (data / "wn18rr").mkdir(parents=True)
    (data / "wn18rr" / "train.tsv").write_text("not WN18RR\n")
    monkeypatch.setenv("KALM_DATA_DIR", str(data))
    monkeypatch.setattr(experiment, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main(_train(llama_dir, tmp_path / "runs")) == 2
    assert f"checksum mismatch for {data / 'wn18rr' / 'train.tsv'}" in _quiet_failure(capsys)
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_failed_model_load_leaves_no_run(
    llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model directory without its tokenizer: one message, and no empty run directory."""
    bare = tmp_path / "bare"
    shutil.copytree(llama_dir, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    assert main(_train(bare, tmp_path / "runs")) == 2
    assert f"{bare} holds no tokenizer" in _quiet_failure(capsys)
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_garbage_weight_file_is_named(
    llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(llama_dir, damaged)
    (damaged / "model.safetensors").write_bytes(b"\xff" * 64)
    assert main(_train(damaged, tmp_path / "runs")) == 2
    assert "model.safetensors holds no valid safetensors header" in _quiet_failure(capsys)


def test_a_checkpoint_without_its_entries_is_named(
    llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = resolve(model=str(llama_dir), dataset="wn18rr", profile="smoke", max_steps=2, processes=1)
    run = Run.trained(cfg, tmp_path)
    run.path.mkdir()
    torch.save({"step": 1}, run.checkpoint_path)
    assert main(_train(llama_dir, tmp_path)) == 2
    error = _quiet_failure(capsys)
    assert f"{run.path}: file checkpoint.pt is not a training checkpoint" in error
    assert "adapter" in error and "Delete it" in error
    assert run.checkpoint_path.is_file()  # kept: the user decides
