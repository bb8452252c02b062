"""The KaLM training loop: LoRA on a causal LM, ``L_exp + lam * L_imp``, exact checkpoint/resume.

The same loop trains the bi-encoder baseline (an encoder, ``lam = 0``): its views are SimKGC's
and its embeddings mean-pooled, both chosen by the model (see :mod:`kalm.views`,
:func:`kalm.models.pooling_of`), and it never builds a prompt for the LM head it lacks.

One code path serves CPU, one GPU and several (``accelerate launch``, ``torchrun``): the two
views and the triple-completion prompt go through a single ``forward`` of :class:`KaLMModule`,
which is what DDP/FSDP wrap, so gradient synchronisation sees every parameter use. Each
optimiser step takes one global batch, which every process shards the same way
(:func:`~kalm.batching.micro_batches`); only the main process writes the run directory.

The command line of a training run, ``python -m kalm.train``, is :mod:`kalm.train`; it sits on
top of the library and nothing imports it.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
)
from peft import set_peft_model_state_dict as _set_adapter
from torch import nn
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from kalm.batching import iterate_batches, micro_batches
from kalm.config import ConfigError, RunConfig, TrainConfig
from kalm.data import KnowledgeGraph
from kalm.durable import (
    RunStoreError,
    append_jsonl,
    atomic_torch_save,
    atomic_write_jsonl,
)
from kalm.encoder import Encoder
from kalm.losses import (
    dual_view_logits,
    false_negative_mask,
    info_nce,
    kalm_loss,
    lm_loss_from_hidden,
    self_negative_diagnostics,
)
from kalm.models import (
    attention_implementation,
    cache_argument,
    decoder_of,
    embed_views,
    mixed_precision,
    mixed_precision_backward,
    pooling_of,
    training_attention,
)
from kalm.runs import RETRAIN, Run
from kalm.views import Collator, KaLMBatch, ViewBuilder, training_examples

__all__ = [
    "KaLMModule",
    "StepResult",
    "Trainer",
    "TrainingDiverged",
    "attach_lora",
    "check_processes",
    "curve_steps",
    "gather_with_grad",
    "process_state",
    "total_steps",
]


def attach_lora(model: nn.Module, cfg: TrainConfig) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters (rank, alpha, dropout, targets from the profile):
    a causal LM's as a causal LM, an encoder's (mean pooling) as a feature extractor."""
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        task_type="CAUSAL_LM" if pooling_of(model) == "last" else "FEATURE_EXTRACTION",
    )
    return get_peft_model(model, lora)


def total_steps(cfg: TrainConfig, num_examples: int) -> int:
    """Optimiser steps of a run: ``max_steps`` if set, else ``epochs`` over the examples in
    global batches (:attr:`~kalm.config.TrainConfig.global_batch_size`)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * (num_examples // cfg.global_batch_size)))


def curve_steps(steps: int, points: int) -> frozenset[int]:
    """The steps after which a learning curve of ``points`` points is measured: before the
    first step and at ``points`` evenly spaced step counts up to the last (fewer when the run
    has fewer steps than points); none for ``points`` = 0."""
    if points <= 0:
        return frozenset()
    return frozenset({0, *(round(steps * k / points) for k in range(1, points + 1))})


Probe = Callable[[Encoder], dict[str, float]]
"""A learning-curve measurement: the numbers of the model behind an encoder. Evaluation code,
which the trainer does not import, passes one in (``kalm.evaluate.protocol.ValidationProbe``)."""


def process_state() -> PartialState:
    """This process's place in its launch (a single process without a launcher).

    Created as the trainer's Accelerator is: without CUDA, accelerate joins the processes of
    ``torchrun`` or ``accelerate launch`` (over gloo) only when told it runs on the CPU, and
    otherwise takes every process for a lone one.
    """
    return PartialState(cpu=not torch.cuda.is_available())


def check_processes(cfg: TrainConfig, processes: int) -> None:
    """Refuse to train a run on another number of processes than ``train.processes``.

    The processes set the global batch, hence the steps, the schedule and the run key; a run
    resumed or trained on another number would silently be another run under the same name.
    """
    if cfg.processes != processes:
        raise ConfigError(
            f"the run is configured for train.processes = {cfg.processes} (a global batch of "
            f"{cfg.global_batch_size}) but this launch has {processes} process(es). Launch it "
            f"on {cfg.processes}: `accelerate launch --num_processes {cfg.processes} -m "
            "kalm.train ...` or `torchrun --nproc_per_node ... -m kalm.train ...` (which sets "
            f"processes from the launch), or set processes={processes} for another run"
        )


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` over all processes, keeping the gradient path to the local part.

    With it, in-batch negatives come from the global batch (the recipe used per-device ones).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


class KaLMModule(nn.Module):
    """One forward for a whole KaLM step: hr view, tail view and, optionally, the LM prompt and
    the heads' tail views (self-negatives trained through, as in SimKGC).

    The views run each as a batch of its own, or as one batch through the decoder
    (:func:`~kalm.models.embed_views`) when ``merge_views`` is set: the same embeddings. One
    batch makes a third of the operator calls, but padding every view to the widest one
    computes ~18% more tokens. ``benchmarks/bench_training.py`` times both: on the CPU it was
    slower in three of four side-by-side measurements (fp32 twice, bf16 once) and faster in one
    (bf16), within the noise of a shared machine, so it stays off until a quiet measurement
    says otherwise.
    """

    merge_views: bool = False

    def __init__(self, model: PeftModel, learnable_tau: bool, tau: float):
        super().__init__()
        self.model = model
        # log(1/tau), as in the recipe; learnable only if asked (the recipe's never was).
        self.log_inv_tau = nn.Parameter(
            torch.tensor(math.log(1.0 / tau)), requires_grad=learnable_tau
        )
        # transformers 5 renamed `past_key_values` to `cache` (argument and output field).
        self._cache_argument = cache_argument(decoder_of(model))

    def forward(
        self,
        hr_ids: torch.Tensor,
        hr_mask: torch.Tensor,
        t_ids: torch.Tensor,
        t_mask: torch.Tensor,
        lm_ids: torch.Tensor | None = None,
        lm_mask: torch.Tensor | None = None,
        lm_prefix: torch.Tensor | None = None,
        head_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        views = [(hr_ids, hr_mask), (t_ids, t_mask)]
        if head_ids is not None and head_mask is not None:
            views.append((head_ids, head_mask))
        if self.merge_views:
            embeddings = embed_views(self.model, views)
        else:
            embeddings = [e for view in views for e in embed_views(self.model, [view])]
        hidden = None
        if lm_ids is not None and lm_mask is not None:
            hidden = self.lm_hidden(lm_ids, lm_mask, lm_prefix)
        head = embeddings[2] if len(embeddings) == 3 else None
        return embeddings[0], embeddings[1], hidden, head

    def lm_hidden(
        self, ids: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final hidden states of the LM prompts ``ids`` (after ``prefix``, if given).

        A ``(1, P)`` prefix shared by every prompt runs once; its keys and values, repeated for
        each row, serve as the attention cache of the rows. This is the same computation as
        running every full prompt (the gradient reaches the prefix through the cache), for
        (B - 1) P fewer tokens.
        """
        decoder = decoder_of(self.model)
        if prefix is None:
            return decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        name = self._cache_argument
        cache = getattr(decoder(input_ids=prefix, use_cache=True), name)
        cache.batch_repeat_interleave(len(ids))
        full_mask = torch.cat([mask.new_ones(len(ids), prefix.shape[1]), mask], dim=1)
        return decoder(input_ids=ids, attention_mask=full_mask, **{name: cache}).last_hidden_state


_DIVERGED = (
    "The run is not marked done and its last good checkpoint is kept; lower lr or change "
    "tau, margin or lam, which starts a run of its own."
)


class TrainingDiverged(ArithmeticError):
    """A training loss or the adapter became NaN or inf; the message names the step."""


@dataclass(frozen=True)
class StepResult:
    """What one optimiser step computed: the loss components (``l_exp``, ``l_imp``, ``total``,
    ``tau``), the self-negative diagnostics (empty without self-negatives; see
    :func:`~kalm.losses.self_negative_diagnostics`), the seconds spent in forward + loss,
    backward and the optimiser, and the learning rate the optimiser step used."""

    losses: dict[str, torch.Tensor]
    seconds: dict[str, float]
    diagnostics: dict[str, float]
    lr: float


# The entries of a training checkpoint that a resume reads (those of Trainer.state_dict).
_CHECKPOINT_KEYS = frozenset(
    {"step", "adapter", "log_inv_tau", "optimizer", "scheduler", "rng_cpu", "rng_cuda"}
)


class Trainer:
    """Trains one run directory to completion, resuming from its checkpoint if there is one."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        kg: KnowledgeGraph,
        cfg: RunConfig,
        run: Run,
        accelerator: Accelerator | None = None,
        probe: Probe | None = None,
    ):
        self.cfg, self.tcfg, self.kg, self.run = cfg, cfg.train, kg, run
        self.probe = probe
        self.tokenizer = tokenizer
        self.accelerator = accelerator or Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision="bf16" if self.tcfg.precision == "bf16" else "no",
        )
        check_processes(self.tcfg, self.accelerator.num_processes)
        torch.manual_seed(cfg.seed)
        if getattr(model, "is_loaded_in_8bit", False):
            # As in the recipe: frozen int8 weights, the other weights (norms, embeddings, LM
            # head) in fp32, and inputs that carry gradients through checkpointed layers.
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=self.tcfg.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        peft_model = attach_lora(model, self.tcfg)
        if self.tcfg.gradient_checkpointing:
            peft_model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            peft_model.enable_input_require_grads()
        peft_model.train()
        self.module = KaLMModule(peft_model, self.tcfg.learnable_tau, self.tcfg.tau)
        self.views = ViewBuilder.from_config(kg, tokenizer, cfg)
        triples = kg.train
        if self.tcfg.train_subset:
            pick = np.random.default_rng(cfg.seed).permutation(len(triples))[
                : self.tcfg.train_subset
            ]
            triples = triples[np.sort(pick)]
        self.examples = training_examples(triples, kg.num_relations)
        self.lengths = self.views.view_lengths(self.examples)
        self.collator = Collator(
            self.views,
            self.examples,
            kg.known_answers(("train",)),
            lm_examples=self.tcfg.lm_examples if self.tcfg.lam > 0 else 0,
            max_prompt_tokens=self.tcfg.max_prompt_tokens,
            # The prompts' shared prefix runs once through an attention cache, which gradient
            # checkpointing does not support (transformers then turns the cache off).
            share_prefix=not self.tcfg.gradient_checkpointing,
            self_negatives=self.tcfg.self_negatives,
        )
        self.steps = total_steps(self.tcfg, len(self.examples))
        self.curve_at = curve_steps(self.steps, self.tcfg.curve_points) if probe else frozenset()
        params = [p for p in self.module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.tcfg.lr, weight_decay=self.tcfg.weight_decay)
        # The schedule counts optimiser steps of the global batch. It is not handed to
        # accelerate, whose wrapper would step it once per process at every optimiser step.
        self.scheduler = get_cosine_schedule_with_warmup(
            optimizer, self.tcfg.warmup_steps, self.steps
        )
        self.module, self.optimizer = self.accelerator.prepare(self.module, optimizer)
        self.encoder = Encoder(self.peft_model, self.views)
        self.attention = training_attention(self.accelerator.device)
        self.step_count = 0
        self.diagnostics: dict[str, float] = {}
        # Sessions of this run before the current one (from the checkpoint), and where and when
        # the current one started (set by fit).
        self._earlier_sessions: list[dict[str, float]] = []
        self._session_start = 0
        self._session_clock = time.perf_counter()
        self._curve_seconds = 0.0  # of the current session, kept out of its training seconds
        self._curve_done: set[int] = set()  # steps whose curve point the run holds

    @property
    def peft_model(self) -> PeftModel:
        """The LoRA-wrapped model (unwrapped from any distributed wrapper)."""
        return self.accelerator.unwrap_model(self.module).model

    # ----------------------------------------------------------------------------- one step
    def collate(self, indices: np.ndarray) -> KaLMBatch:
        """The batch of the training examples at ``indices``."""
        return self.collator.collate(indices)

    def loss(self, batch: KaLMBatch) -> dict[str, torch.Tensor]:
        """KaLM loss components of one batch (and the self-negative diagnostics, as floats in
        ``self.diagnostics``).

        Every matmul (both views, the self-negatives, the LM prompts and the LM head at response
        positions) runs under one :func:`~kalm.models.mixed_precision` context, so a bf16 base
        never meets an fp32 activation; the losses themselves are computed in fp32. Attention
        runs in ``self.attention`` (:func:`~kalm.models.training_attention` of the device; None
        keeps the model's own).
        """
        with (
            mixed_precision(self.peft_model),
            attention_implementation(self.peft_model, self.attention),
        ):
            return self._loss(batch)

    def _loss(self, batch: KaLMBatch) -> dict[str, torch.Tensor]:
        device = self.accelerator.device
        b = batch.to(device)
        lm, heads = b.lm, b.self_negative
        trained_heads = heads is not None and self.tcfg.self_negative_grad
        hr_emb, t_emb, hidden, extra = self.module(
            b.hr.input_ids,
            b.hr.attention_mask,
            b.tail.input_ids,
            b.tail.attention_mask,
            lm.input_ids if lm else None,
            lm.attention_mask if lm else None,
            b.lm_prefix,
            heads.input_ids if trained_heads else None,
            heads.attention_mask if trained_heads else None,
        )
        fn_mask = b.false_negative_mask
        extra_mask = None
        if heads is not None:
            if not trained_heads:
                with torch.no_grad():
                    extra = self.encoder.embed(heads)
            extra_mask = b.self_negative_mask
        if self.tcfg.gather_negatives:
            # Every process's rows, in rank order: the micro-batches of one step, each once.
            hr_emb, t_emb = gather_with_grad(hr_emb), gather_with_grad(t_emb)
            fn_mask = self._global_mask(batch.tails, batch.known, fn_mask)
            if extra is not None and extra_mask is not None:
                # A constant head view is gathered without gradient, a trained one with it.
                extra = gather_with_grad(extra) if trained_heads else self._gather(extra)
                extra_mask = self._gather(extra_mask)
        tau = torch.exp(-self.accelerator.unwrap_model(self.module).log_inv_tau)
        row_logits, col_logits = dual_view_logits(
            hr_emb,
            t_emb,
            tau=tau,
            margin=self.tcfg.margin,
            false_negative_mask=fn_mask,
            extra_negatives=extra,
            extra_mask=extra_mask,
        )
        l_exp = info_nce(row_logits, col_logits)
        self.diagnostics = (
            {}
            if extra is None
            else self_negative_diagnostics(
                row_logits, margin_logit=self.tcfg.margin / tau, extra_mask=extra_mask
            )
        )
        l_imp = torch.zeros((), device=device)
        if hidden is not None and lm is not None:
            lm_head = self.peft_model.get_output_embeddings()
            l_imp = lm_loss_from_hidden(
                hidden, lm_head, lm.input_ids, lm.attention_mask, b.prompt_lengths
            )
        return {
            "l_exp": l_exp,
            "l_imp": l_imp,
            "total": kalm_loss(l_exp, l_imp, self.tcfg.lam),
            "tau": tau,
        }

    def step(self, batch: KaLMBatch | Sequence[KaLMBatch]) -> StepResult:
        """One optimiser step on this process's micro-batches of a global batch (one batch, or
        ``gradient_accumulation_steps`` of them): loss, backward, clipping, optimiser, schedule.

        Each micro-batch's loss is divided by their number before its backward, so the
        gradient is their mean; DDP averages it over the processes in the last backward (the
        others skip that all-reduce). It is clipped to ``max_grad_norm`` when that is set. The
        losses returned are means over micro-batches and processes, the same on every process.
        """
        micro = [batch] if isinstance(batch, KaLMBatch) else list(batch)
        seconds = {"forward": 0.0, "backward": 0.0}
        sums: dict[str, torch.Tensor] = {}
        diagnosed: list[dict[str, float]] = []  # the self-negative diagnostics of each part
        started = time.perf_counter()
        for i, part in enumerate(micro):
            last = i == len(micro) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.module):
                t0 = time.perf_counter()
                parts = self.loss(part)
                if self.diagnostics:
                    diagnosed.append(self.diagnostics)
                t1 = time.perf_counter()
                # Gradient checkpointing recomputes the forward here: with the same attention.
                with (
                    mixed_precision_backward(self.peft_model),
                    attention_implementation(self.peft_model, self.attention),
                ):
                    self.accelerator.backward(parts["total"] / len(micro))
            seconds["forward"] += t1 - t0
            seconds["backward"] += time.perf_counter() - t1
            for name, value in parts.items():
                sums[name] = sums.get(name, 0) + value.detach() / len(micro)
        t2 = time.perf_counter()
        if self.tcfg.max_grad_norm > 0:
            params = [p for p in self.module.parameters() if p.requires_grad]
            self.accelerator.clip_grad_norm_(params, self.tcfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]  # the rate of this step; the schedule moves on
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        self.step_count += 1
        seconds |= {"optimizer": t3 - t2, "total": t3 - started}
        losses = {name: self.accelerator.reduce(value, "mean") for name, value in sums.items()}
        diagnostics = (
            {name: float(np.nanmean([d[name] for d in diagnosed])) for name in diagnosed[0]}
            if diagnosed
            else {}
        )
        return StepResult(losses, seconds, diagnostics, lr)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of every process, concatenated in rank order, without gradient (booleans are
        sent as bytes, which every backend gathers)."""
        flag = x.dtype == torch.bool
        sent = x.to(self.accelerator.device, torch.uint8 if flag else x.dtype)
        out = self.accelerator.gather(sent)
        return out.bool() if flag else out

    def _global_mask(
        self, tails: torch.Tensor, known: torch.Tensor, local: torch.Tensor
    ) -> torch.Tensor:
        """False-negative mask of the gathered batch: rows of the whole world, columns likewise."""
        all_tails, all_known = self._gather(tails).cpu(), self._gather(known).cpu()
        return false_negative_mask(all_tails, all_known).to(local.device)

    # ----------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume: adapter, tau, optimiser, scheduler, RNG, step."""
        unwrapped = self.accelerator.unwrap_model(self.module)
        return {
            "step": self.step_count,
            "adapter": get_peft_model_state_dict(unwrapped.model),
            "log_inv_tau": unwrapped.log_inv_tau.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def save_checkpoint(self) -> None:
        """Write the training state atomically (an interrupted write leaves the old one).

        A state whose adapter is no longer finite is never written: the last good checkpoint
        stays, and training stops with :class:`TrainingDiverged`.
        """
        state = self.state_dict()
        # Checked by every process (they hold the same adapter), so all of them stop together.
        bad = [name for name, t in state["adapter"].items() if not torch.isfinite(t).all()]
        if bad:
            raise TrainingDiverged(
                f"{self.run.path}: training diverged at step {self.step_count}: "
                f"{len(bad)} adapter tensors (first {bad[0]}) hold NaN or inf. {_DIVERGED}"
            )
        if not self.accelerator.is_main_process:
            return
        state["sessions"] = self.sessions()
        atomic_torch_save(state, self.run.checkpoint_path)

    def load_checkpoint(self) -> None:
        """Restore a saved training state if the run directory has one.

        An unreadable checkpoint, or one without the entries of :meth:`state_dict`, raises
        RunStoreError naming it: the run is neither resumed from a wrong state nor restarted
        silently.
        """
        path = self.run.checkpoint_path
        if not path.is_file():
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
            raise RunStoreError(
                self.run.path, path, f"cannot be read ({type(err).__name__}: {err})", RETRAIN
            ) from err
        missing = sorted(_CHECKPOINT_KEYS - set(state)) if isinstance(state, dict) else ["all"]
        if missing:
            raise RunStoreError(
                self.run.path,
                path,
                f"is not a training checkpoint: it lacks the entries {', '.join(missing)}",
                f"Delete it to train the run from its first step. {RETRAIN}",
            )
        unwrapped = self.accelerator.unwrap_model(self.module)
        _set_adapter(unwrapped.model, state["adapter"])
        with torch.no_grad():
            unwrapped.log_inv_tau.copy_(state["log_inv_tau"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"]:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.step_count = int(state["step"])
        self._earlier_sessions = list(state.get("sessions", []))

    def sessions(self) -> list[dict[str, float]]:
        """The training sessions behind the current state: the step each resumed from, the
        steps it added, its training seconds (up to now, or up to its last checkpoint) and the
        seconds its learning-curve points took, which the training seconds leave out."""
        current = {
            "resumed_from": self._session_start,
            "steps": self.step_count - self._session_start,
            "seconds": time.perf_counter() - self._session_clock - self._curve_seconds,
            "curve_seconds": self._curve_seconds,
        }
        return [*self._earlier_sessions, current]

    # ------------------------------------------------------------------------------ the loop
    def fit(self, *, stop_after: int | None = None, progress: bool = True) -> PeftModel:
        """Train to ``self.steps`` (or pause after ``stop_after`` steps, for resume tests).

        A loss that is not finite stops training with :class:`TrainingDiverged`, before
        anything of that step is logged or checkpointed.
        """
        self._session_clock = time.perf_counter()
        self._curve_seconds = 0.0
        self.run.path.mkdir(parents=True, exist_ok=True)
        self.load_checkpoint()
        self._session_start = self.step_count
        main = self.accelerator.is_main_process
        if main:  # what was logged after the checkpoint is recomputed identically; drop it
            log = [r for r in self.run.train_log(repair=True) if r["step"] <= self.step_count]
            atomic_write_jsonl(self.run.train_log_path, log)
            curve = self.run.learning_curve(repair=True)
            curve = [r for r in curve if r["step"] <= self.step_count]
            if curve or self.run.curve_path.exists():
                atomic_write_jsonl(self.run.curve_path, curve)
            self._curve_done = {int(r["step"]) for r in curve}
        if self.step_count in self.curve_at:
            self._curve_point()
        end = self.steps if stop_after is None else min(self.steps, stop_after)
        batches = iterate_batches(
            self.lengths, self.tcfg.global_batch_size, self.cfg.seed, self.step_count
        )
        self.module.train()
        # Closed on any exit, so an error is printed on a line of its own.
        with tqdm(
            total=self.steps,
            initial=self.step_count,
            desc="KaLM training",
            disable=not (progress and main),
        ) as bar:
            while self.step_count < end:
                record = self._logged_step(next(batches)[1])
                if main:
                    append_jsonl(self.run.train_log_path, record)
                bar.set_postfix(
                    L_exp=f"{record['L_exp']:.3f}",
                    L_imp=f"{record['L_imp']:.3f}",
                    ex_s=f"{record['examples_per_s']:.1f}",
                )
                bar.update(1)
                if self.step_count in self.curve_at:
                    self._curve_point()
                if self.step_count % self.tcfg.checkpoint_every == 0 or self.step_count == end:
                    self.save_checkpoint()
        self.peft_model.eval()
        return self.peft_model

    def _curve_point(self) -> None:
        """Measure the learning curve at the current step (the main process, once per step;
        the others wait) and append it to the run's curve, with the examples and the training
        seconds so far. Its own seconds are recorded too, and kept out of the training time."""
        if self.accelerator.is_main_process and self.step_count not in self._curve_done:
            assert self.probe is not None  # curve_at is empty without one
            trained_seconds = sum(s["seconds"] for s in self.sessions())
            started = time.perf_counter()
            point = self.probe(Encoder.from_config(self.peft_model, self.views, self.cfg))
            took = time.perf_counter() - started
            self._curve_seconds += took
            row = {
                "step": self.step_count,
                "examples": self.step_count * self.tcfg.global_batch_size,
                "train_seconds": trained_seconds,
                "curve_seconds": took,
                **point,
            }
            append_jsonl(self.run.curve_path, row)
            self._curve_done.add(self.step_count)
        self.accelerator.wait_for_everyone()

    def _logged_step(self, indices: np.ndarray) -> dict[str, float]:
        """One optimiser step on the global batch ``indices`` (this process's share of it) and
        its log record; a loss that is not finite raises :class:`TrainingDiverged`."""
        started = time.perf_counter()
        local = micro_batches(
            indices,
            rank=self.accelerator.process_index,
            processes=self.accelerator.num_processes,
            accumulation=self.tcfg.gradient_accumulation_steps,
        )
        result = self.step([self.collate(part) for part in local])
        parts = {k: v.item() for k, v in result.losses.items()}
        record = {
            "step": self.step_count,
            "L_exp": parts["l_exp"],
            "L_imp": parts["l_imp"],
            "total": parts["total"],
            "lr": result.lr,
            "tau": parts["tau"],
            "examples_per_s": len(indices) / (time.perf_counter() - started),
            **result.diagnostics,
        }
        if not all(math.isfinite(record[k]) for k in ("L_exp", "L_imp", "total")):
            losses = ", ".join(f"{k}={record[k]}" for k in ("L_exp", "L_imp", "total"))
            raise TrainingDiverged(
                f"{self.run.path}: training diverged at step {self.step_count}: the loss is "
                f"not finite ({losses}). {_DIVERGED}"
            )
        return record
