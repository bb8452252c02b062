"""The KaLM training loop: LoRA on a causal LM, ``L_exp + lam * L_imp``, exact checkpoint/resume.

One code path serves CPU, one GPU and several (``accelerate launch``): the two views and the
triple-completion prompt go through a single ``forward`` of :class:`KaLMModule`, which is what
DDP/FSDP wrap, so gradient synchronisation sees every parameter use.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft import set_peft_model_state_dict as _set_adapter
from torch import nn
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from kalm.config import RunConfig, TrainConfig
from kalm.data import KnowledgeGraph
from kalm.losses import (
    explicit_loss,
    false_negative_mask,
    kalm_loss,
    lm_loss_from_hidden,
    self_negative_mask,
)
from kalm.models import decoder_of, embed_batch
from kalm.views import (
    ViewBuilder,
    iterate_batches,
    pad_batch,
    split_shared_prefix,
    training_examples,
)

__all__ = ["KaLMModule", "Trainer", "attach_lora", "gather_with_grad", "total_steps"]


def attach_lora(model: nn.Module, cfg: TrainConfig) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters (rank, alpha, dropout, targets from the profile)."""
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def total_steps(cfg: TrainConfig, num_examples: int) -> int:
    """Optimiser steps of a run: ``max_steps`` if set, else ``epochs`` over the examples."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * (num_examples // cfg.batch_size)))


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` over all processes, keeping the gradient path to the local part.

    With it, in-batch negatives come from the global batch (the recipe used per-device ones).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


class KaLMModule(nn.Module):
    """One forward for a whole KaLM step: hr view, tail view and (optionally) the LM prompt."""

    def __init__(self, model: PeftModel, learnable_tau: bool, tau: float):
        super().__init__()
        self.model = model
        # log(1/tau), as in the recipe; learnable only if asked (the recipe's never was).
        self.log_inv_tau = nn.Parameter(
            torch.tensor(math.log(1.0 / tau)), requires_grad=learnable_tau
        )
        # transformers 5 renamed `past_key_values` to `cache` (argument and output field).
        forward = inspect.signature(decoder_of(model).forward).parameters
        self._cache_argument = "cache" if "cache" in forward else "past_key_values"

    def forward(
        self,
        hr_ids: torch.Tensor,
        hr_mask: torch.Tensor,
        t_ids: torch.Tensor,
        t_mask: torch.Tensor,
        lm_ids: torch.Tensor | None = None,
        lm_mask: torch.Tensor | None = None,
        lm_prefix: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        hr = embed_batch(self.model, hr_ids, hr_mask)
        t = embed_batch(self.model, t_ids, t_mask)
        hidden = None
        if lm_ids is not None and lm_mask is not None:
            hidden = self.lm_hidden(lm_ids, lm_mask, lm_prefix)
        return hr, t, hidden

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


class Trainer:
    """Trains one run directory to completion, resuming from its checkpoint if there is one."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        kg: KnowledgeGraph,
        cfg: RunConfig,
        run_dir: Path,
        accelerator: Accelerator | None = None,
    ):
        self.cfg, self.tcfg, self.kg, self.run_dir = cfg, cfg.train, kg, Path(run_dir)
        self.tokenizer = tokenizer
        self.accelerator = accelerator or Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision="bf16" if torch.cuda.is_available() else "no",
        )
        torch.manual_seed(cfg.seed)
        peft_model = attach_lora(model, self.tcfg)
        if self.tcfg.gradient_checkpointing:
            peft_model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            peft_model.enable_input_require_grads()
        peft_model.train()
        self.module = KaLMModule(peft_model, self.tcfg.learnable_tau, self.tcfg.tau)
        self.views = ViewBuilder(kg, tokenizer, self.tcfg.max_entity_tokens)
        triples = kg.train
        if self.tcfg.train_subset:
            pick = np.random.default_rng(cfg.seed).permutation(len(triples))[
                : self.tcfg.train_subset
            ]
            triples = triples[np.sort(pick)]
        self.examples = training_examples(triples, kg.num_relations)
        self.lengths = self.views.view_lengths(self.examples)
        # The prompts' shared prefix runs once through an attention cache, which gradient
        # checkpointing does not support (transformers then turns the cache off).
        self.share_prefix = not self.tcfg.gradient_checkpointing
        self.known = kg.known_answers(("train",))
        self.steps = total_steps(self.tcfg, len(self.examples))
        params = [p for p in self.module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.tcfg.lr, weight_decay=self.tcfg.weight_decay)
        scheduler = get_cosine_schedule_with_warmup(optimizer, 0, self.steps)
        self.module, self.optimizer, self.scheduler = self.accelerator.prepare(
            self.module, optimizer, scheduler
        )
        self.step = 0

    @property
    def peft_model(self) -> PeftModel:
        """The LoRA-wrapped causal LM (unwrapped from any distributed wrapper)."""
        return self.accelerator.unwrap_model(self.module).model

    # ----------------------------------------------------------------------------- one step
    def lm_prompts(
        self, heads: list[int], rels: list[int], tails: list[int]
    ) -> tuple[list[int], list[list[int]], list[int]]:
        """Token ids of the triple-completion prompts of a batch's first ``lm_examples`` triples
        (none when ``lam`` is 0): their shared prefix (empty unless ``share_prefix``), the rows
        after it and the prompt lengths counted after it."""
        k = self.tcfg.lm_examples if self.tcfg.lam > 0 else 0
        if k == 0:
            return [], [], []
        rows, plens = self.views.completion_ids(
            heads[:k], rels[:k], tails[:k], self.tcfg.max_prompt_tokens
        )
        return split_shared_prefix(rows, plens) if self.share_prefix else ([], rows, plens)

    def loss(self, batch: np.ndarray) -> dict[str, torch.Tensor]:
        """KaLM loss components of one batch of example indices."""
        device = self.accelerator.device
        heads, rels, tails = (torch.from_numpy(c) for c in self.examples[batch].T)
        pad = self.tokenizer.pad_token_id
        hr = pad_batch(self.views.hr_ids(heads.tolist(), rels.tolist()), pad)
        t = pad_batch(self.views.tail_ids(tails.tolist()), pad)
        lm_ids = lm_mask = prompt_lengths = lm_prefix = None
        prefix, rows, plens = self.lm_prompts(heads.tolist(), rels.tolist(), tails.tolist())
        if rows:
            if prefix:
                lm_prefix = torch.tensor([prefix], device=device)
            lm = pad_batch(rows, pad)
            lm_ids, lm_mask = lm.input_ids.to(device), lm.attention_mask.to(device)
            prompt_lengths = torch.tensor(plens, device=device)
        hr_emb, t_emb, hidden = self.module(
            hr.input_ids.to(device),
            hr.attention_mask.to(device),
            t.input_ids.to(device),
            t.attention_mask.to(device),
            lm_ids,
            lm_mask,
            lm_prefix,
        )
        known = self.known.mask(heads, rels, self.kg.num_entities)
        fn_mask = false_negative_mask(tails, known).to(device)
        extra = extra_mask = None
        if self.tcfg.self_negatives:
            with torch.no_grad():
                own = pad_batch(self.views.tail_ids(heads.tolist()), pad)
                extra = embed_batch(
                    self.peft_model, own.input_ids.to(device), own.attention_mask.to(device)
                )
            extra_mask = self_negative_mask(heads, known).to(device)
        if self.tcfg.gather_negatives:
            hr_emb, t_emb = gather_with_grad(hr_emb), gather_with_grad(t_emb)
            fn_mask = self._global_mask(tails, known, fn_mask)
            extra, extra_mask = (
                (None, None)
                if extra is None
                else (gather_with_grad(extra), gather_with_grad(extra_mask))
            )
        tau = torch.exp(-self.accelerator.unwrap_model(self.module).log_inv_tau)
        l_exp = explicit_loss(
            hr_emb,
            t_emb,
            tau=tau,
            margin=self.tcfg.margin,
            false_negative_mask=fn_mask,
            extra_negatives=extra,
            extra_mask=extra_mask,
        )
        l_imp = torch.zeros((), device=device)
        if hidden is not None:
            lm_head = self.peft_model.get_output_embeddings()
            l_imp = lm_loss_from_hidden(hidden, lm_head, lm_ids, lm_mask, prompt_lengths)
        return {
            "l_exp": l_exp,
            "l_imp": l_imp,
            "total": kalm_loss(l_exp, l_imp, self.tcfg.lam),
            "tau": tau,
        }

    def _global_mask(
        self, tails: torch.Tensor, known: torch.Tensor, local: torch.Tensor
    ) -> torch.Tensor:
        """False-negative mask of the gathered batch: rows of the whole world, columns likewise."""
        all_tails = gather_with_grad(tails.to(self.accelerator.device)).cpu()
        all_known = self.accelerator.gather(known.to(self.accelerator.device)).cpu()
        return false_negative_mask(all_tails, all_known).to(local.device)

    # ----------------------------------------------------------------------- checkpointing
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume: adapter, tau, optimiser, scheduler, RNG, step."""
        unwrapped = self.accelerator.unwrap_model(self.module)
        return {
            "step": self.step,
            "adapter": get_peft_model_state_dict(unwrapped.model),
            "log_inv_tau": unwrapped.log_inv_tau.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def save_checkpoint(self) -> None:
        """Write the training state atomically (an interrupted write leaves the old one)."""
        if not self.accelerator.is_main_process:
            return
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, self.checkpoint_path)

    def load_checkpoint(self) -> None:
        """Restore a saved training state if the run directory has one."""
        if not self.checkpoint_path.is_file():
            return
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        unwrapped = self.accelerator.unwrap_model(self.module)
        _set_adapter(unwrapped.model, state["adapter"])
        with torch.no_grad():
            unwrapped.log_inv_tau.copy_(state["log_inv_tau"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"]:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.step = int(state["step"])

    # ------------------------------------------------------------------------------ the loop
    def fit(self, *, stop_after: int | None = None, progress: bool = True) -> PeftModel:
        """Train to ``self.steps`` (or pause after ``stop_after`` steps, for resume tests)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.load_checkpoint()
        log_path = self.run_dir / "train_log.jsonl"
        _truncate_log(log_path, self.step)
        end = self.steps if stop_after is None else min(self.steps, stop_after)
        batches = iterate_batches(self.lengths, self.tcfg.batch_size, self.cfg.seed, self.step)
        bar = tqdm(total=self.steps, initial=self.step, desc="KaLM training", disable=not progress)
        self.module.train()
        with log_path.open("a") as log:
            while self.step < end:
                _, batch = next(batches)
                started = time.perf_counter()
                parts = self.loss(batch)
                self.accelerator.backward(parts["total"])
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                rate = len(batch) / (time.perf_counter() - started)
                record = {
                    "step": self.step,
                    "L_exp": parts["l_exp"].item(),
                    "L_imp": parts["l_imp"].item(),
                    "total": parts["total"].item(),
                    "lr": self.scheduler.get_last_lr()[0],
                    "tau": parts["tau"].item(),
                    "examples_per_s": rate,
                }
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(
                    L_exp=f"{record['L_exp']:.3f}",
                    L_imp=f"{record['L_imp']:.3f}",
                    ex_s=f"{rate:.1f}",
                )
                bar.update(1)
                if self.step % self.tcfg.checkpoint_every == 0 or self.step == end:
                    self.save_checkpoint()
        bar.close()
        self.peft_model.eval()
        return self.peft_model


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step (they are recomputed identically)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
