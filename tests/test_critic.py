"""The critic's options: decoupled GAE (LAM_VALUE), VAPO's length-adaptive lambda (LENGTH_ADAPTIVE_LAM), the
value warm-up (VALUE_WARMUP_STEPS) and VAPO's positive-example NLL (POSITIVE_LM_COEF). Each pure function
against a slow reference written from the paper's formula; the warm-up freezes the policy exactly (weights and
optimizer state) while the critic trains, resumes exactly across its end, and works on two processes."""
import dataclasses
import json
import math
import shutil

import pytest
import torch
from conftest import ROOT, TORCHRUN, high_entropy_policy, launch, tiny_settings
from hypothesis import given, settings as hsettings, strategies as st
from safetensors.torch import load_file

import ppo

PROMPTS = ["What is 3 + 4?", "What is 12 + 5?", "What is 41 + 9?", "What is 7 + 0?"]


def gae_row(rewards, values, n, gamma, lam):
    """One sequence's backwards recursion over its n real tokens (V after the last = 0)."""
    adv, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(n)):
        delta = rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv


def random_rollout(seed, batch, width):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (batch,), generator=g)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return (torch.randn(batch, width, generator=g, dtype=torch.float64),
            torch.randn(batch, width, generator=g, dtype=torch.float64), mask, lengths.tolist())


@hsettings(max_examples=40, deadline=None, derandomize=True)
@given(batch=st.integers(1, 5), width=st.integers(1, 12), gamma=st.sampled_from([1.0, 0.99]),
       alpha=st.sampled_from([0.05, 0.2, 1.0]), lam_value=st.sampled_from([None, 1.0, 0.9]), seed=st.integers(0, 99))
def test_decoupled_and_length_adaptive_gae_against_the_formulas(batch, width, gamma, alpha, lam_value, seed):
    """The policy's advantages use lambda_i = clamp(1 - 1 / (alpha * l_i), 0, 1) for a response of l_i tokens
    (VAPO, eq. 7), the critic's returns A(LAM_VALUE) + V (VC-PPO's decoupled GAE; LAM when None); the
    advantages are whitened over the valid tokens."""
    rewards, values, mask, lengths = random_rollout(seed, batch, width)
    cfg = ppo.make_config({"GAMMA": gamma, "LAM": 0.95, "LAM_VALUE": lam_value, "LENGTH_ADAPTIVE_LAM": alpha})
    advantages, returns, raw = ppo.critic_advantages(rewards, values, mask, cfg, lambda t: t)
    for b, n in enumerate(lengths):
        lam = min(max(1 - 1 / (alpha * n), 0.0), 1.0)
        expected = gae_row(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        torch.testing.assert_close(raw[b, :n], torch.tensor(expected[:n], dtype=torch.float64))
        value_lam = 0.95 if lam_value is None else lam_value
        target = [a + v for a, v in zip(gae_row(rewards[b].tolist(), values[b].tolist(), n, gamma, value_lam),
                                        values[b].tolist())]
        torch.testing.assert_close(returns[b, :n], torch.tensor(target[:n], dtype=torch.float64))
    valid = raw[mask]
    variance = ((valid - valid.mean()) ** 2).sum() / max(len(valid) - 1, 1)     # one token: 0, not NaN
    whitened = (valid - valid.mean()) / torch.sqrt(variance + 1e-8)
    torch.testing.assert_close(advantages[mask], whitened)


def test_the_policy_lambda_is_lam_unless_length_adaptive():
    mask = torch.arange(50)[None, :] < torch.tensor([[10], [20], [40]])
    assert ppo.policy_lambdas(mask, ppo.make_config({"LAM": 0.9})) == 0.9
    got = ppo.policy_lambdas(mask, ppo.make_config({"LENGTH_ADAPTIVE_LAM": 0.05}))
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 0.5]))      # 1 - 1/(0.05 l): < 0 clamped


def positive_inputs(seed, batch=6, width=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (batch,), generator=g)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    logprobs = -torch.rand(batch, width, generator=g, dtype=torch.float64) * 3
    rows = ppo.Experience(torch.ones(batch, 1, dtype=torch.long), torch.ones(batch, 1, dtype=torch.bool),
                          torch.zeros(batch, width, dtype=torch.long), mask, torch.ones(batch, dtype=torch.bool),
                          torch.tensor([1.0, 0.0, 1.0, -1.0, 2.0, 1.0], dtype=torch.float64)[:batch],
                          logprobs.clone(), logprobs.clone(), None, torch.zeros(batch, width, dtype=torch.float64),
                          torch.zeros(batch, width, dtype=torch.float64),
                          torch.tensor([True, True, False, True, True, True])[:batch])
    return rows, logprobs


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_positive_example_nll_against_the_formula(mode):
    """ppo_loss adds POSITIVE_LM_COEF x the NLL of the responses scoring >= POSITIVE_LM_THRESHOLD (trained rows
    only), aggregated like the policy loss over those rows: VAPO's -1/sum|o| sum log pi for token-mean, the mean
    of the sequences' token means for seq-mean-token-mean; its gradient is that term's."""
    rows, logprobs = positive_inputs(3)
    cfg = ppo.make_config({"LOSS_AGGREGATION": mode, "POSITIVE_LM_THRESHOLD": 1.0, "ENTROPY_COEF": 0.0})
    leaf = logprobs.clone().requires_grad_(True)
    counts = ppo.loss_counts(rows, cfg)
    base, _ = ppo.ppo_loss(leaf, torch.zeros_like(leaf), None, rows, cfg, counts)
    cfg_on = ppo.make_config({**cfg, "POSITIVE_LM_COEF": 0.3})
    with_nll, sums = ppo.ppo_loss(leaf, torch.zeros_like(leaf), None, rows, cfg_on, ppo.loss_counts(rows, cfg_on))
    positive = [b for b in range(6) if rows.trained[b] and rows.scores[b] >= 1.0]
    assert positive == [0, 4, 5]
    token_logps = [[logprobs[b, t].item() for t in range(int(rows.response_mask[b].sum()))] for b in positive]
    if mode == "token-mean":
        nll = -sum(sum(x) for x in token_logps) / sum(len(x) for x in token_logps)
    else:
        nll = -sum(sum(x) / len(x) for x in token_logps) / len(token_logps)
    assert (with_nll - base).item() == pytest.approx(0.3 * nll, rel=1e-9)
    (grad,) = torch.autograd.grad(with_nll - base, leaf)
    assert all((grad[b] == 0).all() for b in range(6) if b not in positive)
    assert sums["positive_tokens"].item() == sum(len(x) for x in token_logps)


@hsettings(max_examples=30, deadline=None, derandomize=True)
@given(data=st.data(), mode=st.sampled_from(list(ppo.CHOICES["LOSS_AGGREGATION"])))
def test_positive_example_nll_does_not_depend_on_the_micro_batches(data, mode):
    """Split into any micro-batches with the minibatch's counts (loss_counts summed over them), the NLL term's
    value and gradient are the whole minibatch's."""
    rows, logprobs = positive_inputs(7)
    cfg = ppo.make_config({"LOSS_AGGREGATION": mode, "POSITIVE_LM_COEF": 0.3, "ENTROPY_COEF": 0.0,
                           "MAX_NEW_TOKENS": 7})
    order = data.draw(st.permutations(list(range(6))))
    cut = data.draw(st.integers(1, 5))
    parts = [torch.tensor(order[:cut]), torch.tensor(order[cut:])]
    whole_leaf = logprobs.clone().requires_grad_(True)
    whole, _ = ppo.ppo_loss(whole_leaf, torch.zeros_like(logprobs), None, rows, cfg, ppo.loss_counts(rows, cfg))
    (whole_grad,) = torch.autograd.grad(whole, whole_leaf)
    leaf = logprobs.clone().requires_grad_(True)
    counts = sum(ppo.loss_counts(rows.select(idx), cfg) for idx in parts)
    total = 0
    for idx in parts:
        part = rows.select(idx)
        width = part.response_ids.shape[1]
        total = total + ppo.ppo_loss(leaf[idx][:, :width], torch.zeros(len(idx), width, dtype=torch.float64), None,
                                     part, cfg, counts)[0]
    (grad,) = torch.autograd.grad(total, leaf)
    assert total.item() == pytest.approx(whole.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(grad, whole_grad)


@pytest.fixture(scope="module")
def random_policy(tmp_path_factory):
    return high_entropy_policy(tmp_path_factory.mktemp("critic_policy") / "policy", seed=4)


def warmup_settings(tiny, random_policy, out, **overrides):
    return tiny_settings(tiny, out, **{"ACTOR_MODEL": random_policy, "VALUE_WARMUP_STEPS": 2, "MAX_STEPS": 3,
                                       "SAVE_EVERY_N_STEPS": 1, "EVAL_DATASETS": [], "MAX_NEW_TOKENS": 6,
                                       **overrides})


def test_value_warmup_trains_only_the_critic_and_leaves_the_policy_untouched(tiny, random_policy, tmp_path):
    """During the first VALUE_WARMUP_STEPS steps the policy's weights and its AdamW state do not change (no
    step at all: no moments, no step count), the critic learns and its explained variance is logged, the
    rollouts are still logged; from the next step the policy trains."""
    trainer = ppo.PPOTrainer(**warmup_settings(tiny, random_policy, tmp_path / "out"))
    policy_before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    critic_before = {k: v.clone() for k, v in trainer.critic.state_dict().items()}
    policy_ids = {id(p) for p in trainer.optimizer.param_groups[0]["params"]}
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "out" / "logs" / "metrics.jsonl").read_text().splitlines()]
    ratio = trainer.cfg.LEARNING_RATE / trainer.cfg.CRITIC_LEARNING_RATE
    assert [r["lr/policy"] for r in rows] == [0.0, 0.0, pytest.approx(rows[2]["lr/critic"] * ratio)]
    assert all(r["lr/critic"] > 0 for r in rows) and rows[2]["lr/policy"] > 0
    assert all(r["ppo/val/explained_variance"] is not None and r["objective/score"] is not None for r in rows)
    step_2 = load_file(tmp_path / "out" / "checkpoints" / "step_2" / "policy" / "model.safetensors")
    assert all(torch.equal(step_2[k], policy_before[k]) for k in step_2), "the policy moved during the warm-up"
    state_2 = torch.load(tmp_path / "out" / "checkpoints" / "step_2" / "training_state.pt", weights_only=True)
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    policy_states = [state_2["optimizer"]["state"].get(i) for i, p in enumerate(params) if id(p) in policy_ids]
    assert all(s is None for s in policy_states), "AdamW stepped the frozen policy"
    critic_2 = load_file(tmp_path / "out" / "checkpoints" / "step_2" / "critic" / "model.safetensors")
    assert any(not torch.equal(critic_2[k], critic_before[k]) for k in critic_2)
    step_3 = load_file(tmp_path / "out" / "checkpoints" / "step_3" / "policy" / "model.safetensors")
    assert any(not torch.equal(step_3[k], policy_before[k]) for k in step_3)


def test_value_warmup_resumes_exactly_across_its_end(tiny, random_policy, tmp_path):
    """3 steps straight (2 of warm-up), against a resume from a copy's step_1 (inside the warm-up): the same
    step_3 weights of policy and critic, bit for bit."""
    settings = warmup_settings(tiny, random_policy, tmp_path / "a")
    ppo.PPOTrainer(**settings).train()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    ppo.PPOTrainer(resume_from_checkpoint=str(tmp_path / "b" / "checkpoints" / "step_1"),
                   **{**settings, "OUTPUT_DIR": str(tmp_path / "b")}).train()
    for part in ("policy", "critic"):
        a = load_file(tmp_path / "a" / "checkpoints" / "step_3" / part / "model.safetensors")
        b = load_file(tmp_path / "b" / "checkpoints" / "step_3" / part / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), part


DRIVER = """
import json, sys, torch
sys.path.insert(0, {root!r})
import ppo
trainer = ppo.PPOTrainer(**json.load(open({config!r})))
experience = ppo.Experience(**torch.load({rollout!r}, weights_only=True))
rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
shard = experience.select(torch.arange(rank, len(experience), world))
trainer.minibatch_update(shard, [torch.arange(len(shard))])
grads = {{n: p.grad.clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()
         if p.grad is not None}}
if rank == 0:
    torch.save(grads, {grads!r})
trainer.accelerator.wait_for_everyone()
trainer.accelerator.end_training()
"""


def test_value_warmup_on_two_processes(tiny, random_policy, tmp_path):
    """In the warm-up the policy's terms weigh 0 but still reach every parameter: DDP over 2 processes does
    not stall on unused parameters, the policy's gradient is 0, and the critic's equals one process's."""
    settings = warmup_settings(tiny, random_policy, tmp_path / "out")
    trainer = ppo.PPOTrainer(**settings)
    experience, _, _, _ = trainer.make_experience(PROMPTS)
    torch.save({f.name: getattr(experience, f.name) for f in dataclasses.fields(experience)}, tmp_path / "rollout.pt")
    trainer.minibatch_update(experience, [torch.arange(len(experience))])
    single = {n: p.grad.clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()
              if p.grad is not None}
    (tmp_path / "run.json").write_text(json.dumps(settings))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), config=str(tmp_path / "run.json"),
                                    rollout=str(tmp_path / "rollout.pt"), grads=str(tmp_path / "grads.pt")))
    launch(TORCHRUN, [driver], tmp_path, 29711, timeout=300)
    both = torch.load(tmp_path / "grads.pt", weights_only=True)
    assert single.keys() == both.keys()
    for name, grad in single.items():
        if name.startswith("policy."):
            assert (grad == 0).all() and (both[name] == 0).all(), name
        torch.testing.assert_close(both[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    assert any(g.abs().sum() > 0 for n, g in single.items() if n.startswith("critic."))
