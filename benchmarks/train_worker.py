"""Train a few steps of the benchmark's settings with whatever ``kalm`` is on ``PYTHONPATH``.

``bench_training.speedup_vs_before`` runs this in subprocesses, alternately with this tree and
with a checkout of the code before the fast step, so both measure under the same load. It uses
only what both versions have (``resolve``, ``load_model``, ``Trainer.fit``, the run's log), and
resumes the run directory it is given, so rounds of steps add up to one curve.

    python benchmarks/train_worker.py RUN_DIR STEPS PRECISION 'JSON settings'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(run_dir: str, steps: int, precision: str, settings: str) -> None:
    import torch

    import kalm
    from kalm.config import resolve
    from kalm.data import load_kg
    from kalm.models import load_model
    from kalm.runs import Run
    from kalm.trainer import Trainer

    torch.set_num_threads(2)
    cfg = resolve(profile="cpu", precision=precision, **json.loads(settings))
    model, tokenizer = load_model(cfg.model, precision=precision)
    run = Run(Path(run_dir))
    trainer = Trainer(model, tokenizer, load_kg(cfg.dataset), cfg, run)
    done = len(run.train_log()) if run.train_log_path.is_file() else 0
    trainer.fit(stop_after=done + steps, progress=False)
    print(json.dumps({"kalm": kalm.__file__, "log": run.train_log()[done:]}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
