"""The command line of a training run: ``python -m kalm.train``.

It trains one configuration (model, dataset, profile, seed and ``--set`` overrides) into the run
store that the notebooks read, resumes it if it was interrupted, or finds it finished; a
notebook given the same parameters afterwards loads the adapter instead of training. The same
command runs under ``accelerate launch`` and ``torchrun``: every process resolves the same
configuration, the number of processes is taken from the launch (``train.processes``, part of
the run key) and :func:`kalm.experiment.train_or_load` shares the work out.

It lives above :mod:`kalm.experiment`, which imports the trainer (:mod:`kalm.trainer`); no
module imports it. Those, with torch and transformers, are imported only once the arguments
parse.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from kalm.config import REPO_ROOT, ConfigError, RunConfig, Session, load_config, resolve
from kalm.durable import RunStoreError

__all__ = ["main", "notebook_command", "parser"]

EPILOG = """\
launch commands:
  one process (the CPU, or one GPU):
    python -m kalm.train --model smollm2 --dataset wn18rr
  the paper's setting on one GPU (4 accumulated micro-batches of 24 per step):
    python -m kalm.train --model llama2
  the paper's setting on 4 GPUs (4 processes x 24 per step, as the recipe):
    accelerate launch --num_processes 4 -m kalm.train --model llama2 \\
        --set gradient_accumulation_steps=1
    torchrun --nproc_per_node 4 -m kalm.train --model llama2 --set gradient_accumulation_steps=1
  local weights instead of the hub (any directory holding config.json and the weights):
    python -m kalm.train --model /path/to/Llama-2-7b-hf
  two optimiser steps of the paper's setting, as a check of the set-up (a run of its own):
    python -m kalm.train --model llama2 --set max_steps=2

The number of processes comes from the launch and enters the run key (train.processes), since
it sets the global batch: batch_size x gradient_accumulation_steps x processes examples per
optimiser step. When the run is finished, the command prints the papermill call whose notebook
loads the trained adapter.
"""


def _assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with the value read as YAML (``0.1``, ``true``, ``[q_proj, v_proj]``);
    ``1e-4``, a string in YAML 1.1, is read as a number too."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, e.g. lam=0.1; got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not valid YAML ({err})") from err
    if isinstance(value, str):
        for number in (int, float):
            with contextlib.suppress(ValueError):
                return key.strip(), number(value)
    return key.strip(), value


def parser() -> argparse.ArgumentParser:
    """The argument parser; its help lists the launch commands."""
    config = load_config()
    cli = argparse.ArgumentParser(
        prog="python -m kalm.train",
        description="Train the KaLM adapter of one run into the run store (or resume it, or "
        "find it finished), alone or under accelerate launch / torchrun.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_argument(
        "--model",
        default=None,
        help=f"model alias ({', '.join(config.models)}; default {config.default_model}) or a "
        "local directory holding config.json and the weights",
    )
    cli.add_argument(
        "--dataset", default=None, help=f"{', '.join(config.datasets)} (default: the first)"
    )
    cli.add_argument(
        "--profile",
        default="auto",
        help=f"{', '.join(config.profiles)} or auto (the model's default; KALM_PROFILE wins)",
    )
    cli.add_argument("--seed", type=int, default=0, help="seed of the run (default 0)")
    cli.add_argument(
        "--set",
        dest="overrides",
        type=_assignment,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a train or eval field of the profile (repeatable), e.g. --set lam=0.1; "
        "values are checked like the configuration file's",
    )
    cli.add_argument(
        "--runs-dir",
        type=Path,
        default=None,
        help="run store (default: KALM_RUNS_DIR, else ~/.cache/kalm/runs); run the "
        "notebooks with the same KALM_RUNS_DIR to reuse the run",
    )
    cli.add_argument(
        "--retrain", action="store_true", help="discard the run if it exists and train it anew"
    )
    return cli


def notebook_command(cfg: RunConfig, overrides: dict[str, Any], runs: Path | None) -> str:
    """The papermill call whose notebook resolves ``cfg`` again and so loads its adapter."""
    model = cfg.model.hub_id if cfg.model.source == "local" else cfg.model.alias
    parts = ["papermill", "notebooks/kgc.ipynb", "out.ipynb", "-p", "model", model]
    parts += ["-p", "dataset", cfg.dataset, "-p", "profile", cfg.profile]
    parts += ["-p", "seed", str(cfg.seed)]
    changed = {k: v for k, v in overrides.items() if not (k == "processes" and v == 1)}
    if changed:
        parts += ["-y", f"overrides: {json.dumps(changed)}"]
    command = shlex.join(parts)
    return f"KALM_RUNS_DIR={shlex.quote(str(runs))} {command}" if runs else command


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status: 2 for an error of the configuration, the
    model, the data, the run store or the disk, 1 for a divergence, each told in one line.

    The arguments are parsed before torch and transformers are imported, so ``--help`` and a
    bad argument answer at once. Every process of a launch runs it; only the main process
    prints.
    """
    args = parser().parse_args(argv)
    from kalm.data import DataError
    from kalm.experiment import train_or_load
    from kalm.models import ModelUnavailableError
    from kalm.runs import runs_dir
    from kalm.trainer import TrainingDiverged, process_state

    overrides = dict(args.overrides)
    runs = args.runs_dir.resolve() if args.runs_dir is not None else None
    state = process_state()  # joins the launch's processes (one without a launcher)
    overrides.setdefault("processes", state.num_processes)
    main_process = state.is_main_process

    def fail(message: str, status: int) -> int:
        if main_process:
            print(f"error: {message}", file=sys.stderr)
        return status

    try:
        cfg = resolve(
            model=args.model,
            dataset=args.dataset,
            profile=args.profile,
            seed=args.seed,
            **overrides,
        )
        cfg = replace(cfg, session=Session(runs_dir=runs))  # the store Run.trained(cfg) names
        if main_process:
            t = cfg.train
            print(
                f"{cfg.model.alias} on {cfg.dataset}, profile {cfg.profile}, seed {cfg.seed}: "
                f"{t.global_batch_size} examples per step = {t.batch_size} x "
                f"{t.gradient_accumulation_steps} accumulated x {t.processes} process(es)"
            )
        _, _, run = train_or_load(cfg, retrain=args.retrain, progress=main_process)
    except (ConfigError, ModelUnavailableError, RunStoreError, DataError) as err:
        return fail(str(err), 2)
    except TrainingDiverged as err:
        return fail(str(err), 1)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        return fail(
            f"no space left on the device of {err.filename or runs or runs_dir()}; free space "
            "there, or pass --runs-dir on another disk, and run the same command again (it "
            "resumes from the last checkpoint)",
            2,
        )
    if main_process:
        store = run.path.parent
        shown = None if store == REPO_ROOT / "runs" else store
        print(f"run {run.path}: {run.done()['steps']} steps, adapter in {run.adapter_dir}")
        print(f"a notebook loads it with: {notebook_command(cfg, overrides, shown)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
