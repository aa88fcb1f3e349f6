"""Learning: the default run, shortened to its first 10 PPO steps, must raise held-out accuracy by 20 points.

Measured with the shipped defaults (2-core CPU): greedy accuracy on the 400 held-out problems goes from 36.5%
(the starting policy) to 81.0% after 10 steps, and to 91.5% after the full 154-step run (README). The test is
a user's `python ppo.py`, untouched but for MAX_STEPS, EVAL_EVERY_N_STEPS and OUTPUT_DIR. Flipping the sign of
the advantage in clipped_policy_loss makes it fail (accuracy falls instead of rising)."""
import json
import subprocess
import sys

from conftest import ROOT

START_ACCURACY = 0.365      # data/build_report.json: the shipped policy's greedy accuracy on the eval set
STEPS = 10


def test_default_run_learns(tmp_path):
    out = tmp_path / "default"
    result = subprocess.run([sys.executable, "ppo.py", f"--MAX_STEPS={STEPS}", f"--EVAL_EVERY_N_STEPS={STEPS}",
                             f"--OUTPUT_DIR={out}", "--SAVE_EVERY_N_STEPS=0"],
                            cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval/accuracy" in r}
    assert sorted(evals) == [0, STEPS]
    start, end = evals[0]["eval/accuracy"], evals[STEPS]["eval/accuracy"]
    print(f"held-out accuracy {start:.3f} -> {end:.3f}; reward {evals[0]['eval/reward']:.3f} -> "
          f"{evals[STEPS]['eval/reward']:.3f}")
    assert abs(start - START_ACCURACY) < 0.02, "the shipped policy or eval data changed"
    assert end >= start + 0.20, f"10 PPO steps moved held-out accuracy only from {start:.3f} to {end:.3f}"
    assert evals[STEPS]["eval/reward"] > evals[0]["eval/reward"] + 0.5
