"""Tests of the pure PPO math of ppo.py (section "3. PPO math and its variants").

Every shipped function is compared with a slow reference written here from the formula it
implements (plain Python loops over sequences and tokens, the math / statistics modules, or
per-element torch ops in float64), never with a copy of the shipped code or numbers it produced.
Inputs are small and random, drawn from fixed torch.Generators, so every run sees the same data.

    python -m pytest -q tests/test_math.py
"""
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import aggregated
from torch.testing import assert_close

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ppo  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def prefix_mask(lengths, width: int) -> torch.Tensor:
    """(B, width) bool: row b is lengths[b] True followed by False (right padding)."""
    return torch.tensor([[t < n for t in range(width)] for n in lengths])


def random_lengths(g: torch.Generator, batch: int, width: int):
    """Lengths in [1, width] that always include a length-1 row and a full-length row."""
    lengths = torch.randint(1, width + 1, (batch,), generator=g).tolist()
    lengths[0] = 1
    if batch > 1:
        lengths[-1] = width
    return lengths


def fill_padding(x: torch.Tensor, mask: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """x with its padding positions replaced by garbage: huge numbers, inf, -inf and NaN."""
    garbage = torch.randn(x.shape, generator=g, dtype=torch.float64) * 1e6
    garbage.view(-1)[0::4] = float("nan")
    garbage.view(-1)[1::4] = float("inf")
    garbage.view(-1)[2::4] = float("-inf")
    return torch.where(mask, x, garbage.to(x.dtype))


# ---------------------------------------------------------------------------------------------
# compute_gae
# ---------------------------------------------------------------------------------------------
def gae_reference(rewards, values, lengths, gamma, lam):
    """Backwards loop over each sequence's real tokens only; V after the last real token is 0."""
    batch, width = len(rewards), len(rewards[0])
    adv = [[0.0] * width for _ in range(batch)]
    ret = [[0.0] * width for _ in range(batch)]
    for b in range(batch):
        n = lengths[b]
        running = 0.0
        for t in reversed(range(n)):
            next_value = values[b][t + 1] if t + 1 < n else 0.0
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            running = delta + gamma * lam * running
            adv[b][t] = running
            ret[b][t] = running + values[b][t]
    return adv, ret


GAE_PARAMS = [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0), (1.0, 1.0), (0.95, 0.5)]
GAE_SHAPES = [(1, 1), (2, 1), (3, 4), (5, 9), (6, 16)]


@pytest.mark.parametrize("gamma,lam", GAE_PARAMS)
@pytest.mark.parametrize("batch,width", GAE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compute_gae_matches_per_sequence_loop(gamma, lam, batch, width, dtype):
    """Advantages and returns = A + V equal the per-sequence backwards recursion on real tokens
    (bootstrap V = 0 after the last one) and are exactly 0 on padding."""
    g = gen(1000 + 7 * batch + width)
    lengths = random_lengths(g, batch, width)
    mask = prefix_mask(lengths, width)
    rewards = torch.randn(batch, width, generator=g, dtype=dtype)
    values = torch.randn(batch, width, generator=g, dtype=dtype)

    adv, ret = ppo.compute_gae(rewards, values, mask, gamma, lam)

    ref_adv, ref_ret = gae_reference(rewards.double().tolist(), values.double().tolist(), lengths, gamma, lam)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert adv.shape == ret.shape == (batch, width)
    assert_close(adv.double(), torch.tensor(ref_adv, dtype=torch.float64), **tol)
    assert_close(ret.double(), torch.tensor(ref_ret, dtype=torch.float64), **tol)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_compute_gae_single_token_and_no_discount_cases():
    """Hand-derivable cases: a length-1 sequence gets A = r - V; with gamma = lam = 1 the return at
    every real token is the sum of the remaining rewards (the values cancel)."""
    g = gen(1)
    rewards = torch.randn(2, 5, generator=g, dtype=torch.float64)
    values = torch.randn(2, 5, generator=g, dtype=torch.float64)
    mask = prefix_mask([1, 4], 5)
    adv, ret = ppo.compute_gae(rewards, values, mask, 1.0, 1.0)
    assert_close(adv[0, 0], rewards[0, 0] - values[0, 0])
    for t in range(4):
        assert_close(ret[1, t], sum(rewards[1, s] for s in range(t, 4)))


@pytest.mark.parametrize("gamma,lam", GAE_PARAMS)
def test_compute_gae_ignores_padding_contents(gamma, lam):
    """Whatever rewards / values hold on padding (huge numbers, inf, NaN) the result is unchanged."""
    g = gen(2)
    batch, width = 6, 11
    lengths = random_lengths(g, batch, width)
    mask = prefix_mask(lengths, width)
    rewards = torch.randn(batch, width, generator=g, dtype=torch.float64)
    values = torch.randn(batch, width, generator=g, dtype=torch.float64)
    clean = ppo.compute_gae(torch.where(mask, rewards, 0.0), torch.where(mask, values, 0.0), mask, gamma, lam)
    dirty = ppo.compute_gae(fill_padding(rewards, mask, g), fill_padding(values, mask, g), mask, gamma, lam)
    assert_close(dirty[0], clean[0], rtol=0, atol=0)
    assert_close(dirty[1], clean[1], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# clipped_policy_loss
# ---------------------------------------------------------------------------------------------
def policy_reference(logprob, old_logprob, advantage, eps):
    """(loss, clipped, d loss / d logprob) of one token, from the PPO-clip definition."""
    ratio = math.exp(logprob - old_logprob)
    loss = max(-advantage * ratio, -advantage * min(max(ratio, 1 - eps), 1 + eps))
    # clipping binds when the ratio has left the trust region in the direction that helps:
    clipped = (advantage > 0 and ratio > 1 + eps) or (advantage < 0 and ratio < 1 - eps)
    grad = 0.0 if clipped else -advantage * ratio
    return loss, clipped, grad


def policy_inputs(seed, shape):
    g = gen(seed)
    old = torch.randn(shape, generator=g, dtype=torch.float64) * 2 - 3
    logprobs = old + torch.randn(shape, generator=g, dtype=torch.float64) * 0.4
    advantages = torch.randn(shape, generator=g, dtype=torch.float64)
    flat_lp, flat_adv = logprobs.view(-1), advantages.view(-1)
    flat_lp[::5] = old.view(-1)[::5]                       # ratio exactly 1
    flat_adv[3::7] = 0.0                                   # zero advantage
    return logprobs, old, advantages


@pytest.mark.parametrize("clip_range", [0.1, 0.2, 0.3])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (4, 9), (8, 16)])
def test_clipped_policy_loss_value_flags_and_gradient(clip_range, shape):
    """loss = max(-A r, -A clip(r)); `clipped` marks where the clipped branch binds; d loss / d logp
    is exactly 0 there and -A r everywhere else (inside the trust region, or outside it in the
    direction where clipping does not bind)."""
    logprobs, old, advantages = policy_inputs(10 + shape[0] * shape[1], shape)
    leaf = logprobs.clone().requires_grad_(True)
    loss, clipped = ppo.clipped_policy_loss(leaf, old, advantages, None, clip_range, clip_range)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)

    ref = [policy_reference(lp, o, a, clip_range)
           for lp, o, a in zip(logprobs.view(-1).tolist(), old.view(-1).tolist(), advantages.view(-1).tolist())]
    ref_loss = torch.tensor([r[0] for r in ref], dtype=torch.float64).view(shape)
    ref_clipped = torch.tensor([r[1] for r in ref]).view(shape)
    ref_grad = torch.tensor([r[2] for r in ref], dtype=torch.float64).view(shape)

    assert clipped.dtype == torch.bool
    assert_close(loss, ref_loss)
    assert torch.equal(clipped, ref_clipped)
    assert (grad[ref_clipped] == 0).all()
    assert_close(grad, ref_grad)


def test_clipped_policy_loss_inputs_cover_every_branch():
    """The data of the test above reaches every case: ratio 1, inside the region, clipped, and
    outside the region but unclipped (so the gradient assertions are not vacuous)."""
    logprobs, old, advantages = policy_inputs(10 + 8 * 16, (8, 16))
    eps = 0.2
    kinds = set()
    for lp, o, a in zip(logprobs.view(-1).tolist(), old.view(-1).tolist(), advantages.view(-1).tolist()):
        r = math.exp(lp - o)
        _, clipped, _ = policy_reference(lp, o, a, eps)
        kinds.add("ratio1" if r == 1.0 else "clipped" if clipped
                  else "inside" if 1 - eps <= r <= 1 + eps else "outside_unclipped")
    assert kinds == {"ratio1", "clipped", "inside", "outside_unclipped"}


def test_clipped_policy_loss_ratio_one_gradient_is_minus_advantage():
    """At ratio exactly 1 (the first PPO epoch) the loss is -A and its gradient is exactly -A."""
    g = gen(3)
    old = torch.randn(4, 6, generator=g, dtype=torch.float64) - 2
    advantages = torch.randn(4, 6, generator=g, dtype=torch.float64)
    leaf = old.clone().requires_grad_(True)
    loss, clipped = ppo.clipped_policy_loss(leaf, old, advantages, None, 0.2, 0.2)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    assert_close(loss, -advantages)
    assert not clipped.any()
    assert_close(grad, -advantages)


# ---------------------------------------------------------------------------------------------
# clipped_value_loss
# ---------------------------------------------------------------------------------------------
def value_reference(v, v_old, ret, eps):
    """(loss, clipped, tie, d loss / d V) of one token: 0.5 max((V-R)^2, (clip(V, Vold-e, Vold+e)-R)^2)."""
    v_clipped = min(max(v, v_old - eps), v_old + eps)
    unclipped_sq, clipped_sq = (v - ret) ** 2, (v_clipped - ret) ** 2
    clipped = clipped_sq > unclipped_sq
    tie = v_clipped != v and clipped_sq == unclipped_sq        # subgradient: excluded from checks
    grad = 0.0 if clipped else v - ret
    return 0.5 * max(unclipped_sq, clipped_sq), clipped, tie, grad


def grid(g, shape, low, high, denominator=16):
    """Random dyadic numbers k / denominator: all the arithmetic below is exact in float64."""
    return torch.randint(low, high, shape, generator=g).double() / denominator


@pytest.mark.parametrize("clip_range_value", [0.25, 0.5, 0.2])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (6, 12)])
def test_clipped_value_loss_value_flags_and_gradient(clip_range_value, shape):
    """Loss value per element; `clipped` is set exactly where the clipped branch is strictly larger,
    where d loss / d V is 0; everywhere else it is V - R."""
    g = gen(20 + shape[0] * shape[1])
    old = grid(g, shape, -48, 48)
    values = old + grid(g, shape, -12, 13)
    returns = grid(g, shape, -48, 48)
    leaf = values.clone().requires_grad_(True)
    loss, clipped = ppo.clipped_value_loss(leaf, old, returns, clip_range_value)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)

    ref = [value_reference(v, o, r, clip_range_value)
           for v, o, r in zip(values.view(-1).tolist(), old.view(-1).tolist(), returns.view(-1).tolist())]
    ref_loss = torch.tensor([r[0] for r in ref], dtype=torch.float64).view(shape)
    ref_clipped = torch.tensor([r[1] for r in ref]).view(shape)
    tie = torch.tensor([r[2] for r in ref]).view(shape)
    ref_grad = torch.tensor([r[3] for r in ref], dtype=torch.float64).view(shape)

    assert_close(loss, ref_loss)
    assert torch.equal(clipped, ref_clipped)
    assert (grad[ref_clipped] == 0).all()
    assert_close(grad[~tie], ref_grad[~tie])
    if shape == (6, 12):                    # the data reaches both branches
        assert ref_clipped.any() and (~ref_clipped & ((values - old).abs() > clip_range_value)).any()


def test_clipped_value_loss_generic_floats():
    """On arbitrary float32 data the loss matches the reference, and `clipped` agrees wherever the
    two branches differ by more than rounding."""
    g = gen(4)
    shape = (16, 32)
    old = torch.randn(shape, generator=g) * 3
    values = old + torch.randn(shape, generator=g) * 0.3
    returns = torch.randn(shape, generator=g) * 3
    loss, clipped = ppo.clipped_value_loss(values, old, returns, 0.2)
    ref = [value_reference(v, o, r, 0.2)
           for v, o, r in zip(values.view(-1).tolist(), old.view(-1).tolist(), returns.view(-1).tolist())]
    assert_close(loss, torch.tensor([r[0] for r in ref], dtype=torch.float32).view(shape), rtol=1e-5, atol=1e-5)
    for (v, o, r), flag, (_, ref_flag, _, _) in zip(
            zip(values.view(-1).tolist(), old.view(-1).tolist(), returns.view(-1).tolist()),
            clipped.view(-1).tolist(), ref):
        vc = min(max(v, o - 0.2), o + 0.2)
        if abs((vc - r) ** 2 - (v - r) ** 2) > 1e-4:
            assert flag == ref_flag


# ---------------------------------------------------------------------------------------------
# kl_penalty
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-6, 0.1, 1.0, 10.0, 60.0])
def test_kl_penalty_k3_nonnegative(dtype, scale):
    """k3 >= 0 on every token, including tiny and very large log-ratio differences of both signs."""
    g = gen(5)
    logprobs = (torch.randn(64, 32, generator=g, dtype=torch.float64) - 3).to(dtype)
    ref_logprobs = (logprobs.double() + torch.randn(64, 32, generator=g, dtype=torch.float64) * scale).to(dtype)
    k3 = ppo.kl_penalty(logprobs, ref_logprobs, "k3")
    assert not torch.isnan(k3).any()
    assert (k3 >= 0).all()


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_penalty_zero_when_equal(estimator, dtype):
    """Identical log-probabilities give exactly 0 for both estimators."""
    logprobs = torch.randn(5, 7, generator=gen(6), dtype=dtype) - 2
    out = ppo.kl_penalty(logprobs, logprobs.clone(), estimator)
    assert (out == 0).all()


def test_kl_penalty_matches_formulas_elementwise():
    """k1 = logp - ref and k3 = exp(ref - logp) - 1 - (ref - logp), per element in float64."""
    g = gen(7)
    logprobs = torch.randn(6, 9, generator=g, dtype=torch.float64) - 3
    ref_logprobs = logprobs + torch.randn(6, 9, generator=g, dtype=torch.float64) * 2
    k1 = ppo.kl_penalty(logprobs, ref_logprobs, "k1")
    k3 = ppo.kl_penalty(logprobs, ref_logprobs, "k3")
    pairs = list(zip(logprobs.view(-1).tolist(), ref_logprobs.view(-1).tolist()))
    assert_close(k1.view(-1), torch.tensor([lp - r for lp, r in pairs], dtype=torch.float64))
    assert_close(k3.view(-1), torch.tensor([math.exp(r - lp) - 1 - (r - lp) for lp, r in pairs],
                                           dtype=torch.float64))
    assert ppo.kl_penalty(logprobs, ref_logprobs).equal(k1)          # "k1" is the default


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_penalty_monte_carlo_estimates_true_kl(estimator, seed):
    """Averaged over tokens sampled from p, both estimators approach the exact KL(p || q) =
    sum p log(p / q) (within 5 standard errors of the sample mean); k3's samples are never negative."""
    g = gen(100 + seed)
    vocab, n = 12, 200_000
    p = torch.softmax(torch.randn(vocab, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * 1.5, 0)
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    samples = torch.multinomial(p, n, replacement=True, generator=g)
    per_sample = ppo.kl_penalty(p.log()[samples], q.log()[samples], estimator)
    std_error = per_sample.std().item() / math.sqrt(n)
    assert abs(per_sample.mean().item() - exact) < 5 * std_error
    if estimator == "k3":
        assert (per_sample >= 0).all()


def test_kl_penalty_rejects_unknown_estimator():
    with pytest.raises(ppo.ConfigError, match="KL_ESTIMATOR = 'k4' must be one of 'k1', 'k2', 'k3'"):
        ppo.validate_config(ppo.make_config({"KL_ESTIMATOR": "k4"}))


# ---------------------------------------------------------------------------------------------
# masked_mean, masked_var, masked_whiten
# ---------------------------------------------------------------------------------------------
def valid_entries(x: torch.Tensor, mask: torch.Tensor):
    """The entries of x where mask is True, as a 1-D list of Python floats."""
    return [v for v, m in zip(x.reshape(-1).tolist(), mask.reshape(-1).tolist()) if m]


def moment_inputs(seed, shape):
    g = gen(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    mask = torch.rand(shape, generator=g) < 0.6
    mask.view(-1)[0] = True
    mask.view(-1)[-1] = True
    return x, mask


MOMENT_SHAPES = [(1, 2), (3, 4), (5, 17), (2, 3, 6)]


@pytest.mark.parametrize("shape", MOMENT_SHAPES)
def test_masked_mean_and_var_against_selected_entries(shape):
    """masked_mean = mean of the valid entries; masked_var is Bessel-corrected by default and the
    population variance with unbiased=False."""
    x, mask = moment_inputs(30 + len(shape) * 10 + shape[-1], shape)
    valid = valid_entries(x, mask)
    assert_close(ppo.masked_mean(x, mask), torch.tensor(statistics.fmean(valid), dtype=torch.float64))
    assert_close(ppo.masked_var(x, mask), torch.tensor(statistics.variance(valid), dtype=torch.float64))
    assert_close(ppo.masked_var(x, mask, unbiased=False),
                 torch.tensor(statistics.pvariance(valid), dtype=torch.float64))


def test_masked_mean_along_a_dimension():
    """masked_mean(dim=1) is the mean of each row's valid entries; a row with none gives 0, not NaN."""
    g = gen(8)
    x = torch.randn(5, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 9, generator=g) < 0.5
    mask[0, :] = False
    mask[1, :] = True
    mask[2, :] = False
    mask[2, 4] = True
    out = ppo.masked_mean(x, mask, dim=1)
    expected = [statistics.fmean(valid_entries(x[b], mask[b])) if mask[b].any() else 0.0 for b in range(5)]
    assert_close(out, torch.tensor(expected, dtype=torch.float64))


def whiten_reference(x, mask, mean, var, eps=1e-8):
    out = torch.zeros_like(x, dtype=torch.float64).view(-1)
    for i, (v, m) in enumerate(zip(x.reshape(-1).tolist(), mask.reshape(-1).tolist())):
        if m:
            out[i] = (v - mean) / math.sqrt(var + eps)
    return out.view(x.shape)


@pytest.mark.parametrize("shape", MOMENT_SHAPES)
def test_masked_whiten_against_reference(shape):
    """(x - mean) / sqrt(var + eps) over the valid entries, padding exactly 0; the valid entries
    end with mean 0 and unbiased variance ~1."""
    x, mask = moment_inputs(40 + shape[-1], shape)
    valid = valid_entries(x, mask)
    out = ppo.masked_whiten(x, mask)
    expected = whiten_reference(x, mask, statistics.fmean(valid), statistics.variance(valid))
    assert_close(out, expected)
    assert (out[~mask] == 0).all()
    if len(valid) > 2:
        whitened = valid_entries(out, mask)
        assert abs(statistics.fmean(whitened)) < 1e-9
        assert abs(statistics.variance(whitened) - 1) < 1e-6


def test_masked_whiten_uses_given_mean_and_var():
    """Explicit mean / var (e.g. gathered from all processes) replace the local moments."""
    x, mask = moment_inputs(9, (4, 7))
    mean, var = torch.tensor(0.75, dtype=torch.float64), torch.tensor(2.5, dtype=torch.float64)
    out = ppo.masked_whiten(x, mask, mean, var)
    assert_close(out, whiten_reference(x, mask, 0.75, 2.5))
    local = ppo.masked_whiten(x, mask)
    assert not torch.allclose(out, local)


@pytest.mark.parametrize("shape", MOMENT_SHAPES)
def test_masked_mean_var_against_reference(shape):
    """masked_mean_var is the mean and the Bessel-corrected variance of the valid entries; all_sum
    sees exactly the two sums it must add over processes (here a recorder that adds nothing)."""
    x, mask = moment_inputs(70 + shape[-1], shape)
    valid = valid_entries(x, mask)
    seen = []
    mean, var = ppo.masked_mean_var(x, mask, lambda t: seen.append(t.clone()) or t)
    assert_close(mean, torch.tensor(statistics.fmean(valid), dtype=torch.float64))
    if len(valid) > 1:
        assert_close(var, torch.tensor(statistics.variance(valid), dtype=torch.float64))
    assert_close(seen[0], torch.tensor([sum(valid), len(valid)], dtype=torch.float64))
    assert len(seen) == 2


def test_nan_in_padding_does_not_leak():
    """NaN / inf on padding changes none of masked_mean, masked_var, masked_whiten (whose padding
    stays 0) nor explained_variance."""
    x, mask = moment_inputs(11, (4, 9))
    mask[0, 3] = False
    dirty = fill_padding(x, mask, gen(12))
    assert torch.isnan(dirty).any()
    clean = torch.where(mask, x, 0.0)
    assert_close(ppo.masked_mean(dirty, mask), ppo.masked_mean(clean, mask), rtol=0, atol=0)
    assert_close(ppo.masked_mean(dirty, mask, dim=1), ppo.masked_mean(clean, mask, dim=1), rtol=0, atol=0)
    assert_close(ppo.masked_var(dirty, mask), ppo.masked_var(clean, mask), rtol=0, atol=0)
    out = ppo.masked_whiten(dirty, mask)
    assert_close(out, ppo.masked_whiten(clean, mask), rtol=0, atol=0)
    assert (out[~mask] == 0).all()
    values = torch.randn(4, 9, generator=gen(13), dtype=torch.float64)
    assert_close(ppo.explained_variance(fill_padding(values, mask, gen(14)), dirty, mask),
                 ppo.explained_variance(torch.where(mask, values, 0.0), clean, mask), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# logprobs_and_entropy
# ---------------------------------------------------------------------------------------------
def reference_logprobs_entropy(logits64: torch.Tensor, tokens: torch.Tensor, temperature: float):
    """Naive float64: log_softmax(logits / T) gathered at the tokens, and -(p log p).sum."""
    log_p = torch.log_softmax(logits64 / temperature, dim=-1)
    logprobs = log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logprobs, entropy


def reference_grad(logits, tokens, temperature, grad_lp, grad_ent):
    """d/d logits of sum(grad_lp * logp) + sum(grad_ent * H) through the float64 reference
    (a None upstream gradient means that output is unused)."""
    leaf = logits.detach().double().requires_grad_(True)
    lp, ent = reference_logprobs_entropy(leaf, tokens, temperature)
    objective = sum((out * up.double()).sum() for out, up in ((lp, grad_lp), (ent, grad_ent)) if up is not None)
    return torch.autograd.grad(objective, leaf)[0]


def shipped_grad(logits, tokens, temperature, grad_lp, grad_ent, chunk_rows=None):
    leaf = logits.detach().clone().requires_grad_(True)
    if chunk_rows is None:
        lp, ent = ppo.logprobs_and_entropy(leaf, tokens, temperature)
    else:
        lp, ent = ppo._LogprobsAndEntropy.apply(leaf, tokens, float(temperature), chunk_rows, True)
    objective = sum((out * up).sum() for out, up in ((lp, grad_lp), (ent, grad_ent)) if up is not None)
    return torch.autograd.grad(objective, leaf)[0]


def grad_tolerance(dtype):
    return dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-4)


def lp_inputs(seed, shape, dtype):
    g = gen(seed)
    logits = (torch.randn(shape, generator=g) * 3).to(dtype)
    tokens = torch.randint(0, shape[-1], shape[:-1], generator=g)
    grad_lp = torch.randn(shape[:-1], generator=g)
    grad_ent = torch.randn(shape[:-1], generator=g)
    return logits, tokens, grad_lp, grad_ent


LP_SHAPES = [(1, 1, 2), (2, 3, 11), (3, 5, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("shape", LP_SHAPES)
def test_logprobs_and_entropy_forward(dtype, temperature, shape):
    """Outputs are float32 (B, T) and equal the float64 reference computed from the same (upcast)
    logits; bf16 logits are upcast exactly, so the forward tolerance is tight for both dtypes."""
    logits, tokens, _, _ = lp_inputs(50 + shape[-1], shape, dtype)
    lp, ent = ppo.logprobs_and_entropy(logits, tokens, temperature)
    ref_lp, ref_ent = reference_logprobs_entropy(logits.double(), tokens, temperature)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == shape[:-1]
    assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
    assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    assert (ent >= -1e-6).all() and (ent <= math.log(shape[-1]) + 1e-5).all()


@pytest.mark.parametrize("used", ["both", "logprobs", "entropy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("shape", LP_SHAPES)
def test_logprobs_and_entropy_backward(used, dtype, temperature, shape):
    """For random upstream gradients on both outputs, or on one with the other unused, the custom
    backward equals autograd through the float64 reference; the gradient has the logits' dtype."""
    logits, tokens, grad_lp, grad_ent = lp_inputs(60 + shape[-1], shape, dtype)
    grad_lp = grad_lp if used in ("both", "logprobs") else None
    grad_ent = grad_ent if used in ("both", "entropy") else None
    got = shipped_grad(logits, tokens, temperature, grad_lp, grad_ent)
    assert got.dtype == dtype
    assert_close(got.double(), reference_grad(logits, tokens, temperature, grad_lp, grad_ent),
                 **grad_tolerance(dtype))


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 7, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_entropy_row_chunks(chunk_rows, dtype):
    """The shipped autograd Function with a small chunk (rows not a multiple of it): forward and
    backward agree with the reference on every row, so chunk boundaries lose and mix nothing."""
    rows, vocab, temperature = 10, 33, 0.7
    logits, tokens, grad_lp, grad_ent = lp_inputs(70 + chunk_rows, (rows, vocab), dtype)
    lp, ent = ppo._LogprobsAndEntropy.apply(logits, tokens, temperature, chunk_rows, True)
    ref_lp, ref_ent = reference_logprobs_entropy(logits.double(), tokens, temperature)
    assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
    assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    got = shipped_grad(logits, tokens, temperature, grad_lp, grad_ent, chunk_rows=chunk_rows)
    assert_close(got.double(), reference_grad(logits, tokens, temperature, grad_lp, grad_ent),
                 **grad_tolerance(dtype))


def test_logprobs_and_entropy_large_vocab_chunked():
    """A vocabulary of 2**17 makes the public function split its 130 rows into chunks of
    (1 << 24) // vocab = 128 rows; rows on both sides of the boundary (and a sample of the rest)
    match the per-row float64 reference."""
    vocab, batch, length, temperature = 1 << 17, 10, 13, 0.7
    rows = batch * length
    assert rows > (1 << 24) // vocab
    g = gen(80)
    logits = torch.randn(batch, length, vocab, generator=g, dtype=torch.bfloat16)
    tokens = torch.randint(0, vocab, (batch, length), generator=g)
    with torch.no_grad():
        lp, ent = ppo.logprobs_and_entropy(logits, tokens, temperature)
    flat_logits, flat_tokens = logits.view(rows, vocab), tokens.view(rows)
    checked = sorted({0, 1, 126, 127, 128, 129} | set(torch.randint(0, rows, (10,), generator=g).tolist()))
    for r in checked:
        ref_lp, ref_ent = reference_logprobs_entropy(flat_logits[r].double(), flat_tokens[r], temperature)
        assert_close(lp.view(rows)[r].double(), ref_lp, rtol=1e-5, atol=1e-4)
        assert_close(ent.view(rows)[r].double(), ref_ent, rtol=1e-5, atol=1e-4)


# -- head_logprobs_and_entropy: the fused LM head ----------------------------------------------
def head_inputs(seed, rows, hidden, vocab, dtype=torch.float32):
    g = gen(seed)
    h = (torch.randn(rows, hidden, generator=g) * 0.5).to(dtype)
    w = torch.randn(vocab, hidden, generator=g) * 0.5
    tokens = torch.randint(0, vocab, (rows,), generator=g)
    return h, w, tokens, torch.randn(rows, generator=g), torch.randn(rows, generator=g)


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("used", ["both", "logprobs", "entropy"])
def test_fused_head_equals_the_head_then_the_softmax(chunk_rows, temperature, used):
    """The fused head's log pi and H, and their gradients w.r.t. the hidden states and the head's weight, equal
    autograd through hidden @ W^T and the float64 reference (chunks not dividing the rows)."""
    h, w, tokens, grad_lp, grad_ent = head_inputs(100 + chunk_rows, 10, 6, 37)
    grad_lp = grad_lp if used in ("both", "logprobs") else None
    grad_ent = grad_ent if used in ("both", "entropy") else None
    h_leaf, w_leaf = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp, ent = ppo._HeadLogprobsAndEntropy.apply(h_leaf, w_leaf, tokens, temperature, chunk_rows, True,
                                                torch.float32)
    objective = sum((out * up).sum() for out, up in ((lp, grad_lp), (ent, grad_ent)) if up is not None)
    got_h, got_w = torch.autograd.grad(objective, (h_leaf, w_leaf))
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    ref_lp, ref_ent = reference_logprobs_entropy(h64 @ w64.t(), tokens, temperature)
    assert_close(lp.double(), ref_lp.detach(), rtol=1e-5, atol=1e-5)
    assert_close(ent.double(), ref_ent.detach(), rtol=1e-5, atol=1e-5)
    ref_objective = sum((out * up.double()).sum() for out, up in ((ref_lp, grad_lp), (ref_ent, grad_ent))
                        if up is not None)
    ref_h, ref_w = torch.autograd.grad(ref_objective, (h64, w64))
    assert_close(got_h.double(), ref_h, rtol=1e-4, atol=1e-5)
    assert_close(got_w.double(), ref_w, rtol=1e-4, atol=1e-5)


def test_fused_head_chunks_a_real_vocabulary_and_matches_the_unfused_path():
    """At Qwen2.5's 151,646 tokens the public function makes (1 << 22) // V = 27 rows a chunk, so 130 rows take
    5 chunks; values and both gradients equal the unfused path (head, then logprobs_and_entropy)."""
    vocab, rows = 151_646, 130
    assert rows > (1 << 22) // vocab
    h, w, tokens, grad_lp, grad_ent = head_inputs(110, rows, 8, vocab)
    leaves = [x.clone().requires_grad_(True) for x in (h, w, h, w)]
    fused = ppo.head_logprobs_and_entropy(leaves[0].view(10, 13, 8), leaves[1], tokens.view(10, 13), 0.7)
    plain = ppo.logprobs_and_entropy((leaves[2] @ leaves[3].t()).view(10, 13, vocab), tokens.view(10, 13), 0.7)
    for a, b in zip(fused, plain):
        assert_close(a, b, rtol=1e-5, atol=1e-5)
    grads = [torch.autograd.grad((out[0] * grad_lp.view(10, 13)).sum() + (out[1] * grad_ent.view(10, 13)).sum(),
                                 pair) for out, pair in ((fused, leaves[:2]), (plain, leaves[2:]))]
    for a, b in zip(*grads):
        assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fused_head_under_autocast_computes_the_head_in_its_dtype():
    """Under bf16 autocast the fused head gives what the model's own bf16 head would (logits in bf16,
    upcast exactly), not float32 logits."""
    h, w, tokens, _, _ = head_inputs(120, 12, 16, 50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = ppo.head_logprobs_and_entropy(h.view(3, 4, 16), w, tokens.view(3, 4))
        logits = nn.functional.linear(h, w)
    assert logits.dtype == torch.bfloat16
    plain = ppo.logprobs_and_entropy(logits.view(3, 4, 50), tokens.view(3, 4))
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)


def test_logprobs_and_entropy_gradcheck():
    """torch.autograd.gradcheck on float64 logits.  The outputs are float32 by design, so the
    finite-difference step is 1e-3 (1e-6 would sit below float32 resolution)."""
    g = gen(90)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 5, (2, 3), generator=g)
    for temperature in (1.0, 0.7):
        def fn(x):
            return tuple(out.double() for out in ppo.logprobs_and_entropy(x, tokens, temperature))
        assert torch.autograd.gradcheck(fn, (logits,), eps=1e-3, atol=1e-3, rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# shape_rewards
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kl_coef", [0.0, 0.05, 1.3])
@pytest.mark.parametrize("batch,width", [(1, 1), (3, 4), (6, 10)])
def test_shape_rewards_against_loop(kl_coef, batch, width):
    """r_t = -beta KL_t on every real token, plus the score at index length - 1, 0 on padding
    (length-1 and full-length rows included; NaN in the padding of kl does not leak)."""
    g = gen(200 + batch * width)
    lengths = random_lengths(g, batch, width)
    mask = prefix_mask(lengths, width)
    kl = torch.randn(batch, width, generator=g)
    scores = torch.randn(batch, generator=g) * 3
    rewards = ppo.shape_rewards(scores, fill_padding(kl, mask, g), mask, kl_coef)
    expected = [[0.0] * width for _ in range(batch)]
    for b in range(batch):
        for t in range(lengths[b]):
            expected[b][t] = -kl_coef * kl[b, t].item()
        expected[b][lengths[b] - 1] += scores[b].item()
    assert rewards.shape == (batch, width)
    assert_close(rewards.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert (rewards[~mask] == 0).all()


# ---------------------------------------------------------------------------------------------
# explained_variance
# ---------------------------------------------------------------------------------------------
def test_explained_variance_against_reference():
    """1 - Var(R - V) / Var(R) over the valid tokens only."""
    g = gen(300)
    returns = torch.randn(5, 8, generator=g, dtype=torch.float64) * 2
    values = returns + torch.randn(5, 8, generator=g, dtype=torch.float64) * 0.7
    mask = prefix_mask([1, 3, 8, 5, 2], 8)
    r = valid_entries(returns, mask)
    d = [ri - vi for ri, vi in zip(r, valid_entries(values, mask))]
    expected = 1 - statistics.variance(d) / statistics.variance(r)
    assert_close(ppo.explained_variance(values, returns, mask), torch.tensor(expected, dtype=torch.float64))


def test_explained_variance_perfect_and_constant_critic():
    """values == returns gives 1; values equal to the mean of the valid returns gives ~0."""
    g = gen(301)
    returns = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = prefix_mask([6, 2, 4, 1], 6)
    one = torch.tensor(1.0, dtype=torch.float64)
    assert_close(ppo.explained_variance(returns.clone(), returns, mask), one)
    mean = statistics.fmean(valid_entries(returns, mask))
    constant = torch.full_like(returns, mean)
    assert_close(ppo.explained_variance(constant, returns, mask), torch.zeros((), dtype=torch.float64),
                 rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# lr_factor
# ---------------------------------------------------------------------------------------------
def lr_reference(step, total, warmup, kind):
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (total - warmup))
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1 - progress
    return 1.0


KINDS = ["cosine", "linear", "constant", "plateau"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("total,warmup", [(50, 0), (50, 1), (50, 10), (7, 3), (2, 1)])
def test_lr_factor_grid(kind, total, warmup):
    """Linear warmup (step + 1) / warmup, then the schedule of progress (step - warmup) / (total -
    warmup); 1 at the first post-warmup step; cosine / linear never increase after warmup and
    stay at 0 past the end; constant / plateau stay 1."""
    steps = range(total + 5)
    factors = [ppo.lr_factor(s, total, warmup, kind) for s in steps]
    for s, f in zip(steps, factors):
        assert f == pytest.approx(lr_reference(s, total, warmup, kind), abs=1e-12), s
    assert factors[warmup] == pytest.approx(1.0)
    for s in range(1, warmup):
        assert factors[s] > factors[s - 1]
    after = factors[warmup:]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))
    if kind in ("cosine", "linear"):
        assert all(f == pytest.approx(0.0, abs=1e-12) for f in factors[total:])
    else:
        assert all(f == 1.0 for f in after)


# ---------------------------------------------------------------------------------------------
# adaptive_kl_coef
# ---------------------------------------------------------------------------------------------
def ziegler_reference(beta, kl, n, target, horizon):
    """Ziegler et al. 2019, 2.2: e = clip(KL / target - 1, -0.2, 0.2); beta <- beta (1 + e n / horizon)."""
    error = kl / target - 1
    error = -0.2 if error < -0.2 else 0.2 if error > 0.2 else error
    return beta * (1 + error * n / horizon)


@pytest.mark.parametrize("target,horizon,n", [(6.0, 10000, 64), (0.5, 1000, 8), (2.0, 100, 100)])
def test_adaptive_kl_coef(target, horizon, n):
    """Matches the formula; grows above the target, shrinks below, unchanged at it; the error is
    clipped, so KL = 2x and 10x the target give the same step."""
    beta = 0.05
    for ratio in [0.0, 0.3, 0.8, 0.95, 1.0, 1.05, 1.2, 2.0, 10.0]:
        kl = ratio * target
        new = ppo.adaptive_kl_coef(beta, kl, n, target, horizon)
        assert new == pytest.approx(ziegler_reference(beta, kl, n, target, horizon), rel=1e-12)
        if ratio > 1:
            assert new > beta
        elif ratio < 1:
            assert new < beta
        else:
            assert new == beta
    assert ppo.adaptive_kl_coef(beta, 2 * target, n, target, horizon) == pytest.approx(
        ppo.adaptive_kl_coef(beta, 10 * target, n, target, horizon), rel=1e-12)
    assert ppo.adaptive_kl_coef(beta, 0.0, n, target, horizon) == pytest.approx(beta * (1 - 0.2 * n / horizon))


# ---------------------------------------------------------------------------------------------
# merge_moments
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("start", [(0.0, 1.0), (5.0, 3.0)])
@pytest.mark.parametrize("sizes", [[1], [4, 1, 9], [17, 3, 64, 1, 2]])
def test_merge_moments_sequential_equals_concatenation(start, sizes):
    """Merging batch moments one after another, from count 0 (whatever mean / var it holds), gives
    numpy's mean and population variance of everything seen so far."""
    rng = np.random.default_rng(sum(sizes))
    mean, var, count = start[0], start[1], 0
    seen = []
    for i, size in enumerate(sizes):
        batch = rng.normal(loc=i - 1.0, scale=1.0 + i, size=size)
        seen.append(batch)
        mean, var, count = ppo.merge_moments(mean, var, count, float(batch.mean()), float(batch.var()), size)
        everything = np.concatenate(seen)
        assert count == everything.size
        assert mean == pytest.approx(float(everything.mean()), rel=1e-12, abs=1e-12)
        assert var == pytest.approx(float(everything.var()), rel=1e-10, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# last_number and answer_matches
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", 72.0),
    ("The answer is 72.", 72.0),
    ("It costs 1,000 dollars", 1000.0),
    ("1,234,567", 1234567.0),
    ("The temperature fell to -5 degrees", -5.0),
    ("She paid $3.50 in total.", 3.5),
    ("first 3.14 then 2", 2.0),
    ("no digits here", None),
    ("", None),
])
def test_last_number(text, expected):
    assert ppo.last_number(text) == expected


@pytest.mark.parametrize("response,reference,rule,expected", [
    ("So she sold 48 + 24 = 72. The answer is 72.", "48/2 = 24\n#### 72", "last_number", True),
    ("The answer is 71.", "#### 72", "last_number", False),
    ("The total is 1,000.", "#### 1000", "last_number", True),
    ("The total is 1000", "#### 1,000", "last_number", True),
    ("He is down -3 dollars", "#### -3", "last_number", True),
    ("He is down 3 dollars", "#### -3", "last_number", False),
    ("It is 2.5 hours", "#### 2.50", "last_number", True),
    ("It is 2.5 hours", "#### 2.6", "last_number", False),
    ("I do not know", "#### 72", "last_number", False),
    ("I do not know", "no number either", "last_number", False),
    ("72", "no number", "last_number", False),
    ("  Paris \n", "Paris", "exact", True),
    ("New   York\tCity", "New York City", "exact", True),
    ("NewYork", "New York", "exact", False),
    ("paris", "Paris", "exact", False),
    ("Paris, France", "Paris", "exact", False),
    ("The capital is Paris.", " Paris ", "contains", True),
    ("The capital is Lyon.", "Paris", "contains", False),
    (r"So x = \boxed{42}.", "42", "boxed", True),                     # a bare reference
    (r"\boxed{41} no, \boxed{42}", r"The answer is \boxed{42}", "boxed", True),   # the last ones
    (r"\boxed{42.0}", r"\boxed{42}", "boxed", True),                   # equal as numbers
    (r"\boxed{\frac{1}{2}}", r"\boxed{\frac {1}{2}}", "boxed", True),  # nested braces, spaces
    (r"\boxed{x+1}", r"\boxed{x + 2}", "boxed", False),
    ("The answer is 42.", r"\boxed{42}", "boxed", False),             # nothing boxed
])
def test_answer_matches(response, reference, rule, expected):
    assert ppo.answer_matches(response, reference, rule) is expected


def test_answer_matches_rejects_unknown_rule():
    with pytest.raises(ppo.ConfigError, match="ANSWER_MATCH = 'fuzzy' must be one of"):
        ppo.validate_config(ppo.make_config({"ANSWER_MATCH": "fuzzy"}))


# ---------------------------------------------------------------------------------------------
# group_advantages (critic-free estimators)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [2, 3, 5])
def test_group_advantages_grpo(group_size):
    """GRPO: each reward minus its group's mean, over the group's (Bessel) standard deviation + eps."""
    rewards = torch.randn(4 * group_size, generator=gen(200 + group_size), dtype=torch.float64)
    got = ppo.group_advantages(rewards, group_size, "grpo", eps=1e-6)
    for g in range(4):
        group = rewards[g * group_size:(g + 1) * group_size].tolist()
        mean, std = statistics.mean(group), statistics.stdev(group)
        for i, r in enumerate(group):
            assert math.isclose(got[g * group_size + i].item(), (r - mean) / (std + 1e-6), rel_tol=1e-9)


@pytest.mark.parametrize("group_size", [2, 4])
def test_group_advantages_rloo(group_size):
    """RLOO: each reward minus the mean of the other G - 1 rewards of its group."""
    rewards = torch.randn(3 * group_size, generator=gen(210 + group_size), dtype=torch.float64)
    got = ppo.group_advantages(rewards, group_size, "rloo")
    for g in range(3):
        group = rewards[g * group_size:(g + 1) * group_size].tolist()
        for i, r in enumerate(group):
            others = group[:i] + group[i + 1:]
            assert math.isclose(got[g * group_size + i].item(), r - sum(others) / len(others), rel_tol=1e-9,
                                abs_tol=1e-12)


def test_group_advantages_are_per_group():
    """Shifting one group's rewards by a constant changes no advantage (the baseline is the group)."""
    rewards = torch.randn(12, generator=gen(220), dtype=torch.float64)
    shifted = rewards.clone()
    shifted[4:8] += 100.0
    for estimator in ("grpo", "rloo"):
        assert_close(ppo.group_advantages(rewards, 4, estimator), ppo.group_advantages(shifted, 4, estimator))
    with pytest.raises(ppo.ConfigError, match="ADVANTAGE_ESTIMATOR = 'ppo' must be one of"):
        ppo.validate_config(ppo.make_config({"ADVANTAGE_ESTIMATOR": "ppo"}))


def test_logprobs_without_entropy():
    """with_entropy=False gives the same logprobs (and zeros for the entropy it skipped)."""
    logits, tokens, _, _ = lp_inputs(95, (3, 4, 11), torch.float32)
    lp, ent = ppo.logprobs_and_entropy(logits, tokens, 0.7, with_entropy=False)
    ref_lp, _ = ppo.logprobs_and_entropy(logits, tokens, 0.7)
    assert torch.equal(lp, ref_lp) and torch.equal(ent, torch.zeros_like(ent))


# =============================================================================================
# The policy-gradient variants, loss aggregation and the micro-batched ppo_loss of section 4:
# DAPO's clip-higher and overlong penalty, the dual clip, GSPO, CISPO, the k2 KL, Dr. GRPO,
# dynamic sampling's uninformative groups. Shapes, clip ranges, group sizes and seeds are drawn
# by hypothesis (derandomized, so every run sees the same examples); each function is checked
# against a loop over Python floats written from its paper's formula.
# =============================================================================================
import types  # noqa: E402

from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
SEEDS = st.integers(0, 10 ** 6)
CLIPS = st.one_of(st.floats(0.02, 0.5), st.sampled_from([3e-4, 4e-4]))   # GSPO's ranges are ~3e-4
DUALS = st.sampled_from([0.0, 1.5, 2.0, 3.0])
CLIPPED_BRANCHES = {"clipped_high", "clipped_low", "dual"}


def drawn(max_examples: int):
    """hypothesis settings of this section: derandomized, no deadline (2 slow cores)."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def high_entropy_logprobs(g: torch.Generator, shape, n: int = 2, vocab: int = 6, drift: float = 1.5):
    """n float64 (shape) tensors: log pi(token) of the same random tokens under n softmaxes, the first
    of logits with std 2, the others of those logits + noise of std `drift`. Entropies are high and
    the ratios exp(lp_0 - lp_k) spread over about [e^-4, e^4], far beyond any clip range."""
    logits = torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * 2
    tokens = torch.randint(vocab, (*shape, 1), generator=g)
    out = []
    for k in range(n):
        z = logits if k == 0 else logits + torch.randn(logits.shape, generator=g, dtype=torch.float64) * drift
        out.append(torch.log_softmax(z, -1).gather(-1, tokens).squeeze(-1))
    return out


def finite_garbage(x: torch.Tensor, mask: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """x with its padding replaced by large finite garbage (std 30): exp(garbage) stays finite in
    float64, so a leak shows up as a wrong number rather than as a NaN from inf * 0."""
    return torch.where(mask, x, torch.randn(x.shape, generator=g, dtype=x.dtype) * 30)


def token_inputs(seed: int, shape):
    """logprobs, old logprobs, advantages (float64); some ratios exactly 1, some advantages 0."""
    g = gen(seed)
    lp, old = high_entropy_logprobs(g, shape)
    adv = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5
    lp.view(-1)[::7] = old.view(-1)[::7]
    adv.view(-1)[3::11] = 0.0
    return lp, old, adv


def flat(*tensors):
    return [t.reshape(-1).tolist() for t in tensors]


def draw_partition(data, n: int, min_parts: int = 1):
    """A random partition of range(n) into micro-batches: a permutation cut at random points."""
    order = data.draw(st.permutations(range(n)))
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), min_size=min_parts - 1, max_size=n - 1))) if n > 1 else []
    bounds = [0] + cuts + [n]
    return [torch.tensor(order[a:b]) for a, b in zip(bounds, bounds[1:])]


def surrogate_reference(ratio, adv, low, high, dual=0.0):
    """(loss, branch, d loss / d log ratio) of one token: max(-A r, -A clip(r, 1 - low, 1 + high))
    (DAPO's clip-higher range), then for A < 0 and c > 1 the dual clip min(., -c A) (Ye et al. 2020)."""
    loss = max(-adv * ratio, -adv * min(max(ratio, 1 - low), 1 + high))
    if dual and adv < 0:
        loss = min(loss, -dual * adv)
    if dual and adv < 0 and ratio > dual:
        branch = "dual"                   # the constant -c A is the value
    elif adv > 0 and ratio > 1 + high:
        branch = "clipped_high"           # the constant -A (1 + high)
    elif adv < 0 and ratio < 1 - low:
        branch = "clipped_low"            # the constant -A (1 - low)
    elif ratio == 1.0:
        branch = "ratio_one"
    elif 1 - low <= ratio <= 1 + high:
        branch = "inside"
    else:
        branch = "outside_unclipped"      # out of the range in the direction that hurts: -A r is the max
    return loss, branch, 0.0 if branch in CLIPPED_BRANCHES else -adv * ratio


def cispo_reference(logprob, old_logprob, adv, low, high):
    """(loss, branch, d loss / d logprob) of one token: -sg(clip(r, 1 - low, 1 + high)) A log pi."""
    ratio = math.exp(logprob - old_logprob)
    weight = min(max(ratio, 1 - low), 1 + high)
    branch = "clipped_high" if ratio > 1 + high else "clipped_low" if ratio < 1 - low else "inside"
    return -weight * adv * logprob, branch, -weight * adv


def kl_reference(logprob, ref_logprob, estimator):
    """(KL estimate, d estimate / d logprob) of one token, d = log pi - log pi_ref (Schulman's k1-k3); k1's
    gradient is its score-function form's, d (as k2's), so that as a loss it pulls toward the reference."""
    d = logprob - ref_logprob
    if estimator == "k1":
        return d, d
    if estimator == "k2":
        return 0.5 * d * d, d
    return math.exp(-d) - 1 + d, 1 - math.exp(-d)


def gspo_reference(lp, old, adv, mask, low, high, dual=0.0):
    """GSPO over nested lists: s_i = exp(mean over the valid tokens of row i of (lp - old)), loss_i =
    the clipped surrogate of s_i with A_i. Returns ({row: (loss_i, branch_i)}, J = mean of loss_i over
    the rows with a valid token, dJ / d lp (nested lists))."""
    rows = {}
    grad = [[0.0] * len(m) for m in mask]
    valid = [b for b, m in enumerate(mask) if any(m)]
    for b in valid:
        ts = [t for t, m in enumerate(mask[b]) if m]
        s = math.exp(sum(lp[b][t] - old[b][t] for t in ts) / len(ts))
        loss, branch, dlog_s = surrogate_reference(s, adv[b][ts[0]], low, high, dual)
        rows[b] = (loss, branch)
        for t in ts:                          # d log s / d lp_t = 1 / |y|, then the mean over rows
            grad[b][t] = dlog_s / len(ts) / len(valid)
    total = sum(loss for loss, _ in rows.values()) / len(valid) if valid else 0.0
    return rows, total, grad


def aggregate_reference(loss, mask, mode, max_new_tokens):
    """(value, d value / d loss) of a LOSS_AGGREGATION mode over nested lists, from its definition;
    rows with no valid token do not count."""
    rows = [b for b, m in enumerate(mask) if any(m)]
    grad = [[0.0] * len(m) for m in mask]
    if not rows:
        return 0.0, grad
    tokens = {b: [t for t, m in enumerate(mask[b]) if m] for b in rows}
    if mode == "token-mean":
        n = sum(len(ts) for ts in tokens.values())
        value = sum(loss[b][t] for b in rows for t in tokens[b]) / n
        weight = {b: 1 / n for b in rows}
    elif mode == "seq-mean-token-mean":
        value = statistics.fmean([sum(loss[b][t] for t in tokens[b]) / len(tokens[b]) for b in rows])
        weight = {b: 1 / (len(rows) * len(tokens[b])) for b in rows}
    elif mode == "seq-mean-token-sum":
        value = statistics.fmean([sum(loss[b][t] for t in tokens[b]) for b in rows])
        weight = {b: 1 / len(rows) for b in rows}
    else:                                     # seq-mean-token-sum-norm (Dr. GRPO)
        value = sum(loss[b][t] for b in rows for t in tokens[b]) / (len(rows) * max_new_tokens)
        weight = {b: 1 / (len(rows) * max_new_tokens) for b in rows}
    for b in rows:
        for t in tokens[b]:
            grad[b][t] = weight[b]
    return value, grad


def as_tensor(nested, like):
    return torch.tensor(nested, dtype=like.dtype).view(like.shape)


# -- clipped_surrogate / clipped_policy_loss: clip-higher and the dual clip -----------------------
def test_clipped_surrogate_asymmetric_and_dual_clip_against_reference():
    """Loss, `clipped` flags and gradients (d/d ratio and d/d logprobs) of PPO-clip with asymmetric
    ranges and the dual clip match the formula; the gradient is exactly 0 on every clipped branch."""
    seen = set()

    @drawn(80)
    @given(batch=st.integers(1, 6), width=st.integers(1, 12), low=CLIPS, high=CLIPS, dual=DUALS, seed=SEEDS)
    def check(batch, width, low, high, dual, seed):
        lp, old, adv = token_inputs(seed, (batch, width))
        leaf = lp.clone().requires_grad_(True)
        loss, clipped = ppo.clipped_policy_loss(leaf, old, adv, None, low, high, dual)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
        ratio = torch.exp(lp - old).requires_grad_(True)
        s_loss, s_clipped = ppo.clipped_surrogate(ratio, adv, low, high, dual)
        (s_grad,) = torch.autograd.grad(s_loss.sum(), ratio)

        refs = [surrogate_reference(math.exp(a - b), c, low, high, dual) for a, b, c in zip(*flat(lp, old, adv))]
        ref_loss = as_tensor([r[0] for r in refs], lp)
        ref_clipped = torch.tensor([r[1] in CLIPPED_BRANCHES for r in refs]).view(lp.shape)
        ref_grad = as_tensor([r[2] for r in refs], lp)
        assert clipped.dtype == torch.bool
        assert_close(loss, ref_loss)
        assert_close(s_loss, ref_loss)
        assert torch.equal(clipped, ref_clipped) and torch.equal(s_clipped, ref_clipped)
        assert (grad[ref_clipped] == 0).all() and (s_grad[ref_clipped] == 0).all()
        assert_close(grad, ref_grad)                                 # -A r where unclipped
        assert_close(s_grad, torch.where(ref_clipped, 0.0, -adv))    # d/dr: -A where unclipped
        seen.update(r[1] for r in refs)

    check()
    assert seen == {"ratio_one", "inside", "outside_unclipped", "clipped_high", "clipped_low", "dual"}


def test_clipped_policy_loss_symmetric_by_default():
    """CLIP_RANGE_HIGH = None means the symmetric range [1 - CLIP_RANGE, 1 + CLIP_RANGE]."""
    lp, old, adv = token_inputs(5, (6, 10))
    mask = torch.ones(lp.shape, dtype=torch.bool)

    def loss(**settings):
        return ppo.policy_loss(lp, old, adv, mask, ppo.make_config({"CLIP_RANGE": 0.2, **settings}))[0]
    assert_close(loss(), loss(CLIP_RANGE_HIGH=0.2))
    assert not torch.allclose(loss(CLIP_RANGE_HIGH=0.4), loss())


# -- GSPO -----------------------------------------------------------------------------------------
def test_gspo_sequence_ratio_loss_and_gradient_against_reference():
    """GSPO: every valid token carries its sequence's clipped loss of s_i = exp(mean log ratio), and
    the seq-mean-token-mean of the tokens is the mean sequence loss in value and in gradient
    (-A_i s_i / |y_i| per token, 0 when clipped); padding garbage changes nothing."""
    seen = set()

    @drawn(80)
    @given(batch=st.integers(1, 6), width=st.integers(1, 10), low=CLIPS, high=CLIPS, dual=DUALS, seed=SEEDS)
    def check(batch, width, low, high, dual, seed):
        g = gen(seed)
        lengths = torch.randint(0, width + 1, (batch,), generator=g).tolist()
        lengths[0] = max(lengths[0], 1)
        mask = prefix_mask(lengths, width)
        lp, old = high_entropy_logprobs(g, (batch, width), drift=2.5)
        adv = (torch.randn(batch, 1, generator=g, dtype=torch.float64) * 1.5).expand(batch, width)
        lp, old, adv = (finite_garbage(x, mask, g) for x in (lp, old, adv))
        leaf = lp.clone().requires_grad_(True)
        loss, clipped = ppo.gspo_policy_loss(leaf, old, adv, mask, low, high, dual)
        total = aggregated(loss, mask, "seq-mean-token-mean", width)
        (grad,) = torch.autograd.grad(total, leaf)

        rows, ref_total, ref_grad = gspo_reference(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(),
                                                   low, high, dual)
        assert loss.shape == (batch, width)
        for b, (row_loss, branch) in rows.items():
            assert_close(loss[b, :lengths[b]], torch.full((lengths[b],), row_loss, dtype=torch.float64))
            assert clipped[b, :lengths[b]].tolist() == [branch in CLIPPED_BRANCHES] * lengths[b]
        assert_close(total, torch.tensor(ref_total, dtype=torch.float64))
        assert_close(grad, torch.tensor(ref_grad, dtype=torch.float64))
        assert (grad[~mask] == 0).all()
        seen.update("inside" if branch == "ratio_one" else branch for _, branch in rows.values())

    check()
    assert seen == {"inside", "outside_unclipped", "clipped_high", "clipped_low", "dual"}


def test_gspo_token_gradient_is_the_sequence_gradient_over_its_length():
    """Autograd of ppo's aggregated GSPO loss equals autograd of a loss built directly from s_i."""
    g = gen(31)
    lengths = [1, 5, 3, 8, 2]
    mask = prefix_mask(lengths, 8)
    lp, old = high_entropy_logprobs(g, (5, 8), drift=0.3)
    adv = torch.tensor([1.0, -2.0, 0.5, -0.3, 1.2], dtype=torch.float64)[:, None].expand(5, 8)
    lp, old = finite_garbage(lp, mask, g), finite_garbage(old, mask, g)
    leaf = lp.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(aggregated(ppo.gspo_policy_loss(leaf, old, adv, mask, 0.3, 0.4)[0],
                                                     mask, "seq-mean-token-mean", 8), leaf)
    ref_leaf = lp.clone().requires_grad_(True)
    losses = []
    for b, n in enumerate(lengths):
        s = torch.exp((ref_leaf[b, :n] - old[b, :n]).mean())
        a = adv[b, 0]
        losses.append(torch.max(-a * s, -a * torch.clamp(s, 0.7, 1.4)))
    (ref_grad,) = torch.autograd.grad(torch.stack(losses).mean(), ref_leaf)
    assert (ref_grad != 0).any()
    assert_close(grad, ref_grad)


# -- CISPO ----------------------------------------------------------------------------------------
def test_cispo_loss_and_gradient_against_reference():
    """CISPO: loss -sg(clip(r)) A log pi, flags where the weight was clipped, and gradient -clip(r) A on
    every token, clipped ones included (never 0 where A != 0)."""
    seen = set()

    @drawn(80)
    @given(batch=st.integers(1, 6), width=st.integers(1, 12), low=CLIPS, high=CLIPS, seed=SEEDS)
    def check(batch, width, low, high, seed):
        lp, old, adv = token_inputs(seed, (batch, width))
        leaf = lp.clone().requires_grad_(True)
        loss, clipped = ppo.cispo_policy_loss(leaf, old, adv, None, low, high)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
        refs = [cispo_reference(a, b, c, low, high) for a, b, c in zip(*flat(lp, old, adv))]
        ref_clipped = torch.tensor([r[1] != "inside" for r in refs]).view(lp.shape)
        assert_close(loss, as_tensor([r[0] for r in refs], lp))
        assert torch.equal(clipped, ref_clipped)
        assert_close(grad, as_tensor([r[2] for r in refs], lp))
        assert (grad[adv != 0] != 0).all()
        seen.update(r[1] for r in refs)
        if (ref_clipped & (adv != 0)).any():
            seen.add("clipped_with_gradient")

    check()
    assert seen == {"inside", "clipped_high", "clipped_low", "clipped_with_gradient"}


# -- policy_loss and clip_ranges ------------------------------------------------------------------
@pytest.mark.parametrize("low,high", [(None, None), (0.1, None), (None, 0.3), (0.1, 0.3)])
def test_clip_ranges_fall_back_to_clip_range(low, high):
    """CLIP_RANGE_LOW / CLIP_RANGE_HIGH are each CLIP_RANGE when None."""
    cfg = ppo.make_config({"CLIP_RANGE": 0.25, "CLIP_RANGE_LOW": low, "CLIP_RANGE_HIGH": high})
    assert ppo.clip_ranges(cfg) == (0.25 if low is None else low, 0.25 if high is None else high)


@pytest.mark.parametrize("kind", ["ppo", "gspo", "cispo"])
@pytest.mark.parametrize("low,high", [(None, None), (0.1, 0.35)])
def test_policy_loss_dispatches_on_policy_loss(kind, low, high):
    """policy_loss runs POLICY_LOSS's function with the clip ranges (and DUAL_CLIP) of the settings."""
    g = gen(41)
    mask = prefix_mask([3, 7, 1, 5, 7, 2], 7)
    lp, old = high_entropy_logprobs(g, (6, 7))
    adv = (torch.randn(6, 1, generator=g, dtype=torch.float64) * 1.5).expand(6, 7)
    dual = 0.0 if kind == "cispo" else 2.0
    cfg = ppo.make_config({"POLICY_LOSS": kind, "CLIP_RANGE": 0.2, "CLIP_RANGE_LOW": low,
                           "CLIP_RANGE_HIGH": high, "DUAL_CLIP": dual})
    lo, hi = 0.2 if low is None else low, 0.2 if high is None else high
    expected = {"ppo": lambda: ppo.clipped_policy_loss(lp, old, adv, mask, lo, hi, dual),
                "gspo": lambda: ppo.gspo_policy_loss(lp, old, adv, mask, lo, hi, dual),
                "cispo": lambda: ppo.cispo_policy_loss(lp, old, adv, mask, lo, hi)}
    loss, clipped = ppo.policy_loss(lp, old, adv, mask, cfg)
    exp_loss, exp_clipped = expected[kind]()
    assert_close(torch.where(mask, loss, 0.0), torch.where(mask, exp_loss, 0.0))
    assert torch.equal(clipped & mask, exp_clipped & mask)
    for other, make in expected.items():                 # the three are different losses
        if other != kind:
            assert not torch.allclose(torch.where(mask, make()[0], 0.0), torch.where(mask, loss, 0.0))
    if kind == "ppo":                                    # DUAL_CLIP reaches the surrogate
        assert not torch.allclose(loss, ppo.clipped_policy_loss(lp, old, adv, mask, lo, hi)[0])


# -- aggregate_sum / aggregate_count ------------------------------------------------------------
def aggregation_inputs(seed, batch, width, density):
    """Per-token losses (float64, NaN / inf garbage in padding) and a random mask with empty rows."""
    g = gen(seed)
    loss = torch.randn(batch, width, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(batch, width, generator=g) < density
    mask[0, torch.randint(width, (1,), generator=g)] = True     # at least one valid token
    if batch > 2:
        mask[1] = False                                          # an empty row
    return fill_padding(loss, mask, g), mask


@drawn(100)
@given(batch=st.integers(1, 7), width=st.integers(1, 9), extra=st.integers(0, 5),
       density=st.floats(0.1, 1.0), mode=st.sampled_from(MODES), seed=SEEDS)
def test_aggregate_loss_against_reference(batch, width, extra, density, mode, seed):
    """aggregate_sum / aggregate_count = its mode's definition, in value and in gradient w.r.t. the
    per-token losses (0 on padding, empty rows not counted)."""
    loss, mask = aggregation_inputs(seed, batch, width, density)
    leaf = loss.clone().requires_grad_(True)
    value = aggregated(leaf, mask, mode, width + extra)
    (grad,) = torch.autograd.grad(value, leaf)
    ref_value, ref_grad = aggregate_reference(loss.tolist(), mask.tolist(), mode, width + extra)
    assert_close(value, torch.tensor(ref_value, dtype=torch.float64))
    assert_close(grad, torch.tensor(ref_grad, dtype=torch.float64))
    count = ppo.aggregate_count(mask, mode, width + extra)
    assert_close(ppo.aggregate_sum(loss, mask, mode) / count, value)
    rows = int(mask.any(1).sum())
    assert count.item() == {"token-mean": int(mask.sum()), "seq-mean-token-mean": rows, "seq-mean-token-sum": rows,
                            "seq-mean-token-sum-norm": rows * (width + extra)}[mode]


def test_aggregate_loss_of_no_valid_token_is_zero():
    """A minibatch with no valid token aggregates to 0 (not NaN) in every mode."""
    loss = torch.full((3, 4), float("nan"), dtype=torch.float64)
    for mode in MODES:
        assert aggregated(loss, torch.zeros(3, 4, dtype=torch.bool), mode, 4).item() == 0.0


@drawn(100)
@given(batch=st.integers(1, 8), width=st.integers(1, 8), extra=st.integers(0, 4), density=st.floats(0.1, 1.0),
       mode=st.sampled_from(MODES), seed=SEEDS, data=st.data())
def test_aggregation_is_independent_of_the_micro_batch_split(batch, width, extra, density, mode, seed, data):
    """For any partition of the rows, sum of aggregate_sum / sum of aggregate_count over the parts is
    the whole's, in value and in gradient w.r.t. the per-token losses."""
    loss, mask = aggregation_inputs(seed, batch, width, density)
    parts = draw_partition(data, batch)
    leaf = loss.clone().requires_grad_(True)
    split = (sum(ppo.aggregate_sum(leaf[idx], mask[idx], mode) for idx in parts)
             / sum(ppo.aggregate_count(mask[idx], mode, width + extra) for idx in parts))
    (grad,) = torch.autograd.grad(split, leaf)
    whole_leaf = loss.clone().requires_grad_(True)
    whole = aggregated(whole_leaf, mask, mode, width + extra)
    (whole_grad,) = torch.autograd.grad(whole, whole_leaf)
    assert_close(split, whole)
    assert_close(grad, whole_grad)


@drawn(60)
@given(batch=st.integers(2, 8), width=st.integers(1, 8), density=st.floats(0.2, 1.0),
       mode=st.sampled_from(MODES), seed=SEEDS, data=st.data())
def test_mean_of_micro_batch_losses_is_not_the_minibatch_loss(batch, width, density, mode, seed, data):
    """The naive split (the mean of each part's own aggregated loss) is wrong as soon as the parts'
    denominators differ (tokens for token-mean, sequences for the seq-mean modes): the global
    denominator of the split-independent form above is needed."""
    loss, mask = aggregation_inputs(seed, batch, width, density)
    parts = draw_partition(data, batch, min_parts=2)
    counts = [ppo.aggregate_count(mask[idx], mode, width).item() for idx in parts]
    assume(len(set(counts)) > 1)
    naive = statistics.fmean(aggregated(loss[idx], mask[idx], mode, width).item() for idx in parts)
    whole = aggregated(loss, mask, mode, width).item()
    split = sum(ppo.aggregate_sum(loss[idx], mask[idx], mode).item() for idx in parts) / sum(counts)
    assert math.isclose(split, whole, rel_tol=1e-9, abs_tol=1e-12)
    assert abs(naive - whole) > 1e-9 * (1 + abs(whole))


# -- kl_penalty -----------------------------------------------------------------------------------
@drawn(60)
@given(batch=st.integers(1, 5), width=st.integers(1, 10), estimator=st.sampled_from(["k1", "k2", "k3"]), seed=SEEDS)
def test_kl_penalty_estimators_value_and_gradient(batch, width, estimator, seed):
    """k1 = d, k2 = d^2 / 2, k3 = e^-d - 1 + d (d = logp - logp_ref), and as losses their gradients
    w.r.t. logp are d (k1's score-function form), d and 1 - e^-d; k2 and k3 are >= 0 and 0 where the
    policies agree."""
    lp, ref = high_entropy_logprobs(gen(seed), (batch, width))
    ref.view(-1)[::4] = lp.view(-1)[::4]                         # d exactly 0
    leaf = lp.clone().requires_grad_(True)
    kl = ppo.kl_penalty(leaf, ref, estimator)
    (grad,) = torch.autograd.grad(kl.sum(), leaf)
    refs = [kl_reference(a, b, estimator) for a, b in zip(*flat(lp, ref))]
    assert_close(kl, as_tensor([r[0] for r in refs], lp))
    assert_close(grad, as_tensor([r[1] for r in refs], lp))
    if estimator != "k1":
        assert (kl >= 0).all() and (kl.view(-1)[::4] == 0).all()


def test_kl_penalty_k2_is_half_squared_log_ratio():
    """k2 at a few hand-computed points, symmetric in the sign of d."""
    lp = torch.tensor([0.0, -1.0, -3.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([0.0, -3.0, -1.0, -0.25], dtype=torch.float64)
    assert ppo.kl_penalty(lp, ref, "k2").tolist() == [0.0, 2.0, 2.0, 0.03125]


# -- group_advantages: dr_grpo --------------------------------------------------------------------
@drawn(80)
@given(group_size=st.integers(1, 6), groups=st.integers(1, 5), seed=SEEDS,
       shift=st.floats(-100, 100), scale=st.floats(0.1, 10.0).filter(lambda k: abs(k - 1) > 0.05))
def test_group_advantages_dr_grpo(group_size, groups, seed, shift, scale):
    """Dr. GRPO: each reward minus its group's mean, no std: unchanged when a group is shifted,
    scaled by k when a group is scaled by k (where GRPO's std division makes it invariant)."""
    rewards = torch.randn(groups * group_size, generator=gen(seed), dtype=torch.float64) * 3
    got = ppo.group_advantages(rewards, group_size, "dr_grpo")
    values = rewards.tolist()
    for g in range(groups):
        group = values[g * group_size:(g + 1) * group_size]
        for i, r in enumerate(group):
            assert math.isclose(got[g * group_size + i].item(), r - statistics.fmean(group), rel_tol=1e-9,
                                abs_tol=1e-9)
    first = slice(0, group_size)
    shifted, scaled = rewards.clone(), rewards.clone()
    shifted[first] += shift
    scaled[first] *= scale
    assert_close(ppo.group_advantages(shifted, group_size, "dr_grpo"), got, atol=1e-9, rtol=1e-9)
    expected = got.clone()
    expected[first] *= scale
    assert_close(ppo.group_advantages(scaled, group_size, "dr_grpo"), expected)
    if group_size > 1:
        assert not torch.allclose(ppo.group_advantages(scaled, group_size, "dr_grpo")[first], got[first])
        assert_close(ppo.group_advantages(scaled, group_size, "grpo", eps=0.0),
                     ppo.group_advantages(rewards, group_size, "grpo", eps=0.0))


# -- overlong_penalty -----------------------------------------------------------------------------
def overlong_reference(length, max_new_tokens, buffer, penalty):
    """DAPO eq. 13: 0 up to L_max - L_cache, ((L_max - L_cache) - L) / L_cache * penalty up to L_max,
    -penalty beyond; no penalty at all with no buffer."""
    if buffer == 0 or length <= max_new_tokens - buffer:
        return 0.0, "none"
    if length <= max_new_tokens:
        return ((max_new_tokens - buffer) - length) / buffer * penalty, "linear"
    return -penalty, "beyond"


def test_overlong_penalty_against_dapo():
    """overlong_penalty matches DAPO's soft overlong punishment for drawn lengths, limits, buffers and
    penalties (all three pieces of it reached)."""
    seen = set()

    @drawn(100)
    @given(max_new=st.integers(1, 64), data=st.data(), penalty=st.floats(0.0, 5.0))
    def check(max_new, data, penalty):
        buffer = data.draw(st.integers(0, max_new))
        lengths = data.draw(st.lists(st.integers(0, max_new + 8), min_size=1, max_size=20))
        got = ppo.overlong_penalty(torch.tensor(lengths), max_new, buffer, penalty)
        assert got.shape == (len(lengths),)
        for length, value in zip(lengths, got.tolist()):
            ref, piece = overlong_reference(length, max_new, buffer, penalty)
            assert math.isclose(value, ref, rel_tol=1e-6, abs_tol=1e-6), (length, max_new, buffer, penalty)
            seen.add(piece if buffer else "no_buffer")

    check()
    assert seen == {"none", "linear", "beyond", "no_buffer"}


# -- uninformative_groups -------------------------------------------------------------------------
def test_uninformative_groups_against_loop():
    """uninformative_groups marks every response of a group whose scores are all equal, and only those."""
    seen = set()

    @drawn(100)
    @given(group_size=st.integers(1, 5), data=st.data())
    def check(group_size, data):
        groups = data.draw(st.lists(st.tuples(st.booleans(), st.lists(st.integers(-2, 2), min_size=group_size,
                                                                      max_size=group_size)),
                                    min_size=1, max_size=6))
        scores = []
        for same, values in groups:
            scores += [values[0] / 2] * group_size if same else [v / 2 for v in values]
        got = ppo.uninformative_groups(torch.tensor(scores), group_size)
        expected = []
        for g in range(len(groups)):
            group = scores[g * group_size:(g + 1) * group_size]
            expected += [all(s == group[0] for s in group)] * group_size
        assert got.dtype == torch.bool and got.tolist() == expected
        seen.update(expected)

    check()
    assert seen == {True, False}


# -- ppo_loss and loss_counts: micro-batch splits, untrained rows, the reference ------------------
def ppo_case(seed, batch, width, kind, critic):
    """(batch namespace, logprobs, entropy, values or None) of a random minibatch, finite garbage in
    every padding position; GSPO gets one advantage per row."""
    g = gen(seed)
    lengths = torch.randint(1, width + 1, (batch,), generator=g).tolist()
    mask = prefix_mask(lengths, width)
    lp, old, ref = high_entropy_logprobs(g, (batch, width), n=3)
    if kind == "gspo":
        adv = (torch.randn(batch, 1, generator=g, dtype=torch.float64) * 1.5).expand(batch, width).clone()
    else:
        adv = torch.randn(batch, width, generator=g, dtype=torch.float64) * 1.5
    entropy = torch.rand(batch, width, generator=g, dtype=torch.float64) * math.log(6)
    old_values = torch.randn(batch, width, generator=g, dtype=torch.float64)
    values = old_values + torch.randn(batch, width, generator=g, dtype=torch.float64) * 0.4
    returns = torch.randn(batch, width, generator=g, dtype=torch.float64) * 1.5
    trained = torch.rand(batch, generator=g) < 0.7
    lp, old, ref, adv, entropy, old_values, values, returns = (
        finite_garbage(x, mask, g) for x in (lp, old, ref, adv, entropy, old_values, values, returns))
    scores = torch.randint(0, 3, (batch,), generator=g).double() / 2          # 0, 0.5 or 1
    rows = types.SimpleNamespace(response_mask=mask, trained=trained, old_logprobs=old, advantages=adv,
                                 ref_logprobs=ref, values=old_values if critic else None, returns=returns,
                                 scores=scores)
    return rows, lp, entropy, values if critic else None


def select_rows(rows, idx):
    return types.SimpleNamespace(**{k: None if v is None else v[idx] for k, v in vars(rows).items()})


def ppo_settings(kind, mode, kl, entropy_coef, low, high, dual, max_new_tokens):
    return ppo.make_config({"POLICY_LOSS": kind, "LOSS_AGGREGATION": mode, "CLIP_RANGE": 0.2,
                            "CLIP_RANGE_LOW": low, "CLIP_RANGE_HIGH": high, "DUAL_CLIP": dual,
                            "KL_IN_LOSS": kl is not None, "KL_ESTIMATOR": kl or "k1", "KL_LOSS_COEF": 0.3,
                            "ENTROPY_COEF": entropy_coef, "VALUE_LOSS_COEF": 0.7, "CLIP_RANGE_VALUE": 0.2,
                            "MAX_NEW_TOKENS": max_new_tokens})


def ppo_loss_reference(lp, entropy, values, rows, cfg, low, high):
    """aggregate(pg - c2 H [+ KL_LOSS_COEF kl]) over the trained rows' tokens, with pg from the
    reference of POLICY_LOSS, + c1 * the token mean of ppo.clipped_value_loss over response tokens."""
    mask = (rows.response_mask & rows.trained[:, None]).tolist()
    L, H, O, A, R = lp.tolist(), entropy.tolist(), rows.old_logprobs.tolist(), rows.advantages.tolist(), \
        rows.ref_logprobs.tolist()
    if cfg.POLICY_LOSS == "gspo":
        seq = gspo_reference(L, O, A, mask, low, high, cfg.DUAL_CLIP)[0]
    terms = []
    for b, row in enumerate(mask):
        terms.append([])
        for t, valid in enumerate(row):
            if not valid:
                terms[b].append(float("nan"))
                continue
            if cfg.POLICY_LOSS == "ppo":
                pg = surrogate_reference(math.exp(L[b][t] - O[b][t]), A[b][t], low, high, cfg.DUAL_CLIP)[0]
            elif cfg.POLICY_LOSS == "cispo":
                pg = cispo_reference(L[b][t], O[b][t], A[b][t], low, high)[0]
            else:
                pg = seq[b][0]
            term = pg - cfg.ENTROPY_COEF * H[b][t]
            if cfg.KL_IN_LOSS:
                term += cfg.KL_LOSS_COEF * kl_reference(L[b][t], R[b][t], cfg.KL_ESTIMATOR)[0]
            terms[b].append(term)
    total = aggregate_reference(terms, mask, cfg.LOSS_AGGREGATION, cfg.MAX_NEW_TOKENS)[0]
    if values is not None:
        vf = ppo.clipped_value_loss(values, rows.values, rows.returns, cfg.CLIP_RANGE_VALUE)[0]
        total += cfg.VALUE_LOSS_COEF * statistics.fmean(valid_entries(vf, rows.response_mask))
    return total


PPO_LOSS_CASES = dict(batch=st.integers(1, 6), width=st.integers(1, 8), extra=st.integers(0, 4),
                      kind=st.sampled_from(["ppo", "cispo", "gspo"]), mode=st.sampled_from(MODES),
                      kl=st.sampled_from([None, "k1", "k2", "k3"]), entropy_coef=st.sampled_from([0.0, 0.01, 0.3]),
                      critic=st.booleans(), low=st.one_of(st.none(), st.floats(0.05, 0.4)),
                      high=st.one_of(st.none(), st.floats(0.05, 0.5)), dual=DUALS, seed=SEEDS)


def ppo_loss_and_grads(lp, entropy, values, rows, cfg, parts):
    """The trainer's way: counts summed over the parts, then ppo_loss of each part summed; returns
    (loss, sums by name, gradients w.r.t. logprobs, entropy and values)."""
    leaves = [x.clone().requires_grad_(True) for x in (lp, entropy) + ((values,) if values is not None else ())]
    counts = sum(ppo.loss_counts(select_rows(rows, idx), cfg) for idx in parts)
    total, sums = 0, {}
    for idx in parts:
        loss, part_sums = ppo.ppo_loss(leaves[0][idx], leaves[1][idx], leaves[2][idx] if values is not None else None,
                                       select_rows(rows, idx), cfg, counts)
        total = total + loss
        sums = {k: sums.get(k, 0) + v for k, v in part_sums.items()}
    return total, sums, torch.autograd.grad(total, leaves)


@drawn(80)
@given(data=st.data(), **PPO_LOSS_CASES)
def test_ppo_loss_is_split_independent_and_matches_reference(data, batch, width, extra, kind, mode, kl,
                                                             entropy_coef, critic, low, high, dual, seed):
    """Summing ppo_loss over any micro-batch split (with loss_counts summed over the parts) gives the
    one-piece loss, statistics and gradients w.r.t. logprobs / entropy / values, and the loss is
    aggregate(pg - c2 H [+ kl]) + c1 * token-mean value loss."""
    dual = 0.0 if kind == "cispo" else dual
    cfg = ppo_settings(kind, mode, kl, entropy_coef, low, high, dual, width + extra)
    rows, lp, entropy, values = ppo_case(seed, batch, width, kind, critic)
    whole, whole_sums, whole_grads = ppo_loss_and_grads(lp, entropy, values, rows, cfg, [torch.arange(batch)])
    split, split_sums, split_grads = ppo_loss_and_grads(lp, entropy, values, rows, cfg, draw_partition(data, batch))
    assert_close(split, whole)
    for got, expected in zip(split_grads, whole_grads):
        assert_close(got, expected)
    assert split_sums.keys() == whole_sums.keys()
    for name in whole_sums:
        assert_close(split_sums[name], whole_sums[name])
    ref = ppo_loss_reference(lp, entropy, values, rows, cfg, 0.2 if low is None else low, 0.2 if high is None else high)
    assert_close(whole, torch.tensor(ref, dtype=torch.float64))


def test_ppo_loss_untrained_rows_contribute_nothing():
    """Rows with trained=False get exactly zero gradient w.r.t. logprobs and entropy, and their
    advantages, old and reference logprobs change neither the loss nor any gradient."""
    seen = set()

    @drawn(60)
    @given(**{**PPO_LOSS_CASES, "batch": st.integers(2, 6)})
    def check(batch, width, extra, kind, mode, kl, entropy_coef, critic, low, high, dual, seed):
        untrained_rows_check(batch, width, extra, kind, mode, kl, entropy_coef, critic, low, high, dual, seed, seen)

    check()
    assert seen == {"trained_rows_have_gradient"}       # the zero gradients above are not all there is


def untrained_rows_check(batch, width, extra, kind, mode, kl, entropy_coef, critic, low, high, dual, seed, seen):
    dual = 0.0 if kind == "cispo" else dual
    cfg = ppo_settings(kind, mode, kl, entropy_coef, low, high, dual, width + extra)
    rows, lp, entropy, values = ppo_case(seed, batch, width, kind, critic)
    rows.trained[0], rows.trained[-1] = False, True
    loss, _, grads = ppo_loss_and_grads(lp, entropy, values, rows, cfg, [torch.arange(batch)])
    off = ~rows.trained
    assert (grads[0][off] == 0).all() and (grads[1][off] == 0).all()
    if (grads[0][rows.trained] != 0).any():
        seen.add("trained_rows_have_gradient")
    changed = select_rows(rows, torch.arange(batch))
    g = gen(seed + 1)
    for name in ("advantages", "old_logprobs", "ref_logprobs"):
        noise = torch.randn(batch, width, generator=g, dtype=torch.float64)
        setattr(changed, name, torch.where(off[:, None], getattr(rows, name) + noise, getattr(rows, name)))
    changed_loss, _, changed_grads = ppo_loss_and_grads(lp, entropy, values, changed, cfg, [torch.arange(batch)])
    assert_close(changed_loss, loss, rtol=0, atol=0)
    for got, expected in zip(changed_grads, grads):
        assert_close(got, expected, rtol=0, atol=0)
