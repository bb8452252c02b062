"""Experiments: the untuned and the KaLM-tuned model of a configuration, with their run store.

This is the top of the library: it loads models (:mod:`kalm.models`), trains them
(:mod:`kalm.trainer`) and hands out what evaluation needs (:class:`~kalm.encoder.Encoder`, a
:class:`~kalm.runs.Run` for caches and metrics) in one call, :func:`load_encoder`. Evaluation
and analysis never import it; the notebooks do. The model is passed on as the configuration's
:class:`~kalm.config.ModelSpec`. Notebooks turn their parameters into a configuration with
:func:`notebook_config`.
"""

from __future__ import annotations

import ast
import contextlib
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from accelerate import PartialState
from peft import PeftModel
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kalm.config import ConfigError, EvalConfig, RunConfig, Session, TrainConfig, resolve
from kalm.data import load_kg
from kalm.durable import LOCK_NAME, RunStoreError, lock_directory
from kalm.encoder import Encoder
from kalm.evaluate.protocol import ValidationProbe
from kalm.models import load_model
from kalm.published import keep_precision, locate, restore_checkpoint
from kalm.runs import RETRAIN, Run
from kalm.trainer import Trainer, check_processes, process_state
from kalm.views import ViewBuilder

__all__ = [
    "EXECUTE_PARAMETERS",
    "NOTEBOOK_PARAMETERS",
    "TRAINING_WAIT",
    "load_base",
    "load_encoder",
    "notebook_config",
    "train_or_load",
]

NOTEBOOK_PARAMETERS = ("model", "dataset", "profile", "seed", "retrain", "overrides")
"""The parameters of every experiment notebook; profile fields go into ``overrides``."""

EXECUTE_PARAMETERS = ("results_dir", "runs_dir")
"""Parameters that ``python -m kalm.execute`` injects into a page that declares none of them:
settings of the session rather than of the experiment (see :class:`~kalm.config.Session`)."""

TRAINING_WAIT = 24 * 3600.0
"""Seconds :func:`train_or_load` waits for another process training the same run."""


def _load(
    cfg: RunConfig, precision: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return load_model(
        cfg.model,
        precision=precision or cfg.train.precision,
        load_in_8bit=cfg.train.load_in_8bit,
    )


def load_base(
    cfg: RunConfig, *, precision: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Run]:
    """The untuned model of ``cfg`` (the "no tuning" rows of the paper) and its cache directory;
    ``precision`` overrides ``cfg.train.precision`` for the weights."""
    model, tokenizer = _load(cfg, precision)
    return model, tokenizer, Run.base(cfg)


def train_or_load(
    cfg: RunConfig,
    *,
    retrain: bool | None = None,
    progress: bool = True,
    wait: float = TRAINING_WAIT,
) -> tuple[PeftModel, PreTrainedTokenizerBase, Run]:
    """The KaLM-tuned model of ``cfg``: loaded if its run finished, else trained (resuming).

    Training is the only expensive path; every notebook calls this, so the first one trains and
    the others reuse the adapter. An unfinished run is trained under its directory's lock: a
    second process for the same configuration waits (up to ``wait`` seconds) and then loads
    what the first trained. A finished run is loaded without the lock (from a read-only store
    too), and only if its record and files verify. A run the book publishes
    (:mod:`kalm.published`) is loaded from ``book/runs/`` when the local store lacks it, and its
    published checkpoint resumes an unfinished one. A damaged run raises
    :class:`~kalm.durable.RunStoreError` and is retrained only on request: ``retrain=True``
    discards the run and trains it again. ``retrain=None`` follows ``cfg.session`` (the notebook
    parameter ``retrain``, see :func:`notebook_config`), which retrains each run once.

    Under ``accelerate launch`` or ``torchrun`` every process calls this with the same ``cfg``
    (whose ``train.processes`` must match the launch). The main process alone locks the run,
    discards it on ``retrain`` and writes every file; the others wait for it at a barrier
    before they read the run, and again before anyone returns, so the adapter is there for
    all of them.

    The run lives in the run store of ``cfg`` (:func:`~kalm.runs.runs_dir`). A new run
    reads its dataset before the model, so bad data fails in seconds; a run that fails before
    it holds anything to resume from (a checkpoint) leaves no directory behind.
    """
    run = Run.trained(cfg)
    if retrain is None:
        retrain = cfg.session.retrain and run.path not in cfg.session.retrained
    found = None if retrain else locate(run)  # the local store first, then book/runs/
    if found is not None and found.finished_record() is not None:
        # A finished run changes only by a retrain (under the lock, done.json deleted first),
        # so loading it needs no lock, and no write access: a read-only store serves it.
        return _load_finished(cfg, found)
    state = process_state()
    main = state.is_main_process
    lock = lock_directory(run.path, timeout=wait, purpose=f"train or load {run.path.name}")
    # The others do not take the lock: waiting for it, they would block the collectives of
    # the main process's training.
    with lock if main else contextlib.nullcontext():
        try:
            tuned, tokenizer, found = _train_or_load_locked(cfg, run, state, retrain, progress)
        except BaseException:
            if main:
                _remove_if_unstarted(run)
            raise
    return tuned, tokenizer, found


def _train_or_load_locked(
    cfg: RunConfig, run: Run, state: PartialState, retrain: bool, progress: bool
) -> tuple[PeftModel, PreTrainedTokenizerBase, Run]:
    """The body of :func:`train_or_load`, run under the lock of ``run`` (by its main process):
    the tuned model, its tokenizer and the run it came from (local, or published)."""
    main = state.is_main_process
    if retrain and main:
        run.discard()
    if retrain:
        cfg.session.retrained.add(run.path)
    elif main:
        restore_checkpoint(run)  # a published checkpoint resumes as a local one does
    state.wait_for_everyone()
    found = run if retrain else locate(run)  # the local store first, then book/runs/
    if found.finished_record() is not None:
        return _load_finished(cfg, found)
    check_processes(cfg.train, state.num_processes)  # before minutes of loading
    kg = load_kg(cfg.dataset)  # before the model too: bad data fails in seconds
    model, tokenizer = _load(cfg)
    # The learning curve of the run (train.curve_points), measured by the main process only.
    probe = ValidationProbe.from_config(kg, cfg) if cfg.train.curve_points else None
    trainer = Trainer(model, tokenizer, kg, cfg, run, probe=probe)
    if main:
        run.save_config(cfg)
    tuned = trainer.fit(progress=progress)
    if main:
        tuned.save_pretrained(run.adapter_dir)
        sessions = trainer.sessions()
        run.save_done(
            {
                "steps": trainer.steps,
                "examples": len(trainer.examples),
                "seconds": sum(s["seconds"] for s in sessions),
                "curve_seconds": sum(s.get("curve_seconds", 0.0) for s in sessions),
                "sessions": sessions,
            }
        )
    state.wait_for_everyone()
    return tuned, tokenizer, run


# What a run directory holds before its first checkpoint; all of it is written again on a retry.
_UNSTARTED = frozenset({LOCK_NAME, "config.json", "train_log.jsonl"})


def _remove_if_unstarted(run: Run) -> None:
    """Remove the directory of a run that failed before it held anything to resume from (its
    lock, and perhaps its configuration and an empty log), so the failure leaves no run behind.

    Called under the lock. A process that was waiting for the same run then takes the lock of
    a removed file; whatever it writes creates the directory again.
    """
    with contextlib.suppress(FileNotFoundError):
        if {p.name for p in run.path.iterdir()} <= _UNSTARTED:
            shutil.rmtree(run.path, ignore_errors=True)


def _load_finished(
    cfg: RunConfig, run: Run, precision: str | None = None
) -> tuple[PeftModel, PreTrainedTokenizerBase, Run]:
    """The model of ``cfg`` (in ``precision``, by default ``cfg.train.precision``) with the
    verified adapter of its finished ``run`` (local or published); an adapter that cannot be
    loaded raises RunStoreError naming the run."""
    model, tokenizer = _load(cfg, precision)
    try:
        tuned = PeftModel.from_pretrained(model, run.adapter_dir)
    except Exception as err:  # peft and safetensors raise many types; all mean "unreadable"
        raise RunStoreError(
            run.path, run.adapter_dir, f"cannot be loaded ({type(err).__name__}: {err})", RETRAIN
        ) from err
    tuned.eval()
    return tuned, tokenizer, run


def load_encoder(
    cfg: RunConfig,
    *,
    tuned: bool = True,
    precision: str | None = None,
    progress: bool = True,
) -> tuple[Encoder, Run]:
    """The encoder of ``cfg``'s KaLM-tuned model (:func:`train_or_load`, so training it if its
    run has not finished) or, with ``tuned=False``, of its untuned model (:func:`load_base`),
    with the views and batch sizes of ``cfg``; and the run that holds its caches and metrics.

    Every consumer of embeddings needs the same model, graph, views and batch sizes, so they
    come from here rather than from four calls repeated by each. The model and tokenizer are
    ``encoder.model`` and ``encoder.views.tokenizer``; the graph is ``encoder.views.kg``.
    ``precision`` loads the weights in another precision than ``cfg.train.precision`` (the
    same adapter on a bf16 base, say) without changing the run.
    """
    if tuned:
        model, tokenizer, run = train_or_load(cfg, progress=progress)
        if precision not in (None, cfg.train.precision):
            del model
            model, tokenizer, run = _load_finished(cfg, run, precision)
    else:
        model, tokenizer, run = load_base(cfg, precision=precision)
    views = ViewBuilder.from_config(load_kg(cfg.dataset), tokenizer, cfg)
    return Encoder.from_config(model, views, cfg), run


# ----------------------------------------------------------------------------------- notebooks
def notebook_config(namespace: Mapping[str, Any]) -> RunConfig:
    """The configuration of a notebook from its parameters: ``cfg = notebook_config(globals())``.

    Every experiment notebook declares exactly :data:`NOTEBOOK_PARAMETERS`; profile fields are
    changed through the ``overrides`` dict. A name papermill injected that the notebook does not
    declare (``-p batch_size 2``) would otherwise be ignored while the executed copy shows it, so
    it is an error here, as are a non-bool ``retrain`` and ``overrides`` that is not a dict;
    only :data:`EXECUTE_PARAMETERS` may be injected undeclared. ``retrain``, ``results_dir`` and
    ``runs_dir`` go into the configuration's :class:`~kalm.config.Session`: ``retrain=True``
    makes every :func:`train_or_load` of this configuration (and of the study arms derived from
    it) retrain its run once, ``results_dir`` is where :func:`kalm.results.publish` writes and
    ``runs_dir`` the run store its runs live in.
    """
    profile_fields = {f.name for f in fields(TrainConfig)} | {f.name for f in fields(EvalConfig)}
    injected = _injected(namespace.get("In", ()))
    for name in injected:
        if name in NOTEBOOK_PARAMETERS or name in EXECUTE_PARAMETERS:
            continue
        hint = (
            f"pass profile fields as -y 'overrides: {{{name}: {json.dumps(namespace.get(name))}}}'"
            if name in profile_fields
            else f"the parameters are {', '.join(NOTEBOOK_PARAMETERS)}"
        )
        raise ConfigError(f"{name} is not a parameter of this notebook; {hint}")
    missing = [name for name in NOTEBOOK_PARAMETERS if name not in namespace]
    if missing:
        raise ConfigError(f"the notebook's parameters cell does not define {missing}")
    retrain, overrides = namespace["retrain"], namespace["overrides"]
    if not isinstance(retrain, bool):
        raise ConfigError(f"retrain must be True or False, got {retrain!r}")
    if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
        raise ConfigError(
            f"overrides must be a dict of profile fields, e.g. {{'lam': 0.1}}; got {overrides!r}"
        )
    clash = sorted(set(overrides) & set(NOTEBOOK_PARAMETERS))
    if clash:
        raise ConfigError(f"{clash} are notebook parameters, not overrides; pass them with -p")
    cfg = resolve(
        model=namespace["model"],
        dataset=namespace["dataset"],
        profile=namespace["profile"],
        seed=namespace["seed"],
        **overrides,
    )
    paths = {name: Path(namespace[name]) for name in EXECUTE_PARAMETERS if name in injected}
    cfg = replace(cfg, session=Session(retrain=retrain, **paths))
    if "precision" not in overrides:  # a run keeps the precision it started in (in its store)
        cfg = keep_precision(cfg)
    return cfg


def _injected(history: Sequence[str]) -> list[str]:
    """Names assigned by papermill's injected parameters cell (it starts ``# Parameters``),
    found in the kernel's input history; none when the notebook runs without papermill."""
    names: list[str] = []
    for source in history:
        if source.startswith("# Parameters\n"):
            names += [
                target.id
                for node in ast.parse(source).body
                if isinstance(node, ast.Assign)
                for target in node.targets
                if isinstance(target, ast.Name)
            ]
    return names
