"""Settings changed on resume (KL_COEF, EARLY_STOPPING_METRIC) take effect, and an EARLY_STOPPING_METRIC that
the evaluation does not produce is one clear error before any training step (or, resumed, with that step kept)."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_settings

import ppo

# Two short steps, each evaluated and saved; EARLY_STOPPING_MIN_DELTA so large that the second evaluation is no
# improvement (best_step 1, one evaluation without improvement at step 2).
BASE = dict(MAX_STEPS=2, GROUP_EPOCHES=1, MAX_NEW_TOKENS=8, MAX_EVAL_SAMPLES=2, EVAL_EVERY_N_STEPS=1,
            SAVE_EVERY_N_STEPS=1, KL_COEF=0.05, ADAPTIVE_KL=False, EARLY_STOPPING_METRIC="eval/reward",
            EARLY_STOPPING_PATIENCE=0, EARLY_STOPPING_MIN_DELTA=100.0)


def settings(tiny, out, **overrides):
    return tiny_settings(tiny, out, **{**BASE, **overrides})


def checkpoint(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step_{step}"


def saved_state(out: Path, step: int) -> dict:
    return torch.load(checkpoint(out, step) / "training_state.pt", map_location="cpu", weights_only=True)["state"]


def read_rows(out: Path, name: str = "metrics.jsonl"):
    return [json.loads(line) for line in (Path(out) / "logs" / name).read_text(encoding="utf-8").splitlines()]


def log_text(out: Path) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted((Path(out) / "logs").glob("training_*.log")))


@pytest.fixture(scope="module")
def base(tiny, tmp_path_factory):
    """OUTPUT_DIR of a finished 2-step run (checkpoints step_1 and step_2); copy it before resuming."""
    out = tmp_path_factory.mktemp("resume_settings") / "base"
    ppo.PPOTrainer(**settings(tiny, out)).train()
    return out


def resume(tiny, base, out, step, **overrides):
    """A trainer resuming a copy (in `out`) of the base run from its checkpoint of `step`."""
    shutil.copytree(base, out)
    return ppo.PPOTrainer(resume_from_checkpoint=str(checkpoint(out, step)), **settings(tiny, out, **overrides))


def test_resume_applies_changed_kl_coef_and_early_stopping_metric(tiny, base, tmp_path):
    """Resumed with a new KL_COEF and ADAPTIVE_KL off, the state and the next step's objective/kl_coef use the
    new value; a controller switched on at resume starts at KL_COEF, and a running one keeps its coefficient
    (the log says so). A changed
    EARLY_STOPPING_METRIC starts best_metric, best_step and both patience counters afresh; an unchanged one
    keeps them."""
    saved = saved_state(base, 2)
    # the step-0 evaluation is a best candidate too: the base run's best is its initial policy
    assert (saved["kl_coef"], saved["best_step"], saved["evals_without_improvement"],
            saved["plateau_bad_evals"]) == (0.05, 0, 2, 2) and saved["best_metric"] is not None

    fixed = resume(tiny, base, tmp_path / "fixed", 2, KL_COEF=0.2, MAX_STEPS=3)
    assert fixed.state.kl_coef == 0.2, "the resumed run kept the checkpoint's KL coefficient"
    fixed.train()
    step_3 = [row for row in read_rows(fixed.output_dir) if row["step"] == 3 and "objective/kl_coef" in row]
    assert len(step_3) == 1 and step_3[0]["objective/kl_coef"] == pytest.approx(0.2)

    adaptive = resume(tiny, base, tmp_path / "adaptive", 2, KL_COEF=0.2, ADAPTIVE_KL=True, MAX_STEPS=3)
    assert adaptive.state.kl_coef == 0.2, "a controller switched on at resume starts at KL_COEF"
    adaptive.train()
    moved = saved_state(adaptive.output_dir, 3)["kl_coef"]
    assert moved != 0.2
    again = ppo.PPOTrainer(resume_from_checkpoint=str(checkpoint(adaptive.output_dir, 3)),
                           **settings(tiny, adaptive.output_dir, KL_COEF=0.3, ADAPTIVE_KL=True, MAX_STEPS=4))
    assert again.state.kl_coef == moved, "the running controller's coefficient continues"
    assert "from the checkpoint continues" in log_text(again.output_dir)

    changed = resume(tiny, base, tmp_path / "changed", 2, EARLY_STOPPING_METRIC="eval/accuracy")
    s = changed.state
    assert (s.best_metric, s.best_step, s.evals_without_improvement, s.plateau_bad_evals) == (None, -1, 0, 0)

    same = resume(tiny, base, tmp_path / "same", 2)
    s = same.state
    assert (s.best_metric, s.best_step, s.evals_without_improvement, s.plateau_bad_evals) == (
        saved["best_metric"], 0, 2, 2)


def test_missing_early_stopping_metric_fails_before_training(tiny, base, tmp_path, capsys):
    """With EARLY_STOPPING_PATIENCE > 0, a typo'd metric or eval/accuracy without a reference column is a
    ConfigError at the step-0 evaluation, before any PPO step, naming the metric and the available ones; exit
    status 2 and one "Error:" line through train_main; EVAL_DATASETS = [] is an error before training; so is
    a missing metric nothing uses yet; a resumed run whose changed metric is missing fails at its first evaluation
    after saving that step's checkpoint."""
    no_reference = [{"path": tiny["eval_parquet"], "type": "parquet", "input": "question"}]
    for name, metric, extra in [("typo", "eval/rewrad", {}),
                                ("no_reference", "eval/accuracy", {"EVAL_DATASETS": no_reference})]:
        trainer = ppo.PPOTrainer(**settings(tiny, tmp_path / name, EARLY_STOPPING_PATIENCE=1,
                                            EARLY_STOPPING_METRIC=metric, **extra))
        with pytest.raises(ppo.ConfigError) as caught:
            trainer.train()
        assert (trainer.state.global_step, trainer.state.optimizer_steps) == (0, 0), f"{name}: it trained first"
        named, available = str(caught.value).split("available:")
        assert repr(metric) in named and "'eval/reward'" in available and repr(metric) not in available, name

    out = tmp_path / "main"
    config = tmp_path / "run.json"
    config.write_text(json.dumps(settings(tiny, out, EARLY_STOPPING_PATIENCE=1, EARLY_STOPPING_METRIC="eval/rewrad")))
    capsys.readouterr()
    assert ppo.train_main([str(config)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert "Traceback" not in err and len(errors) == 1 and "'eval/rewrad'" in errors[0], err[-3000:]
    assert {row["step"] for row in read_rows(out, "samples.jsonl")} == {0}, "an evaluation after a step ran"
    assert ppo.list_checkpoints(out) == []

    no_eval = ppo.PPOTrainer(**settings(tiny, tmp_path / "no_eval", EVAL_DATASETS=[], EARLY_STOPPING_PATIENCE=1,
                                        MAX_STEPS=1))
    with pytest.raises(ppo.ConfigError, match="EVAL_DATASETS is empty"):
        no_eval.train()
    assert no_eval.state.global_step == 0

    unused = ppo.PPOTrainer(**settings(tiny, tmp_path / "unused", EARLY_STOPPING_METRIC="eval/rewrad", MAX_STEPS=1))
    with pytest.raises(ppo.ConfigError, match="eval/rewrad"):       # a typo even while nothing uses it yet
        unused.train()
    assert unused.state.global_step == 0

    resumed = resume(tiny, base, tmp_path / "resumed", 2, MAX_STEPS=3, EARLY_STOPPING_PATIENCE=1,
                     EARLY_STOPPING_METRIC="eval/rewrad")
    with pytest.raises(ppo.ConfigError, match="eval/rewrad"):
        resumed.train()
    assert resumed.state.global_step == 3
    assert 3 in [s for s, _ in ppo.list_checkpoints(resumed.output_dir)], "the failing step's checkpoint is lost"
