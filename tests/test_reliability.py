"""The second audit's findings (reviews/AUDIT-2026-12-04.md, N1-N11), each as a test that failed on the
code the audit read (3d05d44) and passes now. The faults that reach one process of several are in
tests/test_process_faults.py."""
import ast
import glob
import hashlib
import json
import math
import shutil
import signal
import threading
from pathlib import Path

import pytest
import torch
from conftest import ROOT, high_entropy_policy, llama_config, save_model, tiny_settings, word_tokenizer
from safetensors.torch import load_file

import ppo


def checkpoint(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step_{step}"


def weights_digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(Path(f).read_bytes()
                                   for f in sorted(glob.glob(f"{folder}/*.safetensors")))).hexdigest()


def log_text(out: Path) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted((Path(out) / "logs").glob("training_*.log")))


def read_rows(out: Path):
    return [json.loads(line) for line in (Path(out) / "logs" / "metrics.jsonl").read_text().splitlines()]


class ScriptedMetric(ppo.PPOTrainer):
    """The evaluation's reward is scripted by step, so that the best step is known in advance."""
    metric = staticmethod(lambda step: float(step))

    def evaluate(self, eval_prompts):
        super().evaluate(eval_prompts)
        return {"reward": self.metric(self.state.global_step)}


# -- N1: a resume from an older checkpoint -------------------------------------------------------------
def test_resume_from_an_older_checkpoint_sets_the_later_timeline_aside(tiny, tmp_path):
    """The usual roll-back: 3 steps (checkpoints 1-3, best/ from step 3), then a resume from step_1 with a
    lower LEARNING_RATE. The abandoned step_2, step_3 and best/ move to a visible folder (nothing is
    deleted), the resumed run writes its own step_2 and step_3, RESUME=yes then finds the new timeline,
    and best/ is the resumed timeline's best (step 1)."""
    out = tmp_path / "run"
    settings = tiny_settings(tiny, out, MAX_STEPS=3, SAVE_EVERY_N_STEPS=1, EVAL_EVERY_N_STEPS=1,
                             LEARNING_RATE=1e-3, MAX_TRAIN_SAMPLES=24)
    first = ScriptedMetric(**settings)
    first.train()
    assert first.state.best_step == 3
    old = {name: weights_digest(checkpoint(out, s) / "policy") for s, name in ((2, "step_2"), (3, "step_3"))}
    old["best"] = weights_digest(out / "best")
    assert old["best"] == old["step_3"]

    class Flat(ScriptedMetric):
        metric = staticmethod(lambda step: 0.5)
    resumed = Flat(resume_from_checkpoint=str(checkpoint(out, 1)), **{**settings, "LEARNING_RATE": 3e-4})
    resumed.train()

    aside = sorted((out / "checkpoints").glob("abandoned_*"))
    assert len(aside) == 1, "the later checkpoints and best/ must be moved aside, into one visible folder"
    for name, digest in old.items():
        assert weights_digest(aside[0] / name / ("policy" if name != "best" else "")) == digest, name
    text = log_text(out)
    assert "Checkpoint saved: " + str(checkpoint(out, 3)) in text.split("Resumed from")[-1]
    assert str(aside[0]) in text                                     # the move is logged, with where to
    final = resumed.policy.state_dict()
    saved = load_file(checkpoint(out, 3) / "policy" / "model.safetensors")
    assert all(torch.equal(saved[k], final[k].cpu()) for k in saved), "step_3 is not the resumed run's"
    assert json.loads((checkpoint(out, 3) / "config.json").read_text())["LEARNING_RATE"] == 3e-4
    assert ppo.list_checkpoints(out)[-1] == (3, checkpoint(out, 3))   # RESUME=yes continues the new run
    assert resumed.state.best_step == 1
    assert weights_digest(out / "best") != old["best"]
    best = load_file(next((out / "best").glob("*.safetensors")))
    at_step_1 = load_file(checkpoint(out, 1) / "policy" / "model.safetensors")
    assert all(torch.equal(best[k], at_step_1[k].to(best[k].dtype)) for k in best)
    assert "Best policy: eval/reward = 1 at step 1" in text


# -- N2: the KL in the loss with k1 --------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_in_the_loss_pulls_toward_the_reference_in_expectation(estimator):
    """Exact expectation over a 6-way categorical pi = softmax(z): E_{y~pi}[d/dz kl_penalty(log pi(y),
    log pi_ref(y))] is the gradient of KL(pi || pi_ref) for k1 (the score-function form) and k2, and
    points the same way for k3. A plain k1 = log pi - log pi_ref has expected gradient 0."""
    torch.manual_seed(0)
    z = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(6, dtype=torch.float64), 0)
    logp = torch.log_softmax(z, 0)
    (true,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), z)
    expected = torch.zeros(6, dtype=torch.float64)
    for y in range(6):
        lp = torch.log_softmax(z, 0)[y]
        (g,) = torch.autograd.grad(ppo.kl_penalty(lp, ref[y], estimator), z)
        expected += lp.exp().detach() * g
    cosine = torch.dot(expected, true) / (expected.norm() * true.norm())
    if estimator == "k3":
        assert cosine > 0.9
    else:
        torch.testing.assert_close(expected, true)
    # the value is the estimator's, whatever its gradient
    d = torch.tensor([0.3, -0.2], dtype=torch.float64)
    value = ppo.kl_penalty(d + 1.0, torch.ones(2, dtype=torch.float64), estimator)
    torch.testing.assert_close(value, {"k1": d, "k2": 0.5 * d ** 2, "k3": torch.expm1(-d) + d}[estimator])


# -- N4: best/ in the model's own dtype, and only when asked -------------------------------------------
def bf16_policy(folder: Path) -> str:
    from transformers import GenerationConfig, LlamaForCausalLM
    torch.manual_seed(3)
    tok = word_tokenizer()
    policy = LlamaForCausalLM(llama_config(len(tok))).to(torch.bfloat16)
    policy.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return save_model(policy, tok, folder)


def test_best_policy_is_saved_in_the_models_own_dtype_and_can_be_turned_off(tiny, tmp_path):
    """A bf16 checkpoint's best/ is written in bf16 (half the bytes of the float32 master weights), and
    SAVE_BEST_POLICY = False writes no best/ at all (large models: pick among the checkpoints)."""
    policy = bf16_policy(tmp_path / "bf16-policy")
    settings = tiny_settings(tiny, tmp_path / "a", ACTOR_MODEL=policy, MAX_STEPS=1, EVAL_EVERY_N_STEPS=1)
    ppo.PPOTrainer(**settings).train()
    best = load_file(next((tmp_path / "a" / "best").glob("*.safetensors")))
    assert {t.dtype for t in best.values()} == {torch.bfloat16}
    trainer = ppo.PPOTrainer(**{**settings, "OUTPUT_DIR": str(tmp_path / "b"), "SAVE_BEST_POLICY": False})
    trainer.train()
    assert not (tmp_path / "b" / "best").exists()
    assert trainer.state.best_step >= 0                               # still tracked and logged


# -- N5: a step without train() --------------------------------------------------------------------------
def test_train_step_without_train_keeps_the_learning_rate(make_trainer):
    """Without train() there is no plan: the default cosine schedule then has no horizon to decay over,
    so the rate stays LEARNING_RATE instead of dropping to 0 after the first optimizer step."""
    trainer = make_trainer(GROUP_EPOCHES=2, EVAL_DATASETS=[])
    assert trainer.cfg.USE_LR_SCHEDULER and trainer.cfg.LR_SCHEDULER_TYPE == "cosine"
    prompts = ["What is 3 + 4?", "What is 12 + 5?", "What is 41 + 9?", "What is 7 + 0?"]
    for _ in range(2):
        metrics = trainer.train_step(prompts)
        assert metrics["lr/policy"] == trainer.cfg.LEARNING_RATE
        assert metrics["lr/critic"] == trainer.cfg.CRITIC_LEARNING_RATE
    assert trainer.state.optimizer_steps == 4


# -- N6: a resume with another MAX_STEPS ------------------------------------------------------------------
def test_resume_with_another_max_steps_never_raises_the_rate(tiny, tmp_path):
    """The audit's case: a finished 2-step cosine run resumed with MAX_STEPS = 4. Its schedule had reached
    its end; re-timing it over 4 steps would raise the rate again. The rate goes on from where it was
    (never up), and the log says the schedule was re-timed and how to train on at the base rate."""
    out = tmp_path / "run"
    settings = tiny_settings(tiny, out, MAX_STEPS=2, SAVE_EVERY_N_STEPS=2, EVAL_DATASETS=[], GROUP_EPOCHES=2)
    ppo.PPOTrainer(**settings).train()
    ppo.PPOTrainer(resume_from_checkpoint=str(checkpoint(out, 2)), **{**settings, "MAX_STEPS": 4}).train()
    rates = [r["lr/policy"] for r in read_rows(out)]
    assert len(rates) == 4
    assert all(b <= a for a, b in zip(rates, rates[1:])), f"the rate went up on resume: {rates}"
    text = log_text(out)
    assert "re-timed" in text and "MAX_STEPS" in text and "USE_LR_SCHEDULER = False" in text


def test_resume_with_another_max_steps_stretches_the_rest_of_the_decay(tiny, tmp_path):
    """A 4-step cosine run resumed from its step_2 with MAX_STEPS = 6: from the factor it had reached, the
    rate decays over the optimizer steps left in the longer run (no jump, ending at the new last step)."""
    out = tmp_path / "run"
    settings = tiny_settings(tiny, out, MAX_STEPS=4, SAVE_EVERY_N_STEPS=2, EVAL_DATASETS=[], GROUP_EPOCHES=2,
                             MAX_TRAIN_SAMPLES=48)
    ppo.PPOTrainer(**settings).train()
    straight = [r["lr/policy"] for r in read_rows(out)]
    ppo.PPOTrainer(resume_from_checkpoint=str(checkpoint(out, 2)), **{**settings, "MAX_STEPS": 6}).train()
    rates = [r["lr/policy"] for r in read_rows(out)]
    assert rates[:2] == straight[:2]
    lr, cosine = settings.get("LEARNING_RATE", ppo.LEARNING_RATE), ppo.LR_SCHEDULES["cosine"]
    start = ppo.lr_factor(4, 8, 0, "cosine")              # step 2 ended after 4 of 8 optimizer steps
    expected = [lr * start * cosine((last - 4) / (12 - 4)) for last in (5, 7, 9, 11)]   # 12 steps now
    assert rates[2:] == pytest.approx(expected, rel=1e-6)


# -- N7: the initial policy can be the best --------------------------------------------------------------
def test_the_initial_policy_can_be_the_best(tiny, tmp_path):
    """A run that only gets worse: the step-0 evaluation is the best, best/ holds the initial policy and
    the last log line says step 0."""
    class Worse(ScriptedMetric):
        metric = staticmethod(lambda step: 1.0 - step)
    out = tmp_path / "run"
    trainer = Worse(**tiny_settings(tiny, out, MAX_STEPS=2, EVAL_EVERY_N_STEPS=1))
    trainer.train()
    assert trainer.state.best_step == 0 and trainer.state.best_metric == 1.0
    best = load_file(next((out / "best").glob("*.safetensors")))
    initial = load_file(next(Path(tiny["policy"]).glob("*.safetensors")))
    assert all(torch.equal(best[k], initial[k]) for k in initial)
    assert "Best policy: eval/reward = 1 at step 0" in log_text(out)


# -- N8: DAPO's overlong penalty and the missing-EOS penalty ---------------------------------------------
def test_overlong_penalty_replaces_the_missing_eos_penalty(tiny, tmp_path):
    """With OVERLONG_BUFFER on, a response cut at MAX_NEW_TOKENS pays DAPO's -OVERLONG_PENALTY only (the
    soft punishment replaces MISSING_EOS_PENALTY), not both."""
    class NoStop(ppo.PPOTrainer):
        def compute_rewards(self, prompts, responses):
            return torch.zeros(len(responses))
    trainer = NoStop(**tiny_settings(tiny, tmp_path / "out", OVERLONG_BUFFER=4, MAX_NEW_TOKENS=6,
                                     STOP_TOKENS=[], EVAL_DATASETS=[]))
    trainer.stop_ids = torch.tensor([10 ** 6])                      # nothing stops: every response is cut
    rollout = trainer.generate_response(["What is 3 + 4?"] * 4)
    assert not rollout.has_eos.any()
    scores, _, _ = trainer.score_rollout(rollout)
    assert scores.tolist() == [-1.0] * 4
    assert "replaces MISSING_EOS_PENALTY" in ppo.describe_objective(trainer.cfg)


# -- N9: combinations that are accepted without a word ---------------------------------------------------
def test_adaptive_kl_from_zero_is_an_error():
    with pytest.raises(ppo.ConfigError, match="ADAPTIVE_KL.*KL_COEF = 0"):
        ppo.validate_config(ppo.make_config({"ADAPTIVE_KL": True, "KL_COEF": 0.0}))


@pytest.mark.parametrize("settings, words", [
    ({"POLICY_LOSS": "gspo", "ADVANTAGE_ESTIMATOR": "grpo", "LOSS_AGGREGATION": "seq-mean-token-mean",
      "GROUP_SIZE": 4}, ["GSPO", "3e-4", "4e-4", "CLIP_RANGE"]),
    ({"POLICY_LOSS": "cispo"}, ["cispo", "MiniMax-M1", "CLIP_RANGE_LOW = 1.0", "lower"]),
])
def test_variant_defaults_that_are_likely_mistakes_are_warned(settings, words):
    cfg = ppo.make_config(settings)
    ppo.validate_config(cfg)
    text = " ".join(ppo.setting_warnings(cfg))
    assert all(w in text for w in words), text
    assert ppo.setting_warnings(ppo.make_config({})) == []


# -- N10: an interrupt before the first checkpoint --------------------------------------------------------
def test_interrupt_before_the_first_step_says_nothing_was_trained(tiny, tmp_path, capsys, monkeypatch):
    """SIGTERM during the first generation: exit 143, no checkpoint, and the message says so instead of
    naming a checkpoints/step_0 that does not exist."""
    out = tmp_path / "run"
    settings = tiny_settings(tiny, out, EVAL_DATASETS=[], RESUME="no")
    config = tmp_path / "run.json"
    config.write_text(json.dumps(settings))
    real = ppo.PPOTrainer.generate_response

    def generate(self, *args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(ppo.PPOTrainer, "generate_response", generate)
    code = ppo.train_main([str(config)])
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGTERM
    assert "step_0" not in err and "nothing was trained" in err and "no checkpoint" in err
    assert not ppo.list_checkpoints(out)


# -- N11: dead state ----------------------------------------------------------------------------------------
def test_every_field_of_the_run_state_is_read():
    """Each TrainState field is read somewhere in ppo.py besides being written (the audit found
    skipped_steps written and checkpointed but never read)."""
    tree = ast.parse((ROOT / "ppo.py").read_text(encoding="utf-8"))
    fields = [f.name for f in ppo.dataclasses.fields(ppo.TrainState)]
    read = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)}
    unread = [name for name in fields if name not in read]
    assert not unread, f"TrainState fields never read: {unread}"
