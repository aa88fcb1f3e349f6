"""Learning-rate schedules, plateau, early stopping, TARGET_KL and the guide's four scenario blocks."""
import json
import math

import pytest
import torch
from conftest import tiny_settings
from safetensors.torch import load_file

import ppo


def record_learning_rates(trainer):
    """The (policy, critic) learning rates the optimizer actually used, one pair per optimizer step."""
    seen = []
    trainer.optimizer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append(tuple(g["lr"] for g in opt.param_groups)))
    return seen


def formula(kind, k, total, warmup):
    """The schedules written out independently of ppo.lr_factor."""
    if k < warmup:
        return (k + 1) / warmup
    progress = (k - warmup) / (total - warmup)
    return {"cosine": (1 + math.cos(math.pi * progress)) / 2, "linear": 1 - progress}.get(kind, 1.0)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_learning_rate_follows_the_schedule(make_trainer, kind):
    trainer = make_trainer(USE_LR_SCHEDULER=True, LR_SCHEDULER_TYPE=kind, WARMUP_STEPS=3, MAX_STEPS=4,
                           GROUP_EPOCHES=2, NUM_MINI_BATCHES=2, LEARNING_RATE=1e-3, CRITIC_LEARNING_RATE=2e-3,
                           EVAL_DATASETS=[])
    seen = record_learning_rates(trainer)
    trainer.train()
    total = 4 * 2 * 2
    assert trainer.plan.optimizer_steps == total and len(seen) == total
    for k, (policy_lr, critic_lr) in enumerate(seen):
        assert policy_lr == pytest.approx(1e-3 * formula(kind, k, total, 3), rel=1e-9, abs=1e-15)
        assert critic_lr == pytest.approx(2e-3 * formula(kind, k, total, 3), rel=1e-9, abs=1e-15)


def test_without_scheduler_the_rate_is_constant(make_trainer):
    trainer = make_trainer(USE_LR_SCHEDULER=False, WARMUP_STEPS=3, MAX_STEPS=2, EVAL_DATASETS=[])
    seen = record_learning_rates(trainer)
    trainer.train()
    assert set(seen) == {(trainer.cfg.LEARNING_RATE, trainer.cfg.CRITIC_LEARNING_RATE)}


class ScriptedEval(ppo.PPOTrainer):
    """evaluate() returns a scripted metric sequence (one value per evaluation, step 0 included)."""
    script = []

    def evaluate(self, eval_prompts):
        metrics = super().evaluate(eval_prompts[:1])
        metrics["reward"] = self.script[self.state.global_step]
        return metrics


def scripted_trainer(tiny, tmp_path, script, **overrides):
    ScriptedEval.script = script
    settings = tiny_settings(tiny, tmp_path / "out", EVAL_EVERY_N_STEPS=1, MAX_STEPS=len(script) - 1,
                             GROUP_EPOCHES=1, **overrides)
    return ScriptedEval(**settings)


def test_plateau_lowers_the_rate_after_patience_evaluations(tiny, tmp_path):
    script = [1.0, 2.0, 1.5, 1.9, 1.0, 3.0, 2.0, 2.5, 2.9]
    trainer = scripted_trainer(tiny, tmp_path, script, USE_LR_SCHEDULER=True, LR_SCHEDULER_TYPE="plateau",
                               PLATEAU_PATIENCE=2, PLATEAU_FACTOR=0.5)
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "out" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval/reward"] for r in rows] == script
    # bad evaluations after the best so far: step 2 (1), 3 (2 -> x0.5), 4 (1), step 5 improves, 6 (1), 7 (2 -> x0.5)
    base = trainer.cfg.LEARNING_RATE
    expected_lr_at_step = {1: base, 2: base, 3: base, 4: base / 2, 5: base / 2, 6: base / 2, 7: base / 2, 8: base / 4}
    for row in rows[1:]:
        assert row["lr/policy"] == pytest.approx(expected_lr_at_step[row["step"]]), row["step"]
    assert trainer.state.lr_scale == 0.25


def test_early_stopping_stops_at_the_right_evaluation_and_keeps_the_best(tiny, tmp_path):
    script = [0.1, 0.5, 0.9, 0.7, 0.8, 0.85, 0.95, 0.99]
    trainer = scripted_trainer(tiny, tmp_path, script, EARLY_STOPPING_PATIENCE=3, SAVE_EVERY_N_STEPS=1)
    assert trainer.train() == "early_stopping"
    assert trainer.state.global_step == 5 and trainer.state.best_step == 2 and trainer.state.best_metric == 0.9
    out = tmp_path / "out"
    best = load_file(out / "best" / "model.safetensors")
    at_best = load_file(out / "checkpoints" / "step_2" / "policy" / "model.safetensors")
    later = load_file(out / "checkpoints" / "step_5" / "policy" / "model.safetensors")
    assert all(torch.equal(best[k], at_best[k]) for k in best)
    assert any(not torch.equal(best[k], later[k]) for k in best)
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out / "best") is not None


def test_early_stopping_metric_must_exist(tiny, tmp_path):
    trainer = scripted_trainer(tiny, tmp_path, [0.1, 0.2], EARLY_STOPPING_METRIC="eval/bleu")
    with pytest.raises(ppo.ConfigError, match="eval/bleu"):
        trainer.train()


def test_target_kl_stops_the_remaining_epochs(make_trainer):
    trainer = make_trainer(TARGET_KL=1e-12, GROUP_EPOCHES=4, MAX_STEPS=1, EVAL_DATASETS=[], LEARNING_RATE=1e-2)
    trainer.train()
    row = json.loads((trainer.output_dir / "logs" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["ppo/epochs"] < 4 and trainer.state.optimizer_steps == row["ppo/epochs"]


# The guide's four scenario blocks (常见配置场景), verbatim, then scaled down to the tiny models.
SCENARIOS = {
    "8gb_gpu": dict(BATCH_SIZE=1, GRADIENT_ACCUMULATION_STEPS=8, GROUP_SIZE=1, SAVE_EVERY_N_STEPS=200,
                    EVAL_EVERY_N_STEPS=100),
    "quick_16gb": dict(BATCH_SIZE=4, GRADIENT_ACCUMULATION_STEPS=1, GROUP_SIZE=2, USE_LR_SCHEDULER=True,
                       LR_SCHEDULER_TYPE="cosine", EARLY_STOPPING_PATIENCE=3),
    "production": dict(BATCH_SIZE=8, GRADIENT_ACCUMULATION_STEPS=2, GROUP_SIZE=4, USE_LR_SCHEDULER=True,
                       LR_SCHEDULER_TYPE="plateau", EARLY_STOPPING_PATIENCE=10, SAVE_EVERY_N_STEPS=500,
                       EVAL_EVERY_N_STEPS=100, USE_WANDB=True),
    "debug": dict(BATCH_SIZE=2, NUM_EPOCHES=1, SAVE_EVERY_N_STEPS=10, EVAL_EVERY_N_STEPS=5, USE_WANDB=False,
                  MAX_TRAIN_SAMPLES=5, MAX_EVAL_SAMPLES=2),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_guide_scenarios_run(tiny, tmp_path, monkeypatch, name):
    monkeypatch.setenv("WANDB_MODE", "offline")
    settings = tiny_settings(tiny, tmp_path / name, **SCENARIOS[name])
    settings.update(MAX_STEPS=2, GROUP_EPOCHES=1, MAX_NEW_TOKENS=6, MAX_EVAL_SAMPLES=2)
    config = tmp_path / "run.json"
    config.write_text(json.dumps(settings))
    assert ppo.train_main([str(config)]) == 0
    rows = [json.loads(line) for line in (tmp_path / name / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and "eval/reward" in rows[-1]
    assert (tmp_path / name / "checkpoints" / "step_2" / "training_state.pt").exists()
