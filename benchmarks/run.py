"""Throughput and MFU benchmarks of kalm against a matmul peak measured in the same run.

    .venv/bin/python benchmarks/run.py                 # everything (waits for a quiet machine)
    .venv/bin/python benchmarks/run.py --quick         # small sizes, no waiting
    .venv/bin/python benchmarks/run.py --only training # one benchmark (plus the peak)
    .venv/bin/python benchmarks/run.py --full-eval     # really run the full WN18RR evaluation

Each benchmark prints its numbers and writes ``benchmarks/results/<name>.json`` (``.quick.json``
for ``--quick``) with the load of the machine while it ran; ``summary.json`` holds the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from bench_common import RESULTS, THREADS, Workload, measure_load, save, wait_until_quiet

from kalm.durable import atomic_write_text

BENCHMARKS = ("peak", "encoding", "precision", "compile", "training", "recipe", "evaluation")
QUIET_LOAD = 1.0


def _runners(
    w: Workload, args: argparse.Namespace, bf16_peak: float
) -> dict[str, Callable[[], dict[str, Any]]]:
    import bench_compile
    import bench_encoding
    import bench_evaluation
    import bench_precision
    import bench_training

    batch = w.cfg.eval.entity_batch_size
    return {
        "encoding": lambda: bench_encoding.run(w, args.quick),
        "precision": lambda: bench_precision.run(w, args.quick, bf16_peak),
        "compile": lambda: bench_compile.run(batch, args.quick, args.compile_limit),
        "training": lambda: bench_training.run(w, args.quick),
        "recipe": lambda: bench_training.recipe(w, args.quick),
        "evaluation": lambda: bench_evaluation.run(w, args.quick, args.full_eval),
    }


def targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The project's performance targets against what this run measured."""
    rows = []

    def add(name: str, target: str, value: float, met: bool, shown: str) -> None:
        rows.append({"target": name, "goal": target, "measured": value, "shown": shown, "met": met})

    if "encoding" in results:
        best = results["encoding"]["best"]
        add("encoding MFU", ">= 75%", best["mfu"], best["mfu"] >= 0.75, f"{best['mfu']:.1%}")
        pad = best["padding_fraction"]
        add("padding, encoding (best batch)", "<= 10%", pad, pad <= 0.10, f"{pad:.1%}")
    if "training" in results:
        mfu = results["training"]["mfu"]
        add("training step MFU", ">= 60%", mfu, mfu >= 0.60, f"{mfu:.1%}")
        pad = results["training"]["padding_fraction"]
        add("padding, training step", "<= 10%", pad, pad <= 0.10, f"{pad:.1%}")
    if "recipe" in results:
        ratio = results["recipe"]["ratio"]
        add("FLOPs per triple / recipe", "<= 0.70", ratio, ratio <= 0.7, f"{ratio:.3f}")
    for dtype in ("float32", "bfloat16"):
        ev = results.get("evaluation", {}).get(dtype)
        if ev is None:
            continue
        label = "" if ev["kind"] == "measured" else " (estimate)"
        minutes = ev["minutes"]
        add(
            f"full WN18RR KGC evaluation, {dtype}",
            "<= 12 min",
            minutes,
            minutes <= 12,
            f"{minutes:.1f} min{label}",
        )
    return rows


def print_table(rows: list[dict[str, Any]], peak: float, load: tuple[float, ...]) -> None:
    print(f"\npeak {peak:.1f} GFLOP/s, load average at start {load[0]:.2f}")
    print(f"{'target':<32} {'goal':<10} {'measured':<20} met?")
    for row in rows:
        print(
            f"{row['target']:<32} {row['goal']:<10} {row['shown']:<20} "
            f"{'yes' if row['met'] else 'NO'}"
        )


def markdown(rows: list[dict[str, Any]], results: dict[str, dict[str, Any]], peak: dict) -> str:
    """The targets and the main figures as Markdown tables, for the book to include."""
    lines = [
        f"Matmul peak of this run: fp32 {peak['peak_gflops']:.0f} GFLOP/s, "
        f"bf16 {peak['bf16_gflops']:.0f} GFLOP/s ({peak['peak_shape']['shape']}, "
        f"{peak['peak_shape']['tokens']} tokens).",
        "",
        "| target | goal | measured | met |",
        "|---|---|---|---|",
        *(
            f"| {r['target']} | {r['goal']} | {r['shown']} | {'yes' if r['met'] else 'no'} |"
            for r in rows
        ),
    ]
    figures = []
    if "encoding" in results:
        best = results["encoding"]["best"]
        figures.append(
            f"| entity encoding, fp32, batch {best['batch_size']} | "
            f"{best['entities_per_s']:.1f} entities/s, {best['gflops']:.0f} GFLOP/s |"
        )
    if "precision" in results:
        p = results["precision"]
        agree = p["agreement"]
        figures.append(
            f"| entity encoding, bf16 autocast, batch {p['batch_size']} | "
            f"{p['speed']['bfloat16']['entities_per_s']:.1f} entities/s "
            f"({p['bf16_speedup']:.2f}x fp32) |"
        )
        figures.append(
            f"| same KGC evaluation in bf16 vs fp32 ({agree['queries']:,} queries, "
            f"{agree['candidates']:,} candidates) | Spearman {agree['spearman']:.4f}; "
            f"{agree['within_1_percent']:.1%} of ranks within 1%; MRR "
            f"{agree['metrics']['float32']['MRR']:.4f} (fp32) vs "
            f"{agree['metrics']['bfloat16']['MRR']:.4f} (bf16) |"
        )
    if "training" in results:
        t = results["training"]
        figures.append(
            f"| training step, batch {t['batch_size']} | {t['triples_per_s']:.2f} triples/s, "
            f"peak RSS {t['peak_rss_mb_after'] / 1024:.1f} GB |"
        )
    if "recipe" in results:
        r = results["recipe"]
        figures.append(
            f"| FLOPs per training triple | {r['gflop_per_triple']:.1f} GFLOP "
            f"(recipe {r['recipe_gflop_per_triple']:.1f}) |"
        )
    if "compile" in results and "speedup" in results["compile"]:
        c = results["compile"]
        figures.append(
            f"| torch.compile (encoding) | {c['speedup']:.2f}x after "
            f"{c['compile_seconds_first_shape']:.0f} s of compilation |"
        )
    if figures:
        lines += ["", "| measurement | value |", "|---|---|", *figures]
    return "\n".join(lines) + "\n"


def summarise_stored(quick: bool) -> None:
    """Rebuild the summary from the stored result files of the last run of each benchmark (each
    result keeps the peak it was measured against; the header shows the latest peak)."""
    suffix = ".quick.json" if quick else ".json"
    stored = {
        name: json.loads((RESULTS / f"{name}{suffix}").read_text())
        for name in BENCHMARKS
        if (RESULTS / f"{name}{suffix}").is_file()
    }
    if "peak" not in stored:
        raise SystemExit(f"no {RESULTS / ('peak' + suffix)}: run the benchmarks first")
    peak = stored.pop("peak")
    rows = targets(stored)
    print_table(rows, peak["peak_gflops"], tuple(peak["load"]["loadavg_before"]))
    loads = {name: r["load"] for name, r in {"peak": peak, **stored}.items()}
    with measure_load() as load:
        pass
    save(
        "summary",
        quick,
        {"peak_gflops": peak["peak_gflops"], "targets": rows, "loads": loads},
        load,
    )
    atomic_write_text(
        RESULTS / f"summary{'.quick' if quick else ''}.md", markdown(rows, stored, peak)
    )


def profile_misses(w: Workload, results: dict[str, dict[str, Any]], quick: bool) -> dict:
    """torch.profiler top ops of the workloads that missed their MFU target."""
    import bench_encoding
    import bench_profile
    import bench_training

    from kalm.encoder import encode_ids
    from kalm.views import iterate_batches

    out: dict[str, Any] = {}
    if "encoding" in results and results["encoding"]["best"]["mfu"] < 0.75:
        bs = results["encoding"]["best"]["batch_size"]
        ids = w.views.tail_ids(
            bench_encoding.sample_entities(w.kg.num_entities, 64 if quick else bs)
        )
        print("  encoding:")
        out["encoding"] = bench_profile.top_ops(
            lambda: encode_ids(w.model, ids, pad_id=w.tokenizer.pad_token_id, batch_size=bs)
        )
    if "training" in results and results["training"]["mfu"] < 0.60:
        size = results["training"]["batch_size"]
        trainer = bench_training.trainer_for(w, size)
        batch = next(iterate_batches(trainer.lengths, size, 1))[1]
        print("  training step:")
        out["training"] = bench_profile.top_ops(lambda: bench_training.one_step(trainer, batch))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for development")
    parser.add_argument(
        "--only",
        choices=BENCHMARKS,
        action="append",
        help="run only this benchmark (repeatable); the peak always runs",
    )
    parser.add_argument(
        "--full-eval",
        action="store_true",
        help="run the full WN18RR evaluation in bf16 instead of estimating it (~8 min)",
    )
    parser.add_argument(
        "--no-wait", action="store_true", help="do not wait for the load average to drop below 1.0"
    )
    parser.add_argument("--max-wait", type=float, default=30.0, help="minutes to wait for quiet")
    parser.add_argument(
        "--summary-only",
        action="store_true",
        help="measure nothing: rebuild the summary from the stored results/*.json",
    )
    parser.add_argument(
        "--compile-limit",
        type=float,
        default=600.0,
        help="seconds allowed for the torch.compile benchmark",
    )
    args = parser.parse_args()
    if args.summary_only:
        summarise_stored(args.quick)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.stdout.reconfigure(line_buffering=True)
    torch.set_num_threads(THREADS)
    if not (args.quick or args.no_wait) and not wait_until_quiet(
        QUIET_LOAD, poll_seconds=120, max_seconds=args.max_wait * 60
    ):
        print(f"the load average never fell below {QUIET_LOAD}: results are measured under load")

    import bench_peak

    print("== peak")
    with measure_load() as load:
        peak = bench_peak.run(args.quick)
    save("peak", args.quick, peak, load)
    w = Workload(peak["peak_gflops"])
    selected = [b for b in BENCHMARKS[1:] if not args.only or b in args.only]
    runners = _runners(w, args, peak["bf16_gflops"])
    results: dict[str, dict[str, Any]] = {}
    for name in selected:
        print(f"== {name}")
        with measure_load() as load:
            results[name] = runners[name]()
        results[name]["peak_gflops"] = peak["peak_gflops"]
        path = save(name, args.quick, results[name], load)
        print(f"  foreign CPU {load.foreign_cpu_cores:.2f} cores -> {path.name}")
    summarise_stored(args.quick)  # a partial run (--only) keeps the other benchmarks' results
    with measure_load() as load:
        print("== profiles of missed targets")
        profiles = profile_misses(w, results, args.quick)
    if profiles:
        save("profile", args.quick, profiles, load)


if __name__ == "__main__":
    main()
