"""Throughput and MFU benchmarks of kalm, in fp32 and bf16, against the matmul peaks measured in
the same run.

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
from bench_common import (
    BEFORE_SPEEDUP_TARGET,
    ENCODING_MFU_TARGET,
    FULL_EVAL_MINUTES,
    PADDING_TARGET,
    RESULTS,
    SPEEDUP_TARGET,
    THREADS,
    TRAINING_MFU_TARGET,
    TRAINING_SPEEDUP_TARGET,
    Workload,
    measure_load,
    save,
    wait_until_quiet,
)

from kalm.durable import atomic_write_text

BENCHMARKS = (
    "peak",
    "encoding",
    "precision",
    "compile",
    "training",
    "recipe",
    "evaluation",
    "precision_training",
)
QUIET_LOAD = 1.0


def _runners(w: Workload, args: argparse.Namespace) -> dict[str, Callable[[], dict[str, Any]]]:
    import bench_compile
    import bench_encoding
    import bench_evaluation
    import bench_precision
    import bench_precision_training
    import bench_training

    batch = w.cfg.eval.entity_batch_size
    return {
        "encoding": lambda: bench_encoding.run(w, args.quick),
        "precision": lambda: bench_precision.run(w, args.quick),
        "compile": lambda: bench_compile.run(batch, args.quick, args.compile_limit),
        "training": lambda: bench_training.run(w, args.quick),
        "recipe": lambda: bench_training.recipe(w, args.quick),
        "evaluation": lambda: bench_evaluation.run(w, args.quick, args.full_eval),
        "precision_training": lambda: bench_precision_training.run(args.quick),
    }


def targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The project's performance targets against what this run measured."""
    rows = []

    def add(name: str, target: str, value: float, met: bool, shown: str) -> None:
        rows.append({"target": name, "goal": target, "measured": value, "shown": shown, "met": met})

    def at_least(name: str, goal: float, value: float, shown: str) -> None:
        add(name, f">= {shown.format(goal)}", value, value >= goal, shown.format(value))

    if "encoding" in results:
        enc = results["encoding"]
        bs = enc["batch_size"]
        at_least(
            f"encoding bf16 / fp32, batch {bs}", SPEEDUP_TARGET, enc["bf16_speedup"], "{:.1f}x"
        )
        mfu = enc["at_batch_size"]["bf16"]["mfu"]["bf16"]
        at_least(f"encoding MFU, bf16 peak, batch {bs}", ENCODING_MFU_TARGET, mfu, "{:.0%}")
        pad = enc["at_batch_size"]["bf16"]["padding_fraction"]
        add(
            f"padding, encoding, batch {bs}",
            f"<= {PADDING_TARGET:.0%}",
            pad,
            pad <= PADDING_TARGET,
            f"{pad:.1%}",
        )
    if "training" in results:
        tr = results["training"]
        at_least("training bf16 / fp32", TRAINING_SPEEDUP_TARGET, tr["bf16_speedup"], "{:.2f}x")
        mfu = tr["bf16"]["mfu"]["bf16"]
        at_least("training step MFU, bf16 peak", TRAINING_MFU_TARGET, mfu, "{:.0%}")
        if "speedup_vs_before" in tr:
            before = tr["before"]
            at_least(
                f"training bf16 examples/s / before ({before['commit']})",
                BEFORE_SPEEDUP_TARGET,
                tr["speedup_vs_before"],
                "{:.2f}x",
            )
            add(
                f"training loss curve vs before ({before['steps']} steps)",
                before["loss_tolerance"],
                before["largest_loss_difference"]["total"],
                before["curves_within_tolerance"],
                f"largest difference {before['largest_loss_difference']['total']:.4f}",
            )
        pad = tr["bf16"]["padding_fraction"]
        add(
            "padding, training step",
            f"<= {PADDING_TARGET:.0%}",
            pad,
            pad <= PADDING_TARGET,
            f"{pad:.1%}",
        )
    if "recipe" in results:
        ratio = results["recipe"]["ratio"]
        add("FLOPs per triple / recipe", "<= 0.70", ratio, ratio <= 0.7, f"{ratio:.3f}")
    if "evaluation" in results:
        ev = results["evaluation"]["bf16"]
        label = "" if ev["kind"] == "measured" else " (estimate)"
        minutes = ev["minutes"]
        add(
            "full WN18RR KGC evaluation, bf16",
            f"<= {FULL_EVAL_MINUTES:.0f} min",
            minutes,
            minutes <= FULL_EVAL_MINUTES,
            f"{minutes:.1f} min{label}",
        )
    if "precision_training" in results:
        rows.append(_precision_training_target(results["precision_training"]))
    return rows


def _precision_training_target(result: dict[str, Any]) -> dict[str, Any]:
    rel = result["relative_mrr_difference"]
    return {
        "target": f"bf16 training: validation MRR vs fp32 ({result['steps']} steps)",
        "goal": f"within {result['tolerance']:.0%}",
        "measured": rel,
        "shown": f"{rel:+.1%}",
        "met": result["within_tolerance"],
    }


def print_table(rows: list[dict[str, Any]], peak: dict[str, Any]) -> None:
    print(
        f"\npeak fp32 {peak['peak_gflops']:.1f} GFLOP/s, bf16 {peak['bf16_gflops']:.1f} GFLOP/s, "
        f"load average at start {peak['load']['loadavg_before'][0]:.2f}"
    )
    print(f"{'target':<40} {'goal':<10} {'measured':<20} met?")
    for row in rows:
        print(
            f"{row['target']:<40} {row['goal']:<10} {row['shown']:<20} "
            f"{'yes' if row['met'] else 'NO'}"
        )


def _side_by_side(results: dict[str, dict[str, Any]]) -> list[str]:
    """Rows of the fp32 | bf16 | bf16/fp32 table: the same work in both precisions."""
    rows = []

    def mfu(m: dict[str, float]) -> str:
        return f"{m['fp32']:.0%} / {m['bf16']:.0%}"

    if "training" in results:
        t = results["training"]
        fp, bf = t["fp32"], t["bf16"]
        rows += [
            f"| training, triples/s (batch {t['batch_size']}) | {fp['triples_per_s']:.2f} | "
            f"{bf['triples_per_s']:.2f} | {t['bf16_speedup']:.2f}x |",
            f"| training, MFU of the fp32 / bf16 peak | {mfu(fp['mfu'])} | {mfu(bf['mfu'])} | |",
            f"| training, peak memory | {fp['peak_rss_mb'] / 1024:.1f} GB | "
            f"{bf['peak_rss_mb'] / 1024:.1f} GB | |",
        ]
    if "encoding" in results:
        e = results["encoding"]
        fp, bf = e["at_batch_size"]["fp32"], e["at_batch_size"]["bf16"]
        rows += [
            f"| entity encoding, entities/s (batch {e['batch_size']}) | "
            f"{fp['entities_per_s']:.1f} | {bf['entities_per_s']:.1f} | {e['bf16_speedup']:.2f}x |",
            f"| entity encoding, MFU of the fp32 / bf16 peak | {mfu(fp['mfu'])} | "
            f"{mfu(bf['mfu'])} | |",
        ]
    if "evaluation" in results:
        ev = results["evaluation"]
        fp, bf = ev["fp32"], ev["bf16"]
        kinds = {fp["kind"], bf["kind"]}
        rows.append(
            f"| full WN18RR KGC evaluation ({fp['entities']:,} entities, {fp['queries']:,} "
            f"queries; {' / '.join(sorted(kinds))}) | {fp['minutes']:.1f} min | "
            f"{bf['minutes']:.1f} min | {fp['minutes'] / bf['minutes']:.2f}x |"
        )
    return rows


def _reference(peak: dict[str, Any]) -> list[str]:
    """The large square matmul of the peak benchmark and the CPU's bf16 extensions: what bounds
    the bf16 / fp32 ratio on this machine, whatever the model's shapes."""
    if "reference_gflops" not in peak:
        return []
    ref = peak["reference_gflops"]
    flags = ", ".join(peak.get("environment", {}).get("cpu_flags", [])) or "none reported"
    return [
        f"A {peak['reference_shape']} matmul runs at fp32 {ref['float32']:.0f} and bf16 "
        f"{ref['bfloat16']:.0f} GFLOP/s ({ref['bfloat16'] / ref['float32']:.1f}x) on this CPU "
        f"(extensions: {flags}).",
    ]


def markdown(rows: list[dict[str, Any]], results: dict[str, dict[str, Any]], peak: dict) -> str:
    """The targets and the main figures as Markdown tables, for the book to include."""
    lines = [
        f"Matmul peak of this run: fp32 {peak['peak_gflops']:.0f} GFLOP/s, "
        f"bf16 {peak['bf16_gflops']:.0f} GFLOP/s ({peak['peak_shape']['shape']}, "
        f"{peak['peak_shape']['tokens']} tokens).",
        *_reference(peak),
        "",
        "| target | goal | measured | met |",
        "|---|---|---|---|",
        *(
            f"| {r['target']} | {r['goal']} | {r['shown']} | {'yes' if r['met'] else 'no'} |"
            for r in rows
        ),
    ]
    side = _side_by_side(results)
    if side:
        lines += ["", "| measurement | fp32 | bf16 | bf16 / fp32 |", "|---|---|---|---|", *side]
    figures = []
    if "precision" in results:
        agree = results["precision"]["agreement"]
        figures.append(
            f"| same KGC evaluation in bf16 vs fp32 ({agree['queries']:,} queries, "
            f"{agree['candidates']:,} candidates) | Spearman {agree['spearman']:.4f}; "
            f"{agree['within_1_percent']:.1%} of ranks within 1%; MRR "
            f"{agree['metrics']['fp32']['MRR']:.4f} (fp32) vs "
            f"{agree['metrics']['bf16']['MRR']:.4f} (bf16) |"
        )
    if "training" in results and "profile" in results["training"]:
        t = results["training"]
        settings = t["settings"]
        shares = ", ".join(
            f"{part.replace('_', ' ')} {share:.0%}" for part, share in t["profile"].items()
        )
        figures.append(
            f"| one bf16 training step (batch {settings['batch_size']}, lam {settings['lam']:g}, "
            f"self-negatives trained through), share of its time | {shares}; of which the "
            f"self-negative views ~{t['profile_detail']['self_negative_pass']:.0%} |"
        )
        for precision, chosen in t["choices"].items():
            over = ", ".join(
                f"{k.replace('_', ' ')} {v:.2f}x" for k, v in chosen["fast_over"].items()
            )
            figures.append(f"| {precision} training step, fast step over | {over} |")
        before = t["before"]
        figures.append(
            f"| bf16 training, examples/s now vs before ({before['commit']}, "
            f"{before['steps']} steps side by side) | {before['examples_per_s']['after']:.2f} vs "
            f"{before['examples_per_s']['before']:.2f} ({t['speedup_vs_before']:.2f}x); largest "
            f"loss difference along the curve {before['largest_loss_difference']['total']:.4f} |"
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
            f"| torch.compile (encoding, fp32) | {c['speedup']:.2f}x after "
            f"{c['compile_seconds_first_shape']:.0f} s of compilation |"
        )
    if "precision_training" in results:
        p = results["precision_training"]
        arms, mrr = p["arms"], p["valid_mrr"]
        figures.append(
            f"| {p['steps']} `cpu`-profile training steps, fp32 vs bf16 (same seed and batches) | "
            f"largest loss difference along the curve {p['largest_loss_difference']['total']:.4f}"
            f" (L_exp {p['largest_loss_difference']['L_exp']:.4f}); validation MRR "
            f"{mrr['fp32']:.4f} vs {mrr['bf16']:.4f} ({arms['bf16']['queries']:,} queries, "
            f"{arms['bf16']['candidates']:,} candidates); "
            f"{arms['fp32']['examples_per_s_median']:.2f} vs "
            f"{arms['bf16']['examples_per_s_median']:.2f} examples/s |"
        )
    if figures:
        lines += ["", "| measurement | value |", "|---|---|", *figures]
    return "\n".join(lines) + "\n"


# Benchmarks that measure fp32 and bf16 side by side: their results carry ``precisions``. A result
# stored before they did is left out of the summary until the benchmark runs again.
SIDE_BY_SIDE = ("encoding", "precision", "training", "evaluation")


def _stored(suffix: str) -> dict[str, dict[str, Any]]:
    """The stored result of each benchmark, without those of an older shape."""
    stored = {}
    for name in BENCHMARKS:
        path = RESULTS / f"{name}{suffix}"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        if name in SIDE_BY_SIDE and "precisions" not in result:
            print(f"{path.name} predates the fp32 / bf16 comparison: left out, run it again")
            continue
        stored[name] = result
    return stored


def summarise_stored(quick: bool) -> None:
    """Rebuild the summary from the stored result files of the last run of each benchmark (each
    result keeps the peaks it was measured against; the header shows the latest peaks)."""
    suffix = ".quick.json" if quick else ".json"
    stored = _stored(suffix)
    if "peak" not in stored:
        raise SystemExit(f"no {RESULTS / ('peak' + suffix)}: run the benchmarks first")
    peak = stored.pop("peak")
    rows = targets(stored)
    print_table(rows, peak)
    loads = {name: r["load"] for name, r in {"peak": peak, **stored}.items()}
    with measure_load() as load:
        pass
    save(
        "summary",
        quick,
        {
            "peak_gflops": peak["peak_gflops"],
            "bf16_gflops": peak["bf16_gflops"],
            "targets": rows,
            "loads": loads,
        },
        load,
    )
    atomic_write_text(
        RESULTS / f"summary{'.quick' if quick else ''}.md", markdown(rows, stored, peak)
    )


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
        help="run the full WN18RR evaluation in bf16 instead of estimating it (target 6 min)",
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
    w = Workload({"fp32": peak["peak_gflops"], "bf16": peak["bf16_gflops"]})
    selected = [b for b in BENCHMARKS[1:] if not args.only or b in args.only]
    runners = _runners(w, args)
    for name in selected:
        print(f"== {name}")
        with measure_load() as load:
            result = runners[name]()
        result["peaks_gflops"] = w.peaks
        path = save(name, args.quick, result, load)
        print(f"  foreign CPU {load.foreign_cpu_cores:.2f} cores -> {path.name}")
    summarise_stored(args.quick)  # a partial run (--only) keeps the other benchmarks' results


if __name__ == "__main__":
    main()
