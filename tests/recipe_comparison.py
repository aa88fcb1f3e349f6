"""GRPO against PPO with a critic on the SmolLM2 recipe (configs/smollm2_arithmetic.json): held-out accuracy
against training wall time, several seeds each. A script, not a test; it runs `python ppo.py` once per variant
and seed, one after the other (never two torch jobs at once), and writes benchmark_results/recipe_comparison.json
and .png.

    python data/build_smollm2.py                        # once: the model folder in .cache/
    python tests/recipe_comparison.py                   # every variant below, seeds 1 and 2 (hours on a CPU)
    python tests/recipe_comparison.py --variants grpo ppo --seeds 1 --steps 10
    python tests/recipe_comparison.py --report          # table and chart from the runs already on disk

Each run is the recipe with the variant's settings on top, its own OUTPUT_DIR under outputs/recipe_comparison/,
SEED = the seed; a run already finished is not run again (delete its folder to redo it). Training seconds are the sum of the steps' time/step up to an evaluation (the evaluations take
the same time in every variant, and are left out); peak memory is the run's own maximum RSS (os.wait4).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2_arithmetic.json"
RUNS = ROOT / "outputs" / "recipe_comparison"
RESULTS = ROOT / "benchmark_results" / "recipe_comparison"

VARIANTS = {  # name -> settings over the recipe's (which is GRPO with 4 responses per prompt)
    "grpo": {},
    "ppo": {"ADVANTAGE_ESTIMATOR": "gae"},
    # VC-PPO: the critic learns alone for 3 steps, its targets with lambda = 1
    "ppo_vc": {"ADVANTAGE_ESTIMATOR": "gae", "VALUE_WARMUP_STEPS": 3, "LAM_VALUE": 1.0},
    # and VAPO's positive-example NLL on the right answers
    "ppo_vc_poslm": {"ADVANTAGE_ESTIMATOR": "gae", "VALUE_WARMUP_STEPS": 3, "LAM_VALUE": 1.0,
                     "POSITIVE_LM_COEF": 0.1},
    # and VAPO's length-adaptive lambda for the policy (alpha 0.05: lambda = 0 below 20 tokens)
    "ppo_vapo": {"ADVANTAGE_ESTIMATOR": "gae", "VALUE_WARMUP_STEPS": 3, "LAM_VALUE": 1.0,
                 "POSITIVE_LM_COEF": 0.1, "LENGTH_ADAPTIVE_LAM": 0.05},
}


def run(variant: str, seed: int, steps: int, eval_every: int) -> dict:
    out = RUNS / f"{variant}_seed{seed}"
    settings = {**VARIANTS[variant], "SEED": seed, "MAX_STEPS": steps, "EVAL_EVERY_N_STEPS": eval_every,
                "SAVE_EVERY_N_STEPS": 0, "SAVE_BEST_POLICY": False, "OUTPUT_DIR": str(out), "RESUME": "no"}
    command = [sys.executable, "ppo.py", str(CONFIG)] + [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}"
                                                         for k, v in settings.items()]
    print(f"{variant} seed {seed}: {' '.join(command[2:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(RUNS / f"{variant}_seed{seed}.stderr", "w") as log:
        child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"{variant} seed {seed} failed (status {status}): see {log.name}")
    (out / "peak_rss_gb.txt").write_text(f"{usage.ru_maxrss / 2 ** 20:.3f}\n")     # ru_maxrss is in KiB
    (out / "wall_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return summarise(variant, seed)


def summarise(variant: str, seed: int) -> dict:
    out = RUNS / f"{variant}_seed{seed}"
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    seconds, curve, explained = 0.0, [], []
    for row in rows:
        seconds += row.get("time/step") or 0.0
        if row.get("eval/accuracy") is not None:
            curve.append({"step": row["step"], "train_seconds": round(seconds, 1),
                          "accuracy": row["eval/accuracy"]})
        if row.get("ppo/val/explained_variance") is not None:
            explained.append(row["ppo/val/explained_variance"])
    return {"variant": variant, "seed": seed, "settings": VARIANTS[variant], "curve": curve,
            "seconds_per_step": round(statistics.median(r["time/step"] for r in rows if r.get("time/step")), 2),
            "peak_rss_gb": float((out / "peak_rss_gb.txt").read_text()),
            "wall_seconds": float((out / "wall_seconds.txt").read_text()),
            "explained_variance_last5": round(statistics.fmean(explained[-5:]), 3) if explained else None}


def accuracy_at(curve, seconds: float) -> float:
    """The accuracy of the last evaluation reached within `seconds` of training."""
    return [point["accuracy"] for point in curve if point["train_seconds"] <= seconds + 1e-6][-1]


def report(results):
    RESULTS.parent.mkdir(exist_ok=True)
    by_variant = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    # equal wall time: the training seconds the fastest variant took for all its steps
    budget = min(statistics.fmean(r["curve"][-1]["train_seconds"] for r in rs) for rs in by_variant.values())
    lines = ["| variant | seeds | s / step | peak RSS GB | accuracy at step 0 | at the last step (mean, per seed) "
             f"| at {budget:.0f} s of training (mean) | explained variance, last 5 steps |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, rs in by_variant.items():
        last = [r["curve"][-1]["accuracy"] for r in rs]
        equal = [accuracy_at(r["curve"], budget) for r in rs]
        ev = [r["explained_variance_last5"] for r in rs if r["explained_variance_last5"] is not None]
        lines.append(f"| {variant} | {', '.join(str(r['seed']) for r in rs)} | "
                     f"{statistics.fmean(r['seconds_per_step'] for r in rs):.1f} | "
                     f"{max(r['peak_rss_gb'] for r in rs):.2f} | "
                     f"{statistics.fmean(r['curve'][0]['accuracy'] for r in rs):.3f} | "
                     f"{statistics.fmean(last):.3f} ({', '.join(f'{a:.3f}' for a in last)}) | "
                     f"{statistics.fmean(equal):.3f} | {', '.join(f'{e:.2f}' for e in ev) or '-'} |")
    table = "\n".join(lines)
    RESULTS.with_suffix(".json").write_text(json.dumps({"budget_seconds": budget, "runs": results}, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (variant, rs) in enumerate(by_variant.items()):
        for j, r in enumerate(rs):
            ax.plot([p["train_seconds"] for p in r["curve"]], [p["accuracy"] for p in r["curve"]], marker="o",
                    color=f"C{i}", alpha=0.8, linestyle="-" if j == 0 else "--",
                    label=variant if j == 0 else None)
    ax.axvline(budget, color="grey", linewidth=0.8)
    ax.set_xlabel("training seconds (sum of time/step; evaluations left out)")
    ax.set_ylabel("eval/accuracy (greedy, 200 held-out problems)")
    ax.set_title("SmolLM2-135M-Instruct, configs/smollm2_arithmetic.json: seeds solid / dashed")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS.with_suffix(".png"), dpi=110)
    return table


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--report", action="store_true", help="only summarise the runs on disk")
    args = p.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    results = []
    for variant in args.variants:
        for seed in args.seeds:
            done = (RUNS / f"{variant}_seed{seed}" / "wall_seconds.txt").exists()
            results.append(summarise(variant, seed) if args.report or done else
                           run(variant, seed, args.steps, args.eval_every))
    print(report(results))


if __name__ == "__main__":
    main()
