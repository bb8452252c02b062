"""Data parallelism on 2 CPU processes (gloo), against one process on the same global batches.

The processes are started the way ``torchrun`` starts them (the environment variables RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT), so accelerate joins them exactly as under
a real launch. One group of 2 processes runs every check that needs them, on a tiny random
Llama saved to a directory and a toy graph: the gathered L_exp of one global batch, then two
optimiser steps through ``train_or_load``, recording the examples each process trained on.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from helpers import toy_kg

from kalm import experiment
from kalm.batching import iterate_batches, micro_batches
from kalm.config import resolve
from kalm.models import load_model
from kalm.runs import Run
from kalm.trainer import Trainer

pytestmark = pytest.mark.slow  # two training processes per test

WORLD = 2
# Two steps, clipped hard so that clipping acts on every step; smoke's lr, no LoRA dropout.
STEPS = {"max_steps": 2, "max_grad_norm": 0.05, "checkpoint_every": 1}


def graph():
    """16 triples of the eight animals (32 examples with inverses): two global batches of 16;
    and two validation triples, which the learning curve of the smoke profile measures (on the
    main process, while the other waits)."""
    return toy_kg(
        [(i, 0, (i + 1) % 8) for i in range(8)] + [(i, 1, (i + 3) % 8) for i in range(8)],
        valid=[(0, 1, 5), (2, 0, 7)],
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, model_dir: Path, runs: Path, out) -> None:
    """One process of the group: what it computed, for the test to compare."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        KALM_RUNS_DIR=str(runs),
    )
    torch.set_num_threads(1)
    kg = graph()
    # the gathered L_exp of this process's share of the first global batch, with the heads'
    # views as constant self-negatives and trained through (gathered with gradient)
    l_exp = {}
    for grad in (False, True):
        cfg = resolve(
            model=str(model_dir),
            profile="smoke",
            processes=WORLD,
            gather_negatives=True,
            self_negative_grad=grad,
        )
        model, tokenizer = load_model(cfg.model)
        trainer = Trainer(model, tokenizer, kg, cfg, Run(runs / f"gather-{rank}-{grad}"))
        _, first = next(iterate_batches(trainer.lengths, cfg.train.global_batch_size, cfg.seed))
        (mine,) = micro_batches(first, rank=rank, processes=WORLD, accumulation=1)
        with torch.no_grad():
            l_exp[grad] = float(trainer.loss(trainer.collate(mine))["l_exp"])

    # two steps of a run, as `python -m kalm.train` trains it, recording the examples
    seen: list[list[int]] = []
    collate = Trainer.collate

    def recording(self: Trainer, indices: np.ndarray):
        seen.append(indices.tolist())
        return collate(self, indices)

    Trainer.collate = recording  # type: ignore[method-assign]
    experiment.load_kg = lambda _name: kg  # the toy graph instead of the named dataset
    cfg = resolve(model=str(model_dir), profile="smoke", processes=WORLD, **STEPS)
    tuned, _, run = experiment.train_or_load(cfg, progress=False)
    out[rank] = {
        "l_exp": l_exp,
        "seen": seen,
        "finished_on_return": run.adapter_dir.is_dir() and run.finished_record() is not None,
        "adapter": {n: p.detach().clone() for n, p in tuned.named_parameters() if "lora_" in n},
        "run": run.path,
    }


@pytest.fixture(scope="module")
def group(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    """What each of the two processes computed."""
    runs = tmp_path_factory.mktemp("runs")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), llama_dir, runs, out), nprocs=WORLD)
        return dict(out)


def single_trainer(llama_dir: Path, path: Path, **overrides) -> Trainer:
    cfg = resolve(model=str(llama_dir), profile="smoke", **overrides)
    model, tokenizer = load_model(cfg.model)
    return Trainer(model, tokenizer, graph(), cfg, Run(path))


def test_each_process_trains_its_own_share_of_every_global_batch(
    group: dict[int, dict], llama_dir: Path, tmp_path: Path
) -> None:
    trainer = single_trainer(llama_dir, tmp_path, processes=1)
    size = trainer.tcfg.batch_size * WORLD
    batches = iterate_batches(trainer.lengths, size, trainer.cfg.seed)
    steps = [next(batches)[1].tolist() for _ in range(STEPS["max_steps"])]
    for step, global_batch in enumerate(steps):
        shares = [group[rank]["seen"][step] for rank in range(WORLD)]
        assert all(len(share) == trainer.tcfg.batch_size for share in shares)
        assert not set(shares[0]) & set(shares[1])  # disjoint
        assert sorted(shares[0] + shares[1]) == sorted(global_batch)  # together: the batch


def test_the_run_is_finished_when_every_process_returns(group: dict[int, dict]) -> None:
    assert all(group[rank]["finished_on_return"] for rank in range(WORLD))
    assert group[0]["run"] == group[1]["run"]
    run = Run(group[0]["run"])
    log = run.train_log()
    assert [r["step"] for r in log] == [1, 2]  # one line per step, not one per process
    assert json.loads((run.path / "config.json").read_text())["train"]["processes"] == WORLD


def test_gathered_negatives_equal_one_process_on_the_whole_batch(
    group: dict[int, dict], llama_dir: Path, tmp_path: Path
) -> None:
    """Each row sees every other process's rows exactly once: L_exp over the gathered rows is
    the single-process L_exp of the concatenated global batch."""
    trainer = single_trainer(llama_dir, tmp_path, processes=1)
    size = trainer.tcfg.batch_size * WORLD
    _, first = next(iterate_batches(trainer.lengths, size, trainer.cfg.seed))
    with torch.no_grad():
        whole = float(trainer.loss(trainer.collate(first))["l_exp"])
    for rank in range(WORLD):
        for grad in (False, True):  # constant or trained-through self-negatives
            assert group[rank]["l_exp"][grad] == pytest.approx(whole, abs=1e-5)


def test_two_processes_equal_one_process_accumulating_two_micro_batches(
    group: dict[int, dict], llama_dir: Path, tmp_path: Path
) -> None:
    """The same global batches, the same steps and schedule, clipping included."""
    trainer = single_trainer(llama_dir, tmp_path, gradient_accumulation_steps=WORLD, **STEPS)
    seen: list[list[int]] = []
    collate = trainer.collate
    trainer.collate = lambda indices: seen.append(indices.tolist()) or collate(indices)
    tuned = trainer.fit(progress=False)
    assert seen == [group[rank]["seen"][step] for step in range(2) for rank in range(WORLD)]
    ours = {n: p.detach() for n, p in tuned.named_parameters() if "lora_" in n}
    for rank in range(WORLD):
        theirs = group[rank]["adapter"]
        assert ours.keys() == theirs.keys() and ours
        for name in ours:
            torch.testing.assert_close(theirs[name], ours[name], atol=1e-4, rtol=0)
    single = trainer.run.train_log()
    double = Run(group[0]["run"]).train_log()
    for a, b in zip(single, double, strict=True):
        for key in ("L_exp", "L_imp", "total", "lr"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
