"""The training command line ``python -m kalm.train``: alone, and under ``torchrun`` with two
CPU processes (gloo) on a tiny random Llama in a local directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from kalm import experiment
from kalm.config import REPO_ROOT, resolve
from kalm.train import _assignment, main


def test_help_documents_the_launch_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "usage: python -m kalm.train" in text
    for command in (
        "python -m kalm.train --model llama2",
        "accelerate launch --num_processes 4 -m kalm.train --model llama2",
        "torchrun --nproc_per_node 4 -m kalm.train --model llama2",
        "python -m kalm.train --model /path/to/Llama-2-7b-hf",
    ):
        assert command in text
    for option in ("--model", "--dataset", "--profile", "--seed", "--set", "--runs-dir"):
        assert option in text


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
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run configured for 4 processes does not train on this one."""
    monkeypatch.setenv("KALM_RUNS_DIR", str(tmp_path))
    assert main(["--profile", "smoke", "--set", "processes=4"]) == 2
    assert "configured for train.processes = 4" in capsys.readouterr().err


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
    cfg = resolve(
        model=str(llama_dir), dataset="wn18rr", profile="smoke", max_steps=2, processes=2
    )
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
