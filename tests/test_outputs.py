"""Monitoring outputs: files and their contents, the metrics.jsonl schema in the README, wandb offline, charts."""
import json
import math
import re

import numpy as np
import pytest
from conftest import ROOT, tiny_settings
from PIL import Image

import ppo


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """A short run with evaluations, checkpoints and wandb (offline)."""
    out = tmp_path_factory.mktemp("outputs") / "run"
    settings = tiny_settings(tiny, out, MAX_STEPS=4, EVAL_EVERY_N_STEPS=2, SAVE_EVERY_N_STEPS=2, USE_WANDB=True,
                             WANDB_RUN_NAME="outputs-test")
    config = out.parent / "run.json"
    config.write_text(json.dumps(settings))
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    try:
        assert ppo.train_main([str(config)]) == 0
    finally:
        mp.undo()
    return out


def rows_of(out):
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_every_file_exists_with_its_contents(run):
    config = json.loads((run / "training_config.json").read_text())
    assert set(config) == set(ppo.CONFIG_KEYS) and config["MAX_STEPS"] == 4
    logs = list((run / "logs").glob("training_*.log"))
    assert len(logs) == 1 and re.fullmatch(r"training_\d{8}_\d{6}\.log", logs[0].name)
    log = logs[0].read_text()
    assert "eval at step 2" in log and "Checkpoint saved" in log and "Training finished" in log
    rows = rows_of(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for row in rows[1:]:
        assert all(v is None or isinstance(v, (int, float)) for v in row.values())
    samples = [json.loads(line) for line in (run / "logs" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0, 2, 4}
    assert all(isinstance(s["prompt"], str) and isinstance(s["response"], str) and math.isfinite(s["reward"])
               for s in samples)


def test_non_finite_numbers_are_written_as_null(tmp_path):
    assert ppo.json_safe({"a": float("nan"), "b": float("inf"), "c": 1.5}) == {"a": None, "b": None, "c": 1.5}
    line = json.dumps(ppo.json_safe({"step": 1, "x": float("-inf")}))
    assert json.loads(line) == {"step": 1, "x": None} and "Infinity" not in line


def readme_metric_keys():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### metrics.jsonl", 1)[1].split("\n## ", 1)[0]
    return {m for m in re.findall(r"^\| `([^`]+)` \|", section, flags=re.M) if "<" not in m}


def test_readme_schema_matches_the_keys_written(run):
    written = {k for row in rows_of(run) for k in row}
    assert readme_metric_keys() == written


def test_wandb_offline_run_holds_the_metrics(run):
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    data = next(runs[0].glob("*.wandb")).read_bytes()
    for key in ("objective/score", "ppo/loss/policy", "eval/reward", "outputs-test"):
        assert key.encode() in data, key
    assert list(runs[0].glob("files/media/table/eval/samples_*.table.json"))
    assert (run / "wandb_run_id.txt").read_text().strip() in runs[0].name


def panel_grid(n):
    cols = min(4 if n > 9 else 3, n)
    return math.ceil(n / cols), cols


def check_chart(path, n_panels):
    """The image has the size the layout implies, and each panel cell has drawn content (pixel variance)."""
    rows, cols = panel_grid(n_panels)
    image = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert image.shape == (round(3.1 * rows * 90), round(4.6 * cols * 90))
    height, width = image.shape
    top = 0.7 * 90                                        # the title band
    cell_h, cell_w = (height - top) / rows, width / cols
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        cell = image[int(top + r * cell_h):int(top + (r + 1) * cell_h), int(c * cell_w):int((c + 1) * cell_w)]
        if i < n_panels:
            assert cell.std() > 10, f"{path.name}: panel {i} looks blank"
        else:
            assert cell.std() < 1, f"{path.name}: cell {i} should be empty"


def test_charts_are_real_images_with_every_panel(run):
    rows = rows_of(run)
    numeric = {k for r in rows for k, v in r.items() if k not in ("step", "epoch") and isinstance(v, (int, float))}
    check_chart(run / "training_metrics_detailed.png", len(numeric))
    health = [p for p in ppo.HEALTH_PANELS if any(k in numeric for k in p[1])]
    assert len(health) == 9
    check_chart(run / "ppo_metrics_with_entropy.png", len(health))


def test_plot_command_redraws_an_existing_run(run, capsys):
    for name in ("training_metrics_detailed.png", "ppo_metrics_with_entropy.png"):
        (run / name).unlink()
    assert ppo.train_main(["--plot", str(run)]) == 0
    assert (run / "training_metrics_detailed.png").exists() and (run / "ppo_metrics_with_entropy.png").exists()
    assert ppo.train_main(["--plot", str(run / "missing")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_terminal_line_is_the_guides():
    line = ppo.progress_postfix({"ppo/loss/policy": 0.3245, "ppo/loss/value": 0.1234, "objective/score": 1.56,
                                 "ppo/advantages_mean": 0.23, "objective/entropy": 0.678, "lr/policy": 1e-6})
    assert line == "PL:0.3245 VL:0.1234 R:1.56 A:0.23 E:0.678 LR:1.00e-06"


def test_custom_eval_metric_reaches_the_logs(tiny, tmp_path):
    class WithCustom(ppo.PPOTrainer):
        def evaluate(self, eval_prompts):
            eval_metrics = super().evaluate(eval_prompts)
            eval_metrics["custom_metric"] = 0.5
            return eval_metrics

    trainer = WithCustom(**tiny_settings(tiny, tmp_path / "out", MAX_STEPS=1))
    trainer.train()
    assert [r.get("eval/custom_metric") for r in rows_of(tmp_path / "out")] == [0.5, 0.5]


def test_missing_wandb_package_is_one_warning(tiny, tmp_path, monkeypatch, caplog):
    import builtins
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    trainer = ppo.PPOTrainer(**tiny_settings(tiny, tmp_path / "out", MAX_STEPS=1, USE_WANDB=True, EVAL_DATASETS=[]))
    ppo.logger.propagate = True
    caplog.set_level("WARNING", logger="ppo")
    trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "wandb" in r.getMessage()]
    assert len(warnings) == 1 and "not installed" in warnings[0]
    assert len(rows_of(tmp_path / "out")) == 1
