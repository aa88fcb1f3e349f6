"""The user guide's own examples, pasted as written into a subclass of PPOTrainer: its custom reward
(`compute_rewards` with `self.compute_diversity`) and its custom evaluation metric (`evaluate`, whose
"# ... 原有代码 ..." stands for the original code: `eval_metrics = super().evaluate(eval_prompts)` and the
responses, `self.eval_responses`). And compute_diversity itself, against distinct-2 by hand."""
import json
import textwrap
from typing import Dict, List

import pytest
import torch
from conftest import CHARS, ROOT, WORDS, tiny_settings
from hypothesis import given, settings
from hypothesis import strategies as st

import ppo

# Copied character for character from the guide (section 进阶用法).
GUIDE_COMPUTE_REWARDS = '''def compute_rewards(self, prompts: List[str], responses: List[str]) -> torch.Tensor:
    rewards = []
    for p, r in zip(prompts, responses):
        # 使用 reward model
        model_reward = self.reward_model_score(p, r)
        
        # 添加自定义奖励
        length_penalty = -0.01 * len(r)  # 惩罚过长回复
        diversity_bonus = self.compute_diversity(r)  # 奖励多样性
        
        total_reward = model_reward + length_penalty + diversity_bonus
        rewards.append(total_reward)
    
    return torch.stack(rewards)
'''
GUIDE_EVALUATE = '''def evaluate(self, eval_prompts: List[str]) -> Dict[str, float]:
    # ... 原有代码 ...
    
    # 添加自定义指标
    eval_metrics["custom_metric"] = self.compute_custom_metric(responses)
    
    return eval_metrics
'''
ORIGINAL_CODE = '''    eval_metrics = super().evaluate(eval_prompts)
    responses = self.eval_responses
'''
USER_METRIC = '''def compute_custom_metric(self, responses):
    return sum(len(r) for r in responses) / len(responses)
'''
GUIDE = ROOT.parent / "shared" / "seed" / "000_f05b483c0489b7c5.txt"


def subclass(*methods: str):
    """The methods pasted into `class GuideTrainer(PPOTrainer):`, as a user's file would hold them."""
    source = "class GuideTrainer(PPOTrainer):\n" + "".join(textwrap.indent(m, "    ") + "\n" for m in methods)
    namespace = {"PPOTrainer": ppo.PPOTrainer, "List": List, "Dict": Dict, "torch": torch}
    exec(compile(source, "guide_example.py", "exec"), namespace)
    return namespace["GuideTrainer"]


@pytest.mark.skipif(not GUIDE.exists(), reason="the guide is not next to this checkout")
def test_the_snippets_are_the_guides_own():
    text = GUIDE.read_text(encoding="utf-8")
    assert GUIDE_COMPUTE_REWARDS in text and GUIDE_EVALUATE in text


def test_guide_reward_example_runs_as_written(tiny, tmp_path):
    trainer = subclass(GUIDE_COMPUTE_REWARDS)(**tiny_settings(tiny, tmp_path / "out", MAX_STEPS=1,
                                                              EVAL_DATASETS=[]))
    prompts, responses = ["What is 3 + 4?", "What is 12 + 5?"], ["7 7 7 7", "The answer is 17."]
    got = trainer.compute_rewards(prompts, responses)
    expected = (trainer.reward_model_scores(prompts, responses) - 0.01 * torch.tensor([7.0, 17.0])
                + torch.tensor([trainer.compute_diversity(r) for r in responses]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert trainer.compute_diversity("7 7 7 7") < trainer.compute_diversity("The answer is 17.") == 1.0
    assert trainer.train() == "max_steps"


def test_guide_metric_example_runs_as_written(tiny, tmp_path):
    evaluate = GUIDE_EVALUATE.replace("    # ... 原有代码 ...\n", ORIGINAL_CODE)
    assert evaluate != GUIDE_EVALUATE
    trainer = subclass(evaluate, USER_METRIC)(**tiny_settings(tiny, tmp_path / "out", MAX_STEPS=2,
                                                              EVAL_EVERY_N_STEPS=1, NUM_SAMPLES_TO_LOG=4))
    trainer.train()
    out = tmp_path / "out" / "logs"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for row in rows:
        responses = [s["response"] for s in samples if s["step"] == row["step"]]
        assert len(responses) == 4                                      # MAX_EVAL_SAMPLES: every eval response
        assert row["eval/custom_metric"] == pytest.approx(sum(map(len, responses)) / 4)


@settings(max_examples=100, deadline=None)
@given(pieces=st.lists(st.sampled_from(CHARS + [" " + w for w in WORDS]), max_size=12))
def test_compute_diversity_is_distinct_2_of_the_policy_tokens(pieces, tiny_trainer):
    text = "".join(pieces)
    ids = tiny_trainer.tokenizer(text, add_special_tokens=False)["input_ids"]
    bigrams = [(ids[i], ids[i + 1]) for i in range(len(ids) - 1)]
    expected = len(set(bigrams)) / len(bigrams) if bigrams else 0.0
    got = tiny_trainer.compute_diversity(text)
    assert isinstance(got, float) and got == expected and 0 <= got <= 1


@pytest.fixture(scope="module")
def tiny_trainer(tiny, tmp_path_factory):
    return ppo.PPOTrainer(**tiny_settings(tiny, tmp_path_factory.mktemp("diversity") / "out", EVAL_DATASETS=[]))

