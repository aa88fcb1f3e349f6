"""Rewards without a reward model: rules by name (REWARD_FUNCTIONS), Python reward functions
(PPOTrainer(reward_functions=...)), each term logged as reward/<name>/mean and /std in training and
evaluation; a bad function is one clear error; nothing is loaded or run that the objective does not
use (no reward model when none is named, no reference without a KL); the critic from ACTOR_MODEL."""
import json
import math
import re

import pytest
import torch
from conftest import tiny_settings
from hypothesis import given, settings as hsettings, strategies as st

import ppo

PROMPTS = ["What is 3 + 4?", "What is 12 + 5?", "What is 41 + 9?", "What is 7 + 0?"]


def rule_settings(tiny, out, **overrides):
    return tiny_settings(tiny, out, **{"REWARD_MODEL": None, "REWARD_FUNCTIONS": {"answer": 1.0}, **overrides})


def rows(out):
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_rule_rewards_train_without_a_reward_model(tiny, tmp_path):
    """REWARD_MODEL = None loads no reward model; the score is the weighted sum of the rules; each rule
    is logged in training and evaluation, and eval/reward is the weighted reward."""
    out = tmp_path / "out"
    trainer = ppo.PPOTrainer(**rule_settings(tiny, out, REWARD_FUNCTIONS={"answer": 2.0, "number": 0.5},
                                             MAX_STEPS=2, EVAL_EVERY_N_STEPS=1, MISSING_EOS_PENALTY=0.0))
    assert trainer.reward_model is None and trainer.reward_tokenizer is None
    assert list(trainer.reward_functions) == ["answer", "number"]
    trainer.references.update(ppo.load_data(trainer.cfg)[2])
    prompts = [p for p in trainer.references][:4]
    trainer.prepare_prompts(prompts)
    rollout = trainer.generate_response(prompts)
    scores, _, metrics = trainer.score_rollout(rollout)
    refs = [trainer.references[p] for p in prompts]
    right = [float(ppo.answer_matches(r, ref, "last_number")) for r, ref in zip(rollout.responses, refs)]
    numbers = [float(ppo.last_number(r) is not None) for r in rollout.responses]
    assert scores.tolist() == [2.0 * a + 0.5 * n for a, n in zip(right, numbers)]
    assert metrics["reward/answer/mean"].item() == pytest.approx(sum(right) / 4)
    assert metrics["reward/number/std"].item() == pytest.approx(torch.tensor(numbers).std(unbiased=False).item())
    assert "objective/rm_score" not in metrics
    trainer.train()
    logged = rows(out)
    for row in logged[1:]:
        assert {"reward/answer/mean", "reward/answer/std", "reward/number/mean", "reward/number/std"} <= set(row)
    for row in (r for r in logged if "eval/reward" in r):
        assert row["eval/reward"] == pytest.approx(2.0 * row["eval/reward/answer/mean"]
                                                   + 0.5 * row["eval/reward/number/mean"])
        assert row["eval/reward/answer/mean"] == pytest.approx(row["eval/accuracy"])


def test_python_reward_functions_get_the_references_and_their_weights(tiny, tmp_path):
    """reward_functions=[f, (g, 0.5)]: f(prompts, responses, references) gets the dataset's reference of each
    prompt (None without one), the score adds f + 0.5 g to the rules and the reward model, each is logged."""
    seen = []

    def length(prompts, responses, references):
        seen.append(list(references))
        return [len(r) / 10 for r in responses]

    def has_seven(prompts, responses, references):
        return torch.tensor([float("7" in r) for r in responses])        # a tensor is fine too

    trainer = ppo.PPOTrainer(reward_functions=[length, (has_seven, 0.5)],
                             **tiny_settings(tiny, tmp_path / "out", REFERENCE_REWARD=1.0, EVAL_DATASETS=[]))
    assert list(trainer.reward_functions) == ["reward_model", "answer", "length", "has_seven"]
    trainer.references.update(ppo.load_data(trainer.cfg)[2])
    prompts = [p for p in trainer.references][:3] + ["A prompt without a reference?"]
    trainer.prepare_prompts(prompts)
    rollout = trainer.generate_response(prompts)
    scores, _, metrics = trainer.score_rollout(rollout)
    assert seen[-1] == [trainer.references[p] for p in prompts[:3]] + [None]
    model = trainer.reward_model_scores(rollout.prompts, rollout.responses)
    right = torch.tensor([float(ppo.answer_matches(r, trainer.references[p], "last_number"))
                          if p in trainer.references else 0.0 for p, r in zip(prompts, rollout.responses)])
    extra = torch.tensor([len(r) / 10 + 0.5 * float("7" in r) for r in rollout.responses])
    penalty = trainer.cfg.MISSING_EOS_PENALTY * (~rollout.has_eos).float()
    torch.testing.assert_close(scores, model + right + extra - penalty)
    assert metrics["reward/length/mean"].item() == pytest.approx(sum(len(r) / 10 for r in rollout.responses) / 4)
    assert metrics["objective/rm_score"].item() == pytest.approx(model.mean().item())


@pytest.mark.parametrize("bad, words", [
    (lambda p, r, refs: 1 / 0, ["'broken'", "raised ZeroDivisionError", "What is 3 + 4?"]),
    (lambda p, r, refs: [1.0] * (len(r) - 1), ["'broken'", "returned 3 values for 4 responses"]),
    (lambda p, r, refs: [1.0, math.nan, 1.0, 1.0], ["'broken'", "returned nan", "What is 12 + 5?"]),
    (lambda p, r, refs: [1.0, 1.0, "high", 1.0], ["'broken'", "'high' (str), not a number", "What is 41 + 9?"]),
    (lambda p, r, refs: None, ["'broken'", "returned NoneType values"]),
])
def test_a_bad_reward_function_is_one_clear_error(tiny, tmp_path, bad, words):
    def broken(prompts, responses, references):
        return bad(prompts, responses, references)
    trainer = ppo.PPOTrainer(reward_functions=[broken], **rule_settings(tiny, tmp_path / "out", EVAL_DATASETS=[]))
    trainer.prepare_prompts(PROMPTS)
    rollout = trainer.generate_response(PROMPTS)
    with pytest.raises(ppo.TrainingError) as error:
        trainer.score_rollout(rollout)
    assert all(w in str(error.value) for w in words), str(error.value)


def test_a_function_that_fails_on_one_prompt_is_named_with_that_prompt(tiny, tmp_path):
    def picky(prompts, responses, references):
        if any("41" in p for p in prompts):
            raise ValueError("cannot grade this one")
        return [0.0] * len(prompts)
    trainer = ppo.PPOTrainer(reward_functions=[picky], **rule_settings(tiny, tmp_path / "out", EVAL_DATASETS=[]))
    trainer.prepare_prompts(PROMPTS)
    with pytest.raises(ppo.TrainingError, match=r"'picky' raised ValueError: cannot grade this one for the "
                                                r"prompt 'What is 41 \+ 9\?'"):
        trainer.score_rollout(trainer.generate_response(PROMPTS))


@pytest.mark.parametrize("functions, words", [
    (["not callable"], ["reward_functions", "must be a function"]),
    ([lambda p, r, refs: r, lambda p, r, refs: r], ["reward_functions", "not taken", "<lambda>"]),
    ([(len, "heavy")], ["reward_functions", "(function, weight)"]),
])
def test_bad_reward_function_lists_are_config_errors(tiny, tmp_path, functions, words):
    with pytest.raises(ppo.ConfigError) as error:
        ppo.PPOTrainer(reward_functions=functions, **rule_settings(tiny, tmp_path / "out"))
    assert all(w in str(error.value) for w in words), str(error.value)


def test_nothing_to_reward_with_is_an_error(tiny, tmp_path):
    with pytest.raises(ppo.ConfigError, match="Nothing gives a reward"):
        ppo.PPOTrainer(**rule_settings(tiny, tmp_path / "out", REWARD_FUNCTIONS={}))


def test_reward_model_score_says_there_is_no_reward_model(tiny, tmp_path):
    trainer = ppo.PPOTrainer(**rule_settings(tiny, tmp_path / "out", EVAL_DATASETS=[]))
    with pytest.raises(ppo.TrainingError, match=r"There is no reward model \(REWARD_MODEL = None\)"):
        trainer.reward_model_score("What is 3 + 4?", "7")


def test_format_rule_uses_the_pattern(tiny, tmp_path):
    cfg = ppo.make_config({"FORMAT_PATTERN": r"answer is -?\d+\.$"})
    rule = ppo.rule_reward("format", cfg)
    assert rule(["q"] * 3, ["The answer is 7.", "answer is 7", "The answer is -12."], [None] * 3) == [1.0, 0.0, 1.0]


def test_without_a_kl_the_reference_is_neither_loaded_nor_run(tiny, tmp_path):
    """KL_COEF = 0 (no KL_IN_LOSS): no reference model, the log says so, objective/kl is not logged (it is
    not measured), and the step trains as with a reference at KL_COEF = 0 (the same advantages)."""
    out = tmp_path / "out"
    trainer = ppo.PPOTrainer(**rule_settings(tiny, out, KL_COEF=0.0, MAX_STEPS=1, EVAL_DATASETS=[]))
    assert trainer.ref is None
    assert "the reference model is neither loaded nor run" in (next((out / "logs").glob("*.log"))).read_text()
    with_ref = ppo.PPOTrainer(**rule_settings(tiny, tmp_path / "ref", KL_COEF=0.0, KL_IN_LOSS=True,
                                              KL_LOSS_COEF=0.0, MAX_STEPS=1, EVAL_DATASETS=[]))
    assert with_ref.ref is not None
    torch.manual_seed(0)
    a, _, _, metrics = trainer.make_experience(PROMPTS)
    torch.manual_seed(0)
    b, _, _, metrics_b = with_ref.make_experience(PROMPTS)
    assert a.ref_logprobs is None and b.ref_logprobs is not None
    torch.testing.assert_close(a.advantages, b.advantages)
    assert "objective/kl" not in metrics and "objective/kl" in metrics_b
    trainer.train()
    assert "objective/kl" not in rows(out)[-1] and rows(out)[-1]["ppo/loss/policy"] is not None


def test_critic_from_the_policy_has_a_new_value_head(tiny, tmp_path, capfd):
    """CRITIC_MODEL = None: the critic is ACTOR_MODEL's backbone with a new value head; ppo.py says so, and
    transformers' report of the missing head does not reach the terminal."""
    out = tmp_path / "out"
    trainer = ppo.PPOTrainer(**rule_settings(tiny, out, CRITIC_MODEL=None, EVAL_DATASETS=[]))
    err = capfd.readouterr().err
    assert "MISSING" not in err and "newly initialized" not in err
    assert "with a new value head" in err and "ACTOR_MODEL" in err
    policy, critic = trainer.policy.state_dict(), trainer.critic.state_dict()
    shared = [k for k in critic if k.startswith("model.") and k in policy]
    assert shared and all(torch.equal(critic[k], policy[k]) for k in shared)
    assert trainer.critic.score.weight.shape == (1, trainer.policy.config.hidden_size)


def test_progress_bar_counts_the_steps_of_this_run(tiny, tmp_path, capsys):
    """MAX_STEPS = 2 in a 12-step epoch: the bar goes to 2/2, not to the epoch's 12."""
    trainer = ppo.PPOTrainer(**tiny_settings(tiny, tmp_path / "out", MAX_STEPS=2, EVAL_DATASETS=[]))
    capsys.readouterr()
    trainer.train()
    err = capsys.readouterr().err
    assert "2/2" in err and not re.search(r"\d+/12\b", err), err[-2000:]


@hsettings(max_examples=40, deadline=None, derandomize=True)
@given(values=st.lists(st.lists(st.floats(-5, 5), min_size=1, max_size=6), min_size=1, max_size=4))
def test_term_statistics_over_processes_are_those_of_all_responses(values):
    """Each process sends term_sums; their total gives the mean and the (population) std of every
    response of the step, whatever the split over processes."""
    shards = [{"t": torch.tensor(v, dtype=torch.float64)} for v in values]
    total = sum(ppo.term_sums(shard).double() for shard in shards)
    count = torch.tensor(float(sum(len(v) for v in values)), dtype=torch.float64)
    stats = ppo.term_statistics(["t"], total, count)
    everything = torch.tensor([x for v in values for x in v], dtype=torch.float64)
    assert stats["reward/t/mean"].item() == pytest.approx(everything.mean().item(), abs=1e-5)
    assert stats["reward/t/std"].item() == pytest.approx(everything.std(unbiased=False).item(), abs=1e-3)
