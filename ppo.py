"""
ppo.py: PPO for RLHF of Hugging Face causal language models, in one file.

    pip install -r requirements.txt
    python ppo.py                                 # train the shipped tiny default (CPU, minutes)
    python ppo.py --BATCH_SIZE=2 --USE_WANDB=true # override any constant of section 2
    python ppo.py my_run.json                     # or a JSON / YAML file of overrides
    python ppo.py --plot outputs/ppo_v1           # redraw the charts of a run
    torchrun --nproc_per_node 4 ppo.py            # several GPUs
    accelerate launch --num_processes 4 ppo.py    # the same through accelerate
    accelerate launch --config_file configs/deepspeed_zero2.yaml ppo.py  # ZeRO-2 (needs deepspeed)
    python -m pytest -q tests                     # the test suite

Reading guide: sections 2-5 are the algorithm, in one stretch that reads downward: the settings
(2), the PPO math and its variants as pure functions (3), the data and state of one step and its
forward passes (4), and PPOStep (5): train_step, the rollout recipe, the update and the commit,
then the guide's hooks. Section 6 is the training loop around it, PPOTrainer (evaluations, early
stopping, checkpoints, resume). Sections 7-15 are what it runs on: processes, tokens and text,
run bookkeeping, configuration, data, models, checkpoints, logging and the entry point.

Deliberate choices, where references differ:
1. Rollouts sample the full distribution (top_k=0, top_p=1, no repetition penalty, whatever the
   model's generation_config says), and every logprob is recomputed from logits / TEMPERATURE:
   filtered sampling is off-policy and makes the KL estimate negative.
2. The score is added at the last real response token (the EOS when there is one), not at the
   first padding position after it.
3. Masks come from the position of the first stop token, never from `token != pad_id`.
4. Losses are token-level means over the whole optimizer minibatch (or LOSS_AGGREGATION's
   sequence means, counted over the whole minibatch too): BATCH_SIZE=1 with
   GRADIENT_ACCUMULATION_STEPS=8 gives the gradient of BATCH_SIZE=8 with 1.
5. A response with no EOS keeps its score minus MISSING_EOS_PENALTY (lm-human-preferences
   replaces it with a constant instead).
6. Policy and critic are separate models updated by one AdamW with one parameter group each (two
   learning rates, each model's gradient norm clipped on its own; under DeepSpeed, their joint
   norm): the same arithmetic as two optimizers, one object for accelerate / DeepSpeed to prepare.
   Under Adam a constant factor on a loss barely changes the update, so VALUE_LOSS_COEF matters
   through clipping and the logged total loss; to make the critic learn faster raise
   CRITIC_LEARNING_RATE.
7. A reward model with the policy's tokenizer (checked: same vocabulary, same ids) and no chat
   template reads the policy's own token ids; any other reads decoded text (the prompt as the
   policy saw it + the response, or its own chat template) with its own tokenizer, so policy and
   reward model need not share a vocabulary.

References: PPO (Schulman et al. 2017, arXiv 1707.06347); Ziegler et al. 2019 (arXiv 1909.08593,
openai/lm-human-preferences); "The N Implementation Details of RLHF with PPO" (Huang et al.,
arXiv 2403.17031); TRL's last PPO trainer (trl 1.12, trl/experimental/ppo); CleanRL ppo.py.
"""

# ---------------------------------------------------------------------------------------------
# 1. Imports
# ---------------------------------------------------------------------------------------------
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import difflib
import inspect
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pad_sequence
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from safetensors import SafetensorError
from tqdm.auto import tqdm

logger = logging.getLogger("ppo")

# ---------------------------------------------------------------------------------------------
# 2. Configuration: edit here, or override with `python ppo.py [run.json|run.yaml] [--NAME=value]`
# ---------------------------------------------------------------------------------------------
# Models: a hub id or a local path (relative: the working directory, then next to this file)
ACTOR_MODEL = "data/tiny-policy"    # policy pi_theta (AutoModelForCausalLM); frozen copy = pi_ref
CRITIC_MODEL = "data/tiny-reward"   # critic V_phi: causal LM or reward model; None = ACTOR_MODEL
REWARD_MODEL = "data/tiny-reward"   # sequence classifier (num_labels=1), or None: rules only
TRUST_REMOTE_CODE = False           # run code shipped in model repos; only for repos you trust
USE_CHAT_TEMPLATE = True            # wrap prompts in the policy tokenizer's chat template, if any

# Data: lists of {"path", "type": "jsonl" | "parquet", "input": prompt column, "output": reference}
TRAIN_DATASETS = [{"path": "data/arithmetic_train.jsonl", "type": "jsonl", "input": "problem",
                   "output": "solution"}]
EVAL_DATASETS = [{"path": "data/arithmetic_eval.parquet", "type": "parquet", "input": "question",
                  "output": "answer"}]
MAX_TRAIN_SAMPLES = 0               # keep the first N train prompts (0 = all); guide's debug case
MAX_EVAL_SAMPLES = 0                # keep the first N evaluation prompts (0 = all)
MAX_PROMPT_LENGTH = 512             # prompt tokens; a longer one keeps its last MAX_PROMPT_LENGTH
MAX_NEW_TOKENS = 128                # response tokens per generation (max_new_tokens)
OUTPUT_DIR = "outputs/ppo_v1"       # logs, metrics, checkpoints and charts of the run

# Batches, per process. One PPO step = one rollout of
# BATCH_SIZE * GRADIENT_ACCUMULATION_STEPS * NUM_MINI_BATCHES prompts, GROUP_SIZE responses each.
BATCH_SIZE = 16                     # prompts per micro-batch (BATCH_SIZE * GROUP_SIZE seqs at once)
GRADIENT_ACCUMULATION_STEPS = 1     # micro-batches per optimizer step: batch = BATCH_SIZE * this
NUM_MINI_BATCHES = 1                # optimizer steps per PPO epoch over one rollout
GROUP_SIZE = 2                      # responses sampled per prompt
NUM_EPOCHES = 1                     # passes over the training prompts
GROUP_EPOCHES = 4                   # PPO epochs: passes over each rollout (K in the PPO paper)
MAX_STEPS = 0                       # stop after this many PPO steps (0 = no limit)
SEED = 42                           # data order, sampling, initialisation

# Optimisation
LEARNING_RATE = 3e-5                # policy lr (tiny default); 0.5B-7B: 1e-6 to 5e-6 (guide: 1e-6)
CRITIC_LEARNING_RATE = 1e-4         # critic lr; 0.5B-7B models: 5e-6 to 1e-5
WEIGHT_DECAY = 0.0                  # AdamW decoupled weight decay, both models
MAX_GRAD_NORM = 1.0                 # clip each model's grad norm at this (guide: 0.5 if unstable)
USE_LR_SCHEDULER = True             # LR_SCHEDULER_TYPE over the run (False: constant rates)
LR_SCHEDULER_TYPE = "cosine"        # "cosine" | "linear" | "constant" | "plateau" (on evaluations)
WARMUP_STEPS = 0                    # optimizer steps of linear warmup (with USE_LR_SCHEDULER)
PLATEAU_FACTOR = 0.5                # "plateau": multiply the learning rates by this ...
PLATEAU_PATIENCE = 2                # ... after this many evaluations without improvement

# PPO (formulas and papers: section 3 and PPO_V1_IMPROVEMENTS.md)
ADVANTAGE_ESTIMATOR = "gae"         # "gae": a critic | "grpo" | "dr_grpo" | "rloo" | "reinforce++"
TEMPERATURE = 1.0                   # T: sampling temperature; every logprob uses logits / T
CLIP_RANGE = 0.2                    # epsilon: the ratio pi/pi_old is clipped to [1 - eps, 1 + eps]
CLIP_RANGE_LOW = None               # eps_low: lower clip 1 - eps_low (None = CLIP_RANGE)
CLIP_RANGE_HIGH = None              # eps_high: upper clip 1 + eps_high (None = CLIP_RANGE)
DUAL_CLIP = 0.0                     # c > 1: a token with A < 0 loses at most -c * A (3.0; 0 = off)
POLICY_LOSS = "ppo"                 # "ppo": token ratio | "gspo": sequence ratio | "cispo"
LOSS_AGGREGATION = "token-mean"     # or "seq-mean-token-mean" | "seq-mean-token-sum(-norm)"
CLIP_RANGE_VALUE = 0.2              # epsilon_v: V is clipped to V_old +- epsilon_v (reward units)
VALUE_LOSS_COEF = 0.5               # c1: loss += c1 * value loss (see deviation 6)
ENTROPY_COEF = 0.01                 # c2: loss -= c2 * mean token entropy (0 for most large models)
KL_COEF = 0.05                      # beta: r_t = -beta * KL_t (the start value when ADAPTIVE_KL)
KL_ESTIMATOR = "k1"                 # "k1": d = logp - logp_ref | "k2": d^2 / 2 | "k3": e^-d - 1 + d
KL_IN_LOSS = False                  # the KL leaves the reward and enters the loss (GRPO)
KL_LOSS_COEF = 0.04                 # weight of the KL term in the loss with KL_IN_LOSS (GRPO: 0.04)
ADAPTIVE_KL = False                 # Ziegler et al.'s controller: beta moves to ADAPTIVE_KL_TARGET
ADAPTIVE_KL_TARGET = 6.0            # target KL per response, nats
ADAPTIVE_KL_HORIZON = 10000         # responses over which beta may change by ~20%
GAMMA = 1.0                         # discount over response tokens
LAM = 0.95                          # GAE lambda (the policy's; also the critic's unless LAM_VALUE)
LAM_VALUE = None                    # the critic's returns' lambda (VC-PPO's decoupled GAE: 1.0)
LENGTH_ADAPTIVE_LAM = 0.0           # VAPO: the policy's lambda = 1 - 1/(alpha * length); alpha 0.05
VALUE_WARMUP_STEPS = 0              # VC-PPO: the first N PPO steps train only the critic
POSITIVE_LM_COEF = 0.0              # VAPO: + this x the NLL of responses scoring >= the threshold
POSITIVE_LM_THRESHOLD = 1.0         # ... the score that makes a response a positive example
MISSING_EOS_PENALTY = 1.0           # subtracted from the score of a response with no EOS (0 = off)
REWARD_NORMALIZATION = False        # scale scores by a running mean / std (kept in checkpoints)
REWARD_CLIP = 0.0                   # clip (normalised) scores to +- this (0 = off)
OVERLONG_BUFFER = 0                 # DAPO: the score falls over the last N tokens (0 = off) ...
OVERLONG_PENALTY = 1.0              # ... linearly, by this much at MAX_NEW_TOKENS
DYNAMIC_SAMPLING = False            # DAPO: train only on the groups whose scores differ
REWARD_FUNCTIONS = {}               # rule rewards by name: weight, e.g. {"answer": 1.0} (section 8)
FORMAT_PATTERN = None               # the "format" rule's regex (re.search): "The answer is \\d+"
REFERENCE_REWARD = 0.0              # + this when the dataset output matches (the "answer" rule)
ANSWER_MATCH = "last_number"        # answer rule: "last_number" | "boxed" | "exact" | "contains"
STOP_TOKENS = []                    # tokens that end a response besides EOS, e.g. ["<|im_end|>"]
TARGET_KL = 0.0                     # end a rollout's PPO epochs once approx KL > this (0 = off)
MAX_CONSECUTIVE_SKIPS = 5           # steps in a row skipped for a NaN / inf before the run stops

# Evaluation, checkpoints, early stopping
EVAL_EVERY_N_STEPS = 10             # evaluate every N PPO steps (0 = only at start and end)
EVAL_GREEDY = True                  # greedy evaluation; False samples at TEMPERATURE
NUM_SAMPLES_TO_LOG = 3              # prompt / response / reward examples logged per evaluation
SAVE_EVERY_N_STEPS = 50             # write OUTPUT_DIR/checkpoints/step_N every N steps, and at end
SAVE_TOTAL_LIMIT = 0                # keep the newest N checkpoints, plus the best (0 = keep all)
RESUME = "ask"                      # "ask" ("yes" if no terminal) | "yes" (latest) | "no" | a path
EARLY_STOPPING_PATIENCE = 0         # stop after N evaluations without improvement (0 = off)
EARLY_STOPPING_METRIC = "eval/reward"  # higher is better, e.g. "eval/accuracy"
EARLY_STOPPING_MIN_DELTA = 0.0      # smallest change that counts as an improvement
SAVE_BEST_POLICY = True             # keep the best evaluation's policy in OUTPUT_DIR/best

# Logging
USE_WANDB = False                   # also log to Weights & Biases (WANDB_MODE=offline: no account)
WANDB_PROJECT = "ppo-v1"            # the wandb project of the run
WANDB_ENTITY = None                 # team or user; None = your default
WANDB_RUN_NAME = None               # None = the name of OUTPUT_DIR

# Memory and scale (several GPUs: `accelerate launch ppo.py`, `torchrun --nproc_per_node N ppo.py`)
USE_LORA = False                    # train LoRA adapters (peft); reference = base with adapters off
LORA_R = 16                         # adapter rank r
LORA_ALPHA = 32                     # adapter scale alpha (the update is scaled by alpha / r)
LORA_DROPOUT = 0.0                  # keep 0: dropout makes the PPO ratio != 1 before any update
LORA_TARGET_MODULES = "all-linear"  # "all-linear", or comma-separated module names: "q_proj,v_proj"
SHARED_BASE = False                 # policy, critic: two LoRA adapters on one frozen base (the ref)
LOAD_IN_4BIT = False                # QLoRA: that base in 4-bit NF4 (bitsandbytes; needs adapters)
BASE_COMPUTE_DTYPE = "auto"         # 4-bit base computes in: "auto" (bf16 on GPUs, else "float32")
SAVE_POLICY_AS = "merged"           # LoRA's final and best/ policy: "merged" | "adapter" (small)
GRADIENT_CHECKPOINTING = False      # recompute activations in backward: less memory, ~30% slower
OFFLOAD_REF_AND_REWARD = False      # keep the reference and reward models on CPU while not running
DISTRIBUTED_TIMEOUT = 1800          # seconds a process waits for the others in a collective

# Hardware
DEVICE = "auto"                     # "auto": this process's GPU when there is one, else CPU | "cpu"
MIXED_PRECISION = "auto"            # "auto" (bf16 if supported, else none) | "bf16" | "fp16" | "no"

CONFIG_KEYS = tuple(name for name in list(globals()) if name.isupper())


# ---------------------------------------------------------------------------------------------
# 3. PPO math and its variants: pure functions, tensors in and out (B sequences, T tokens, V vocab)
# ---------------------------------------------------------------------------------------------
def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Sum of x where mask is True; `where`, not `x * mask`, so a NaN in padding cannot leak in."""
    kept = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the valid entries; Bessel-corrected like TRL's masked_var."""
    centred = x - masked_mean(x, mask)
    count = mask.sum()
    return masked_sum(centred * centred, mask) / (count - int(unbiased)).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, mean=None, var=None,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over valid entries (mean / var may come from all processes); padding -> 0.

    https://github.com/openai/lm-human-preferences/blob/cbfd210/lm_human_preferences/utils/core_torch.py
    """
    mean = masked_mean(x, mask) if mean is None else mean
    var = masked_var(x, mask) if var is None else var
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return torch.where(mask, whitened, torch.zeros((), dtype=x.dtype, device=x.device))


def softmax_statistics(z: torch.Tensor, tokens: torch.Tensor,
                       with_entropy: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """log p(token) and H(p) of p = softmax(z) for a chunk of rows: z (rows, V) float32."""
    log_z = torch.logsumexp(z, dim=-1)
    logprobs = z.gather(1, tokens[:, None]).squeeze(1) - log_z
    entropy = (log_z - torch.softmax(z, dim=-1).mul_(z).sum(-1)) if with_entropy else None
    return logprobs, entropy


def softmax_gradient_(z: torch.Tensor, tokens: torch.Tensor, entropy: torch.Tensor, grad_logprobs,
                      grad_entropy, temperature: float) -> torch.Tensor:
    """In place, z = logits / T of a chunk (rows, V) float32 becomes d loss / d logits, from the
    gradients of log p(token) and H (either may be None):
        d logp_y / dz = onehot(y) - p,    dH / dz = -p * (log p + H)."""
    z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))                               # log p
    p = z.exp()
    g_lp = grad_logprobs[:, None] if grad_logprobs is not None else torch.zeros_like(p[:, :1])
    if grad_entropy is not None:                         # in place: -p * (g_lp + g_H * (log p + H))
        z.add_(entropy[:, None]).mul_(grad_entropy[:, None]).add_(g_lp)
    else:
        z.copy_(g_lp.expand_as(z))
    z.mul_(p).neg_()
    z.scatter_add_(1, tokens[:, None], g_lp)
    return z.div_(temperature) if temperature != 1.0 else z


class _LogprobsAndEntropy(torch.autograd.Function):
    """log pi(token) and entropy H(pi) of softmax(logits / T), one row chunk at a time.

    Autograd through log_softmax keeps several (B, T, V) float32 tensors alive; this keeps only the
    logits (whatever their dtype) and recomputes the softmax of one chunk in backward, in place."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature, chunk_rows, with_entropy):
        logprobs = torch.empty(tokens.shape, dtype=torch.float32, device=logits.device)
        entropy = torch.zeros_like(logprobs)
        for start in range(0, logits.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            lp, h = softmax_statistics(scaled_logits(logits[rows], temperature), tokens[rows],
                                       with_entropy)
            logprobs[rows] = lp
            if h is not None:
                entropy[rows] = h
        ctx.save_for_backward(logits, tokens, entropy)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, tokens, entropy = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            grad_logits[rows] = softmax_gradient_(
                scaled_logits(logits[rows], ctx.temperature), tokens[rows], entropy[rows],
                None if grad_logprobs is None else grad_logprobs[rows],
                None if grad_entropy is None else grad_entropy[rows], ctx.temperature)
        return grad_logits, None, None, None, None


class _HeadLogprobsAndEntropy(torch.autograd.Function):
    """The same statistics from the last hidden states and the LM head: logits = hidden W^T of one
    chunk of rows at a time, in forward and again in backward, so no (B, T, V) logits tensor (nor
    its gradient) is ever held whole, as a fused LM head and log-softmax. The head runs in the
    dtype autocast would give it (`dtype`), so the values are the model's own logits'."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, chunk_rows, with_entropy, dtype):
        logprobs = torch.empty(tokens.shape, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros_like(logprobs)
        w = weight.to(dtype)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            z = scaled_logits(nn.functional.linear(hidden[rows].to(dtype), w), temperature)
            lp, h = softmax_statistics(z, tokens[rows], with_entropy)
            logprobs[rows] = lp
            if h is not None:
                entropy[rows] = h
        ctx.save_for_backward(hidden, weight, tokens, entropy)
        ctx.temperature, ctx.chunk_rows, ctx.dtype = temperature, chunk_rows, dtype
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, tokens, entropy = ctx.saved_tensors
        w = weight.to(ctx.dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            h = hidden[rows].to(ctx.dtype)
            g = softmax_gradient_(
                scaled_logits(nn.functional.linear(h, w), ctx.temperature), tokens[rows],
                entropy[rows], None if grad_logprobs is None else grad_logprobs[rows],
                None if grad_entropy is None else grad_entropy[rows], ctx.temperature).to(ctx.dtype)
            grad_hidden[rows] = g @ w
            grad_weight += (g.t() @ h).float()
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None


def scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """A float32 copy of logits / T (always a copy: the caller's logits stay as they are)."""
    z = logits.to(torch.float32, copy=True)
    return z.div_(temperature) if temperature != 1.0 else z


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                         with_entropy: bool = True):
    """logits (B, T, V) of any float dtype, tokens (B, T) -> (log pi(token) (B, T), entropy (B, T)),
    float32. with_entropy=False skips the entropy (returned as zeros), e.g. for the reference
    model."""
    batch, length, vocab = logits.shape
    chunk_rows = max(1, (1 << 24) // vocab)       # 64 MB per float32 temporary; two alive at once
    logprobs, entropy = _LogprobsAndEntropy.apply(
        logits.reshape(batch * length, vocab), tokens.reshape(-1), float(temperature), chunk_rows,
        with_entropy)
    return logprobs.view(batch, length), entropy.view(batch, length)


def head_logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                              temperature: float = 1.0, with_entropy: bool = True):
    """Last hidden states (B, T, H) before the tokens (B, T) and the LM head's weight (V, H) ->
    (log pi(token) (B, T), entropy (B, T)) float32, the logits made 16 MB of rows at a time."""
    batch, length, _ = hidden.shape
    device = hidden.device.type
    dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else
             torch.promote_types(hidden.dtype, weight.dtype))
    chunk_rows = max(1, (1 << 22) // weight.shape[0])
    logprobs, entropy = _HeadLogprobsAndEntropy.apply(
        hidden.reshape(batch * length, -1), weight, tokens.reshape(-1), float(temperature),
        chunk_rows, with_entropy, dtype)
    return logprobs.view(batch, length), entropy.view(batch, length)


KL_ESTIMATORS = {  # KL_ESTIMATOR: d = log pi - log pi_ref of a token -> estimate of KL(pi || ref)
    "k1": lambda d: d.detach() * (1 + d - d.detach()),  # d: unbiased, negative on some tokens
    "k2": lambda d: 0.5 * d ** 2,                       # >= 0, biased
    "k3": lambda d: torch.expm1(-d) + d,                # (r - 1) - log r, r = pi_ref / pi: >= 0
}


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
               estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate (B, T) from samples of pi, by KL_ESTIMATORS[estimator].
    http://joschu.net/blog/kl-approx.html. As a loss term (KL_IN_LOSS) each one pulls pi toward
    pi_ref: k1 has the value d but the gradient sg(d) * grad log pi (the score-function form, k2's
    gradient), whose expectation over pi is grad KL(pi || pi_ref); plain d as a loss would have
    gradient grad log pi, whose expectation is 0 (the second audit's N2). k3's gradient points the
    same way (GRPO's choice)."""
    return KL_ESTIMATORS[estimator](logprobs - ref_logprobs)


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor,
                  kl_coef: float) -> torch.Tensor:
    """r_t = -beta * KL_t on every response token, plus the score on the last real one
    (B,) -> (B, T)."""
    rewards = torch.where(response_mask, -kl_coef * kl, torch.zeros((), device=kl.device))
    last = response_mask.sum(1) - 1                             # (B,) index of the EOS / last token
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor,
                gamma: float, lam) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens, V = 0 after the last one
    (B, T) -> (B, T); lam is one number or one per response (B,).
    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};
    returns = A + V."""
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(response_mask, values, zero)
    rewards = torch.where(response_mask, rewards, zero)
    lastgaelam = torch.zeros_like(values[:, 0])
    advantages_reversed = []
    for t in reversed(range(values.shape[1])):
        next_values = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return torch.where(response_mask, advantages, zero), torch.where(response_mask, returns, zero)


GROUP_BASELINES = {  # critic-free ADVANTAGE_ESTIMATORs: group rewards (prompts, G) -> advantages
    # (R - mean of the group) / (std of the group + eps)    (Shao et al. 2024, arXiv 2402.03300)
    "grpo": lambda g, eps: (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps),
    # R - mean of the group: no std, which favours groups of nearly equal rewards (arXiv 2503.20783)
    "dr_grpo": lambda g, eps: g - g.mean(1, keepdim=True),
    # R - mean of the other G - 1 rewards of the group    (Ahmadian et al. 2024, arXiv 2402.14740)
    "rloo": lambda g, eps: g - (g.sum(1, keepdim=True) - g) / (g.shape[1] - 1),
}
GROUP_ESTIMATORS = tuple(GROUP_BASELINES)        # one advantage per response, from its group


def group_advantages(rewards: torch.Tensor, group_size: int, estimator: str,
                     eps: float = 1e-6) -> torch.Tensor:
    """Critic-free advantages (B,) of sequence rewards (B,), the GROUP_SIZE responses of a prompt
    in consecutive rows, by GROUP_BASELINES[estimator]."""
    return GROUP_BASELINES[estimator](rewards.view(-1, group_size), eps).reshape(-1)


def masked_mean_var(x: torch.Tensor, mask: torch.Tensor,
                    all_sum) -> Tuple[torch.Tensor, torch.Tensor]:
    """Masked mean and (Bessel-corrected) variance over the valid entries of all processes, exact
    in two passes; all_sum adds a tensor over the processes."""
    total, count = all_sum(torch.stack([masked_sum(x, mask), mask.sum().to(x.dtype)]))
    mean = total / count.clamp(min=1)
    return mean, all_sum(masked_sum((x - mean) ** 2, mask)) / (count - 1).clamp(min=1)


def policy_lambdas(mask: torch.Tensor, cfg, dtype: torch.dtype = torch.float32):
    """The policy's GAE lambda: LAM, or with LENGTH_ADAPTIVE_LAM = alpha VAPO's length-adaptive
    lambda of each response (B,) in `dtype`, 1 - 1 / (alpha * its length) clamped to [0, 1] (arXiv
    2504.05118: a long response needs a lambda near 1 for its end to reach its start)."""
    if not cfg.LENGTH_ADAPTIVE_LAM:
        return cfg.LAM
    lengths = mask.sum(1).clamp(min=1).to(dtype)
    return (1 - 1 / (cfg.LENGTH_ADAPTIVE_LAM * lengths)).clamp(0, 1)


def critic_advantages(rewards, values, mask, cfg, all_sum):
    """gae: GAE with the critic's V_old, whitened over the valid tokens of every process. The
    policy's advantages take policy_lambdas and the critic's returns LAM_VALUE (VC-PPO's decoupled
    GAE, arXiv 2503.01491: lambda = 1 carries the terminal score to every token's value target
    unbiased; None = LAM). Returns (advantages, returns, advantages before whitening), (B, T)."""
    advantages, _ = compute_gae(rewards, values, mask, cfg.GAMMA,
                                 policy_lambdas(mask, cfg, values.dtype))
    _, returns = compute_gae(rewards, values, mask, cfg.GAMMA,
                             cfg.LAM if cfg.LAM_VALUE is None else cfg.LAM_VALUE)
    mean, var = masked_mean_var(advantages, mask, all_sum)
    return masked_whiten(advantages, mask, mean, var), returns, advantages


def reinforce_pp_advantages(rewards, values, mask, cfg, all_sum):
    """reinforce++: GAE with V = 0 and lambda = 1 (the return to go), whitened like gae's."""
    advantages, returns = compute_gae(rewards, torch.zeros_like(rewards), mask, cfg.GAMMA, 1.0)
    mean, var = masked_mean_var(advantages, mask, all_sum)
    return masked_whiten(advantages, mask, mean, var), returns, advantages


def group_baseline_advantages(rewards, values, mask, cfg, all_sum):
    """grpo, dr_grpo, rloo: each response's summed reward against its group, on every token;
    returns are 0 (no critic)."""
    sequence = group_advantages(masked_sum(rewards, mask, 1), cfg.GROUP_SIZE,
                                cfg.ADVANTAGE_ESTIMATOR)
    advantages = torch.where(mask, sequence[:, None], torch.zeros((), device=rewards.device))
    return advantages, torch.zeros_like(rewards), advantages


ADVANTAGE_ESTIMATORS = {"gae": critic_advantages, "reinforce++": reinforce_pp_advantages,
                        **dict.fromkeys(GROUP_ESTIMATORS, group_baseline_advantages)}


def compute_advantages(scores, logprobs, ref_logprobs, values, mask, kl_coef: float, cfg,
                       all_sum) -> Tuple[torch.Tensor, ...]:
    """Steps 5-6 of the rollout: r_t = -beta * KL_t plus the score at the last token, then
    advantages by ADVANTAGE_ESTIMATORS[ADVANTAGE_ESTIMATOR]. Returns (advantages, returns, kl (None
    without a reference), advantages before whitening), each (B, T)."""
    kl = (None if ref_logprobs is None else                   # (B, T); None: no KL in the objective
          kl_penalty(logprobs, ref_logprobs, cfg.KL_ESTIMATOR))
    rewards = shape_rewards(scores, torch.zeros_like(logprobs) if kl is None else kl, mask, kl_coef)
    estimator = ADVANTAGE_ESTIMATORS[cfg.ADVANTAGE_ESTIMATOR]
    advantages, returns, unwhitened = estimator(rewards, values, mask, cfg, all_sum)
    return advantages, returns, kl, unwhitened


def clipped_surrogate(ratio, advantages, clip_low: float, clip_high: float, dual_clip: float = 0.0):
    """max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high)) per token; with dual clip c,
    a token with A < 0 loses at most -c * A (Ye et al. 2020, arXiv 1912.09729; c = 3 is usual).
    Returns (loss, clipped: a clip decided the value, so no gradient flows)."""
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss, clipped = torch.max(pg_loss1, pg_loss2), pg_loss2 > pg_loss1
    if dual_clip:
        bound = -advantages * dual_clip
        dual = (advantages < 0) & (loss > bound)
        loss, clipped = torch.where(dual, bound, loss), clipped | dual
    return loss, clipped


def clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low: float,
                        clip_high: float, dual_clip: float = 0.0):
    """PPO-clip surrogate per token on ratio = pi / pi_old, clipped to [1 - eps_low, 1 + eps_high]
    (mask unused: every token is its own term). Returns (loss (B, T), clipped (B, T) bool)."""
    ratio = torch.exp(logprobs - old_logprobs)
    return clipped_surrogate(ratio, advantages, clip_low, clip_high, dual_clip)


def gspo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low: float, clip_high: float,
                     dual_clip: float = 0.0):
    """GSPO: one ratio per sequence, s = exp(mean over its tokens of log(pi / pi_old)), clipped
    like PPO's (GSPO, arXiv 2507.18071, clips s to [1 - 3e-4, 1 + 4e-4]: s is a geometric mean, so
    PPO's 0.2 seldom binds). Each token carries s with the gradient of s / |y| (GSPO-token's
    sg[s] * pi / sg[pi]), so a mean over a sequence's tokens is the sequence's loss exactly."""
    sequence_log_ratio = masked_mean(logprobs - old_logprobs, mask, 1).detach()          # (B,)
    ratio = torch.exp(logprobs - logprobs.detach() + sequence_log_ratio[:, None])
    return clipped_surrogate(ratio, advantages, clip_low, clip_high, dual_clip)


def cispo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low: float, clip_high: float,
                      dual_clip: float = 0.0):
    """CISPO (MiniMax-M1, arXiv 2506.13585): -sg(clip(ratio, 1 - eps_low, 1 + eps_high)) * A *
    log pi: a clipped token keeps its gradient, only its weight is bounded (so no dual clip: the
    settings refuse one; mask unused). Returns (loss, clipped: the weight was clipped)."""
    ratio = torch.exp(logprobs - old_logprobs).detach()
    weight = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return -advantages * weight * logprobs, weight != ratio


def clip_ranges(cfg: Config) -> Tuple[float, float]:
    """(eps_low, eps_high): CLIP_RANGE_LOW / CLIP_RANGE_HIGH, each CLIP_RANGE when None. A higher
    eps_high is DAPO's clip-higher (arXiv 2503.14476: 0.28 with eps_low 0.2): unlikely tokens with
    a positive advantage may grow further, against entropy collapse."""
    return tuple(float(cfg.CLIP_RANGE if value is None else value)
                 for value in (cfg.CLIP_RANGE_LOW, cfg.CLIP_RANGE_HIGH))


POLICY_LOSSES = {"ppo": clipped_policy_loss, "gspo": gspo_policy_loss, "cispo": cispo_policy_loss}


def policy_loss(logprobs, old_logprobs, advantages, mask, cfg):
    """POLICY_LOSSES[POLICY_LOSS]'s per-token loss (B, T) and clipped flags (B, T)."""
    return POLICY_LOSSES[cfg.POLICY_LOSS](logprobs, old_logprobs, advantages, mask,
                                          *clip_ranges(cfg), cfg.DUAL_CLIP)


def token_sum(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_sum(loss, mask)


def sequence_mean_sum(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sum over rows of each row's token mean."""
    return (masked_sum(loss, mask, 1) / mask.sum(1).clamp(min=1)).sum()


LOSS_AGGREGATIONS = {  # LOSS_AGGREGATION: (numerator, denominator given MAX_NEW_TOKENS), both sums
    "token-mean": (token_sum, lambda mask, n: mask.sum().float()),               # over rows
    # the GRPO paper's: each sequence's token mean, averaged (long wrong answers weigh less)
    "seq-mean-token-mean": (sequence_mean_sum, lambda mask, n: mask.any(1).sum().float()),
    "seq-mean-token-sum": (token_sum, lambda mask, n: mask.any(1).sum().float()),
    # Dr. GRPO (arXiv 2503.20783): token sums / (sequences x MAX_NEW_TOKENS), a constant per
    # sequence, so a long response's tokens weigh as much as a short one's
    "seq-mean-token-sum-norm": (token_sum, lambda mask, n: mask.any(1).sum().float() * n),
}


def aggregate_sum(loss: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """The numerator of LOSS_AGGREGATIONS[mode] over some rows: a sum over rows, so the sums of the
    micro-batches of a minibatch add up to the minibatch's."""
    return LOSS_AGGREGATIONS[mode][0](loss, mask)


def aggregate_count(mask: torch.Tensor, mode: str, max_new_tokens: int) -> torch.Tensor:
    """The denominator of LOSS_AGGREGATIONS[mode] over some rows, also a sum over rows: tokens
    (token-mean), sequences (seq-mean-*), or sequences x MAX_NEW_TOKENS
    (seq-mean-token-sum-norm)."""
    return LOSS_AGGREGATIONS[mode][1](mask, max_new_tokens)


def positive_mask(batch, cfg) -> torch.Tensor:
    """(B, T) the trained tokens of the responses whose score reaches POSITIVE_LM_THRESHOLD."""
    positive = batch.trained & (batch.scores >= cfg.POSITIVE_LM_THRESHOLD)
    return batch.response_mask & positive[:, None]


def loss_counts(batch, cfg) -> torch.Tensor:
    """The denominators of ppo_loss over some rows, [policy terms (LOSS_AGGREGATION), value loss
    (tokens), positive examples (LOSS_AGGREGATION)]: sums over rows, added over the micro-batches
    and processes of a minibatch."""
    mask = batch.response_mask & batch.trained[:, None]
    return torch.stack([aggregate_count(mask, cfg.LOSS_AGGREGATION, cfg.MAX_NEW_TOKENS),
                        batch.response_mask.sum().float(),
                        aggregate_count(positive_mask(batch, cfg), cfg.LOSS_AGGREGATION,
                                        cfg.MAX_NEW_TOKENS)])


def clipped_value_loss(values, old_values, returns, clip_range_value: float):
    """0.5 * max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2) per token
    -> (loss, clipped)."""
    values_clipped = torch.clamp(values, old_values - clip_range_value,
                                 old_values + clip_range_value)
    vf_loss1 = (values - returns) ** 2
    vf_loss2 = (values_clipped - returns) ** 2
    return 0.5 * torch.max(vf_loss1, vf_loss2), vf_loss2 > vf_loss1


def ppo_loss(logprobs, entropy, values, batch, cfg, counts: torch.Tensor,
             train_policy: bool = True) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """One micro-batch's share of its minibatch's loss: the policy terms (POLICY_LOSS - c2 * H,
    + KL_LOSS_COEF * KL with KL_IN_LOSS, as GRPO does (arXiv 2402.03300, with k3); the reward then
    has no KL) aggregated by LOSS_AGGREGATION, + POSITIVE_LM_COEF * the NLL of the positive
    examples (VAPO's self-imitation, aggregated like them over the positive rows), + c1 * the token
    mean of the value loss, each over the denominator of the whole minibatch (counts, from
    loss_counts). Rows not `trained` (DYNAMIC_SAMPLING, group estimators only) add nothing to the
    policy terms (the value loss, critic runs only, takes every row). With train_policy False
    (VALUE_WARMUP_STEPS) the policy terms weigh 0: every parameter still gets a gradient, as DDP
    requires. Returns the loss and the token sums of its statistics, by name."""
    mask = batch.response_mask & batch.trained[:, None]
    pg_loss, pg_clipped = policy_loss(logprobs, batch.old_logprobs, batch.advantages, mask, cfg)
    policy_terms = pg_loss - cfg.ENTROPY_COEF * entropy
    log_ratio = (logprobs - batch.old_logprobs).detach()
    sums = {"tokens": mask.sum().float(),
            "pg_loss": masked_sum(pg_loss.detach(), mask),
            "entropy": masked_sum(entropy.detach(), mask),
            "pg_clipped": masked_sum(pg_clipped.float(), mask),
            "approx_kl": masked_sum(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio": masked_sum(log_ratio.exp(), mask)}
    if cfg.KL_IN_LOSS:
        kl = kl_penalty(logprobs, batch.ref_logprobs, cfg.KL_ESTIMATOR)
        policy_terms = policy_terms + cfg.KL_LOSS_COEF * kl
        sums["kl_loss"] = masked_sum(kl.detach(), mask)
    loss = aggregate_sum(policy_terms, mask, cfg.LOSS_AGGREGATION) / counts[0].clamp(min=1e-8)
    if cfg.POSITIVE_LM_COEF:
        positive = positive_mask(batch, cfg)
        nll = aggregate_sum(-logprobs, positive, cfg.LOSS_AGGREGATION) / counts[2].clamp(min=1e-8)
        loss = loss + cfg.POSITIVE_LM_COEF * nll
        sums["positive_lm"] = masked_sum(-logprobs.detach(), positive)
        sums["positive_tokens"] = positive.sum().float()
    loss = loss * float(train_policy)
    if values is not None:
        value_mask = batch.response_mask
        vf_loss, vf_clipped = clipped_value_loss(values, batch.values, batch.returns,
                                                 cfg.CLIP_RANGE_VALUE)
        loss = loss + cfg.VALUE_LOSS_COEF * masked_sum(vf_loss, value_mask) / counts[1].clamp(min=1)
        sums["vf_loss"] = masked_sum(vf_loss.detach(), value_mask)
        sums["vf_clipped"] = masked_sum(vf_clipped.float(), value_mask)
    return loss, sums


def explained_variance(values, returns, mask) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over valid tokens: 1 is a perfect critic, <= 0 no better than a
    constant."""
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int,
                     penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment of response lengths (B,): 0 up to max_new_tokens - buffer,
    then linear down to -penalty at max_new_tokens (0 everywhere when buffer is 0)."""
    if not buffer:
        return torch.zeros(lengths.shape, device=lengths.device)
    over = (lengths.float() - (max_new_tokens - buffer)) / buffer
    return -penalty * over.clamp(0, 1)


def penalised(scores: torch.Tensor, has_eos: torch.Tensor, lengths: torch.Tensor,
              cfg) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 3: scores (B,) minus MISSING_EOS_PENALTY for a response that never stopped, or with
    OVERLONG_BUFFER on, DAPO's soft overlong penalty instead (it replaces the missing-EOS penalty,
    so a response cut at MAX_NEW_TOKENS pays OVERLONG_PENALTY, as in DAPO, not both). Returns
    (scores, the overlong penalty)."""
    overlong = overlong_penalty(lengths, cfg.MAX_NEW_TOKENS, cfg.OVERLONG_BUFFER,
                                cfg.OVERLONG_PENALTY)
    missing_eos = 0.0 if cfg.OVERLONG_BUFFER else cfg.MISSING_EOS_PENALTY
    return scores - missing_eos * (~has_eos).float() + overlong, overlong


def uninformative_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) True for the responses of a group whose scores are all equal: a group baseline gives
    them zero advantage when the reward holds no KL, so they would only dilute the gradient
    (DAPO's DYNAMIC_SAMPLING drops them)."""
    grouped = scores.view(-1, group_size)
    same = (grouped == grouped[:, :1]).all(1)
    return same.repeat_interleave(group_size)


def adaptive_kl_coef(kl_coef: float, current_kl: float, n_responses: int, target: float,
                     horizon: int) -> float:
    """beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)
    (Ziegler et al. 2019, section 2.2)."""
    proportional_error = min(max(current_kl / target - 1, -0.2), 0.2)
    return kl_coef * (1 + proportional_error * n_responses / horizon)


def merge_moments(mean: float, var: float, count: int, batch_mean: float, batch_var: float,
                  batch_count: int) -> Tuple[float, float, int]:
    """Running mean and (population) variance after adding a batch (Chan et al.'s parallel
    update)."""
    total = count + batch_count
    delta = batch_mean - mean
    m2 = var * count + batch_var * batch_count + delta ** 2 * count * batch_count / total
    return mean + delta * batch_count / total, m2 / total, total


# ---------------------------------------------------------------------------------------------
# 4. The step's data and state: rows, experience, minibatch schedule, metrics, forward passes
# ---------------------------------------------------------------------------------------------
def pad(sequences: List[List[int]], pad_id: int, side: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (B, L) ids padded on `side` ("left": prompts, "right": responses) and the
    (B, L) bool mask of the real tokens."""
    rows = [torch.tensor(s, dtype=torch.long) for s in sequences]
    ids = pad_sequence(rows, batch_first=True, padding_value=pad_id, padding_side=side)
    real = [torch.ones(len(row), dtype=torch.bool) for row in rows]
    return ids, pad_sequence(real, batch_first=True, padding_value=False, padding_side=side)


def truncate_at_stop(response_ids: torch.Tensor, stop_ids: torch.Tensor):
    """Keep each response up to and including its first stop token: (lengths (B,), has_stop (B,)
    bool)."""
    is_stop = torch.isin(response_ids, stop_ids)                      # (B, T)
    has_stop = is_stop.any(1)
    first_stop = is_stop.int().argmax(1)
    lengths = torch.where(has_stop, first_stop + 1,
                          torch.full_like(first_stop, response_ids.shape[1]))
    return lengths, has_stop


class Rows:
    """Rows of a left-padded prompt `query_*` (B, P) and a right-padded response (B, T), with
    per-row tensors (B,) and lists; the dataclasses below are its fields."""

    def __post_init__(self):
        # Lengths on the host, so that cutting micro-batches to size never waits for the
        # accelerator.
        object.__setattr__(self, "query_lengths", self.query_mask.sum(1).cpu())
        object.__setattr__(self, "response_lengths", self.response_mask.sum(1).cpu())

    def __len__(self):
        return len(self.query_ids)

    def select(self, idx: torch.Tensor):
        """The rows `idx`, cut to their own longest prompt and response (no global padding)."""
        idx_list = idx.tolist()
        prompt_len = int(self.query_lengths[idx].max())
        response_len = int(self.response_lengths[idx].max())
        picked = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                picked[field.name] = [value[i] for i in idx_list]
            elif value is None or value.dim() == 1:
                picked[field.name] = None if value is None else value[idx.to(value.device)]
            elif field.name.startswith("query"):
                picked[field.name] = value[idx.to(value.device), -prompt_len:]
            else:
                picked[field.name] = value[idx.to(value.device), :response_len]
        return type(self)(**picked)

    def sequences(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, P + T) input ids and attention mask."""
        return (torch.cat([self.query_ids, self.response_ids], 1),
                torch.cat([self.query_mask, self.response_mask], 1).long())


@dataclasses.dataclass(frozen=True)
class Rollout(Rows):
    """What generate_response returns: B prompts and one sampled response each, cut at its first
    stop."""
    prompts: List[str]
    query_ids: torch.Tensor                      # (B, P)
    query_mask: torch.Tensor                     # (B, P) bool, real prompt tokens
    response_ids: torch.Tensor                   # (B, T), padding after the first stop token
    response_mask: torch.Tensor                  # (B, T) bool: real response tokens, stop included
    responses: List[str]                         # decoded, without the stop token
    has_eos: torch.Tensor                        # (B,) bool


@dataclasses.dataclass(frozen=True)
class Experience(Rows):
    """The complete batch the PPO epochs train on, made once per step by make_experience."""
    query_ids: torch.Tensor                      # (B, P)
    query_mask: torch.Tensor                     # (B, P) bool
    response_ids: torch.Tensor                   # (B, T)
    response_mask: torch.Tensor                  # (B, T) bool
    has_eos: torch.Tensor                        # (B,) bool
    scores: torch.Tensor                         # (B,) score of each response, penalties included
    old_logprobs: torch.Tensor                   # (B, T) log pi_old(token) at TEMPERATURE
    ref_logprobs: Optional[torch.Tensor]         # (B, T) log pi_ref(token); None: no reference
    values: Optional[torch.Tensor]               # (B, T) V_old; None without a critic
    advantages: torch.Tensor                     # (B, T) whitened (gae, reinforce++) or per group
    returns: torch.Tensor                        # (B, T) value targets (0 without a critic)
    trained: torch.Tensor                        # (B,) bool: in the loss (False: DYNAMIC_SAMPLING
                                                 # dropped its group)

    def tensors(self) -> List[torch.Tensor]:
        return [t for t in (self.scores, self.old_logprobs, self.ref_logprobs, self.values,
                            self.advantages, self.returns) if t is not None]


class PolicyPass(NamedTuple):
    """One forward of the trained models over some rows: log pi (B, T), entropy (B, T), V (B, T) or
    None."""
    logprobs: torch.Tensor
    entropy: torch.Tensor
    values: Optional[torch.Tensor]

    def detached_rows(self, idx: torch.Tensor) -> "PolicyPass":
        return PolicyPass(*(None if t is None else t.detach()[idx.to(t.device)] for t in self))


def minibatch_schedule(n: int, step: int, cfg) -> List[List[List[torch.Tensor]]]:
    """epochs -> minibatches (one optimizer step each) -> micro-batches (index tensors) over a
    rollout of n rows, shuffled per epoch by a generator seeded from (SEED, step): the same on every
    process and after a resume, and no draw on the global RNG."""
    generator = torch.Generator().manual_seed(cfg.SEED * 1_000_003 + step)
    epochs = []
    for _ in range(cfg.GROUP_EPOCHES):
        order = torch.randperm(n, generator=generator)
        minibatches = [mb for mb in order.tensor_split(cfg.NUM_MINI_BATCHES) if len(mb)]
        epochs.append([[m for m in mb.tensor_split(cfg.GRADIENT_ACCUMULATION_STEPS) if len(m)]
                       for mb in minibatches])
    return epochs


def reuses_first_pass(schedule: List[List[List[torch.Tensor]]], n: int) -> bool:
    """Whether the update's first forward can be the rollout's pass for log pi_old and V_old: it
    runs the same weights over the same tokens when its micro-batch holds all n rows."""
    return len(schedule[0][0][0]) == n


def optimizer_steps_per_update(schedule: List[List[List[torch.Tensor]]]) -> int:
    return sum(len(minibatches) for minibatches in schedule)


def step_prompt_indices(order: List[int], position: int, per_step: int) -> List[int]:
    """The prompts of the PPO step at `position` in an epoch's order: always per_step of them, so
    every process gets the same number each step; the epoch's short last step is filled by wrapping
    around to the start of the order (as torch's DistributedSampler pads)."""
    taken = list(order[position:position + per_step])
    while len(taken) < per_step:
        taken += order[:per_step - len(taken)]
    return taken


def shard(items: List, rank: int, world: int) -> Tuple[List, int]:
    """This process's share of items when every process must get as many: ceil(n / world) each,
    padded by wrapping around. Returns (share, how many of them are real, i.e. come first and
    count)."""
    per_process = math.ceil(len(items) / world)
    share = [items[i % len(items)] for i in range(rank, per_process * world, world)]
    return share, len(range(rank, len(items), world))


@dataclasses.dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run needs to continue exactly."""
    global_step: int = 0                   # PPO steps completed
    epoch: int = 0                         # pass over the training prompts in progress
    position: int = 0                      # prompts of this epoch used so far (all processes)
    optimizer_steps: int = 0               # optimizer steps taken: drives the lr schedule
    kl_coef: float = 0.0                   # beta (moved by ADAPTIVE_KL)
    reward_mean: float = 0.0               # running score moments (REWARD_NORMALIZATION)
    reward_var: float = 1.0
    reward_count: int = 0
    consecutive_skips: int = 0
    best_metric: Optional[float] = None    # EARLY_STOPPING_METRIC: best value and its step
    best_step: int = -1
    evals_without_improvement: int = 0
    lr_scale: float = 1.0                  # "plateau" multiplier of both learning rates
    lr_horizon: float = math.inf           # optimizer step where the schedule ends (inf: no plan)
    lr_restart: int = 0                    # a re-timed schedule goes on from this step ...
    lr_restart_factor: float = 1.0         # ... at this factor (timed_schedule)
    plateau_bad_evals: int = 0
    last_eval_step: int = -1


@dataclasses.dataclass
class Plan:
    """Sizes derived once from the settings and the data, checked and printed at start."""
    prompts: int
    prompts_per_step: int                  # all processes
    steps_per_epoch: int
    total_steps: int
    optimizer_steps: int


def make_plan(n_prompts: int, cfg: Config, world: int) -> Plan:
    """The sizes of a run over n_prompts training prompts on `world` processes, logged once."""
    per_step = cfg.BATCH_SIZE * cfg.GRADIENT_ACCUMULATION_STEPS * cfg.NUM_MINI_BATCHES * world
    steps_per_epoch = math.ceil(n_prompts / per_step)
    total = steps_per_epoch * cfg.NUM_EPOCHES
    total = min(total, cfg.MAX_STEPS) if cfg.MAX_STEPS else total
    plan = Plan(n_prompts, per_step, steps_per_epoch, total,
                total * cfg.GROUP_EPOCHES * cfg.NUM_MINI_BATCHES)
    tail = n_prompts % per_step
    if tail:
        logger.info(f"The last step of each epoch has {tail} new prompts; it repeats the first "
                    f"{per_step - tail} of the epoch's order, so every step has {per_step} "
                    "prompts.")
    logger.info(f"{n_prompts} training prompts; per PPO step {per_step} prompts x "
                f"{cfg.GROUP_SIZE} responses on {world} process(es); {steps_per_epoch} steps "
                f"per epoch x {cfg.NUM_EPOCHES} epochs = {total} steps; "
                f"{plan.optimizer_steps} optimizer steps ({cfg.GROUP_EPOCHES} PPO epochs x "
                f"{cfg.NUM_MINI_BATCHES} minibatches per step)")
    logger.info(f"Objective: {describe_objective(cfg)}")
    for warning in setting_warnings(cfg):
        logger.warning(warning)
    return plan


def update_metrics(sums: Dict[str, torch.Tensor], norms: torch.Tensor, epochs: int,
                   skipped: int, empty: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The update's log rows from ppo_loss's sums over the whole update and the gradient norms
    (optimizer steps, models); NaN sums and norms give the same keys for a step whose update was
    skipped. skipped counts every optimizer step not taken; empty (DYNAMIC_SAMPLING) those of
    them with no row to train, which are not NaN skips."""
    per_token = {name: value / sums["tokens"].clamp(min=1) for name, value in sums.items()}
    metrics = {"ppo/loss/policy": per_token["pg_loss"],
               "ppo/policy/entropy": per_token["entropy"],
               "ppo/policy/clipfrac": per_token["pg_clipped"],
               "ppo/policy/approx_kl": per_token["approx_kl"],
               "ppo/ratio_mean": per_token["ratio"],
               "ppo/epochs": torch.tensor(float(epochs)),
               "ppo/skipped_optimizer_steps": torch.tensor(float(skipped)),
               **({} if empty is None else {"ppo/empty_minibatches": torch.tensor(float(empty))}),
               "grad_norm/policy": norms[:, 0].nanmean()}
    if "kl_loss" in sums:
        metrics["ppo/loss/kl"] = per_token["kl_loss"]
    if "positive_lm" in sums:                            # per token of the positive examples
        metrics["ppo/loss/positive_lm"] = sums["positive_lm"] / sums["positive_tokens"].clamp(min=1)
        metrics["ppo/positive_fraction"] = per_token["positive_tokens"]
    if "vf_loss" in sums:
        metrics["ppo/loss/value"] = per_token["vf_loss"]
        metrics["ppo/val/clipfrac"] = per_token["vf_clipped"]
        metrics["grad_norm/critic"] = norms[:, 1].nanmean()
    return metrics


def skipped_update_metrics(optimizer_steps: int, with_critic: bool, cfg,
                           nothing_to_learn: bool) -> Dict[str, torch.Tensor]:
    """update_metrics' keys for a step whose update did not run (a NaN, or nothing to learn):
    NaN statistics, every optimizer step skipped."""
    names = (["tokens", "pg_loss", "entropy", "pg_clipped", "approx_kl", "ratio"] +
             ["vf_loss", "vf_clipped"] * with_critic + ["kl_loss"] * bool(cfg.KL_IN_LOSS) +
             ["positive_lm", "positive_tokens"] * bool(cfg.POSITIVE_LM_COEF))
    nan = torch.tensor(math.nan)
    empty = (optimizer_steps if nothing_to_learn else 0) if cfg.DYNAMIC_SAMPLING else None
    return update_metrics(dict.fromkeys(names, nan), torch.full((1, 2), math.nan), 0,
                          optimizer_steps, empty)


def experience_metrics(experience: Experience, entropy: torch.Tensor, kl: Optional[torch.Tensor],
                       beta: float, unwhitened: torch.Tensor, cfg) -> Dict[str, torch.Tensor]:
    """The rollout's log rows: the objective (the KL to the reference, when there is one), the
    entropy, the advantages, the responses, and the critic's values when there is one."""
    x, mask = experience, experience.response_mask
    kl_sums = torch.zeros(len(x), device=mask.device) if kl is None else masked_sum(kl, mask, 1)
    non_score_reward = -beta * kl_sums                                                 # (B,)
    metrics = {"objective/kl_coef": torch.tensor(beta),
               "objective/entropy": masked_mean(entropy, mask),
               "objective/non_score_reward": non_score_reward.mean(),
               "objective/rlhf_reward": (x.scores + non_score_reward).mean(),
               "ppo/advantages_mean": masked_mean(unwhitened, mask),
               "response/length": mask.sum(1).float().mean(),
               "response/eos_rate": x.has_eos.float().mean()}
    if kl is not None:
        metrics["objective/kl"] = kl_sums.mean()
    if cfg.DYNAMIC_SAMPLING:
        metrics["ppo/trained_fraction"] = x.trained.float().mean()
    if x.values is not None:
        metrics.update({"ppo/returns_mean": masked_mean(x.returns, mask),
                        "ppo/val/mean": masked_mean(x.values, mask),
                        "ppo/val/explained_variance": explained_variance(x.values, x.returns,
                                                                         mask)})
    return metrics


def term_sums(terms: Dict[str, torch.Tensor], counted: Optional[torch.Tensor] = None
              ) -> torch.Tensor:
    """The sums of each reward term and of its square over the counted rows: (2 * terms,), to add
    over processes (term_statistics)."""
    counted = 1.0 if counted is None else counted
    values = list(terms.values())
    return torch.stack([(t * counted).sum() for t in values] +
                       [(t * t * counted).sum() for t in values]).float()


def term_statistics(names: List[str], sums: torch.Tensor,
                    count: torch.Tensor) -> Dict[str, torch.Tensor]:
    """reward/<name>/mean and /std of each term from term_sums added over processes (the std over
    every response of the step, not a mean of per-process stds)."""
    k, stats = len(names), {}
    for i, name in enumerate(names):
        mean = sums[i] / count
        stats[f"reward/{name}/mean"] = mean
        stats[f"reward/{name}/std"] = (sums[k + i] / count - mean * mean).clamp(min=0).sqrt()
    return stats


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so left padding never shifts them: cumsum(mask) - 1,
    clamped."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logits(model: nn.Module, keep_logits: bool, input_ids, attention_mask,
                    response_length: int) -> torch.Tensor:
    """(B, P + T) sequences -> the logits predicting each response token (B, T, V); with keep_logits
    (the model takes logits_to_keep) the head runs on those positions only."""
    kwargs = {"logits_to_keep": response_length + 1} if keep_logits else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                position_ids=position_ids_from_mask(attention_mask), **kwargs)
    return out.logits[:, -response_length - 1:-1]


def supports_logits_to_keep(model: nn.Module) -> bool:
    # under a peft wrapper
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def head_outputs(model: nn.Module, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar `score` head on every position of a backbone: (B, L) float32."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return model.score(hidden.last_hidden_state).squeeze(-1).float()


def sequence_scores(model: nn.Module, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
    """The reward model's score at each sequence's last real token, whatever the padding side:
    (B,)."""
    if not isinstance(getattr(model, "score", None), nn.Linear):      # encoders pool their own way
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (positions * attention_mask.long()).argmax(-1)            # (B,)
    return head_outputs(model, input_ids, attention_mask)[torch.arange(len(last)), last]


def body(model: nn.Module) -> nn.Module:
    """The transformer under a causal LM's head, through a peft wrapper (its adapters are in it)."""
    return (model.get_base_model() if hasattr(model, "get_base_model") else model).base_model


def fused_head(model: nn.Module) -> Optional[nn.Linear]:
    """The LM head when the model's logits are plainly hidden @ W^T (no bias, softcapping or
    scaling, no adapter on the head), so that head_logprobs_and_entropy can stand for them; None
    when they are not (the model's own logits are used then)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    config = getattr(inner.config, "get_text_config", lambda: inner.config)()
    if (type(head) is not nn.Linear or head.bias is not None or
            any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale",
                                                   "logits_scaling"))):
        return None
    return head


def response_statistics(model: nn.Module, keep_logits: bool, input_ids, attention_mask,
                        response_ids, temperature: float, with_entropy: bool = True):
    """(B, P + T) sequences -> (log pi, entropy) of each response token (B, T) at `temperature`:
    from the last hidden states through the fused LM head (no (B, T, V) logits held), or from the
    model's own logits when its head is not a plain linear one."""
    length, head = response_ids.shape[1], fused_head(model)
    if head is None:
        logits = response_logits(model, keep_logits, input_ids, attention_mask, length)
        with torch.autocast(input_ids.device.type, enabled=False):
            return logprobs_and_entropy(logits, response_ids, temperature, with_entropy)
    hidden = body(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                         position_ids=position_ids_from_mask(attention_mask)).last_hidden_state
    return head_logprobs_and_entropy(hidden[:, -length - 1:-1], head.weight, response_ids,
                                     temperature, with_entropy)


class PolicyAndCritic(nn.Module):
    """Both trained models in one module, so DDP / DeepSpeed wrap (and synchronise) them together:
    the policy and a critic model (backbone + `score` head), or with SHARED_BASE (`adapters`) the
    policy's base with its "critic" adapter and a value head."""

    def __init__(self, policy: nn.Module, critic: Optional[nn.Module],
                 adapters: Optional["Adapters"] = None):
        super().__init__()
        self.policy, self.critic, self.adapters = policy, critic, adapters
        self.keep_logits = supports_logits_to_keep(policy)

    def forward(self, input_ids, attention_mask, response_ids, temperature: float):
        """(B, P + T) sequences -> log pi (B, T), entropy (B, T) and values V_t (B, T) of each
        response token (None without a critic)."""
        logprobs, entropy = response_statistics(self.policy, self.keep_logits, input_ids,
                                                attention_mask, response_ids, temperature)
        values = None
        if self.adapters is not None:
            with self.adapters.active("critic"):
                hidden = body(self.policy)(input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=position_ids_from_mask(attention_mask),
                                           use_cache=False).last_hidden_state
            values = self.critic(hidden).squeeze(-1).float()[:, -response_ids.shape[1] - 1:-1]
        elif self.critic is not None:
            values = head_outputs(self.critic, input_ids,
                                  attention_mask)[:, -response_ids.shape[1] - 1:-1]
        return logprobs, entropy, values


class Reference(nn.Module):
    """The frozen reference pi_ref: a copy of ACTOR_MODEL, or under LoRA the policy with its
    adapters off (no second copy of the weights)."""

    def __init__(self, model: nn.Module, adapters_off: bool):
        super().__init__()
        self.model, self.adapters_off = model, adapters_off
        self.keep_logits = supports_logits_to_keep(model)

    def forward(self, input_ids, attention_mask, response_ids, temperature: float) -> torch.Tensor:
        """log pi_ref of each response token (B, T)."""
        with self.model.disable_adapter() if self.adapters_off else contextlib.nullcontext():
            return response_statistics(self.model, self.keep_logits, input_ids, attention_mask,
                                       response_ids, temperature, with_entropy=False)[0]


@contextlib.contextmanager
def placed(model: nn.Module, device, offload: bool):
    """With OFFLOAD_REF_AND_REWARD, a frozen model moves to the accelerator only while it runs
    (not a LoRA policy's base, which is trained around)."""
    if model is None or not offload or any(p.requires_grad for p in model.parameters()):
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to("cpu")


# ---------------------------------------------------------------------------------------------
# 5. PPOStep: one PPO step (the rollout recipe, the update, the commit) and the guide's hooks
# ---------------------------------------------------------------------------------------------
class PPOStep:
    """One PPO step and the guide's hooks: the models, the run state, train_step (the rollout
    recipe, the update, the commit), generate_response / compute_rewards / reward_model_score /
    evaluate. PPOTrainer (next section) adds the training loop around it."""

    def __init__(self, resume_from_checkpoint: Optional[str] = None,
                 reward_functions: Sequence = (), **settings):
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()           # no "Writing model shards" bars inside our own
        self.cfg = cfg = make_config(settings)
        validate_config(cfg)
        overridden = type(self).compute_rewards is not PPOStep.compute_rewards
        self.reward_hook = ("compute_rewards" if overridden else
                            None if cfg.REWARD_MODEL is None else "reward_model")
        self.reward_functions = reward_plan(cfg, reward_functions, self.reward_hook)
        self.chunk = cfg.BATCH_SIZE * cfg.GROUP_SIZE       # sequences in one generate or forward
        self.backend = Backend.create(cfg)
        self.accelerator = self.backend.accelerator
        self.is_main, self.device = self.backend.is_main, self.backend.device
        self.output_dir = Path(cfg.OUTPUT_DIR)
        self.log_path = setup_logging(self.output_dir, self.is_main)
        self.checkpoint = Path(resume_from_checkpoint) if resume_from_checkpoint else None
        saved = load_checkpoint_state(self.checkpoint, cfg) if self.checkpoint else None
        set_seed(cfg.SEED, device_specific=True)        # SEED + this process's rank
        self.state = TrainState(kl_coef=cfg.KL_COEF)
        self.plan: Optional[Plan] = None
        self.references: Dict[str, str] = {}       # prompt -> the dataset's reference output
        self.prompt_ids: Dict[str, List[int]] = {}
        self.prompt_texts: Dict[str, str] = {}      # prompt -> the text the policy conditions on
        self.prompt_contents: Dict[str, str] = {}   # prompt -> content as kept (MAX_PROMPT_LENGTH)
        self.eval_samples: List[dict] = []
        self.eval_responses: List[str] = []         # this process's last evaluation responses
        self.stop_request = StopRequest()
        self.files = RunFiles(cfg, self.output_dir, self.is_main, self.log_path)
        self.warned_negative_kl = False
        self.last_eval_metric: Optional[float] = None   # EARLY_STOPPING_METRIC's latest value
        models = load_models(cfg, self.backend, self.checkpoint)
        self.tokenizer, self.reward_tokenizer, self.stop_ids = (
            models.tokenizer, models.reward_tokenizer, models.stop_ids)
        self.model, self.optimizer, self.ref, self.reward_model = (
            models.model, models.optimizer, models.ref, models.reward_model)
        self.policy_dtype = models.policy_dtype
        self.reward_max_length, self.reward_reads_policy_ids, self.reward_specials = (
            reward_input_plan(self.tokenizer, self.reward_tokenizer, self.reward_model))
        self.generated_ids: Dict[Tuple[str, str], List[int]] = {}   # (prompt, response): its ids
        logger.info("Score = " + " + ".join(f"{weight:g} x {name}" for name, (_, weight) in
                                            self.reward_functions.items()) + " (reward/<name>)")
        if saved is not None:
            self.state = restore_checkpoint(saved, self.checkpoint, cfg, self.backend)
        self.saved_step = self.state.global_step if saved is not None else -1  # on disk already

    @property
    def policy(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model).policy

    @property
    def critic(self) -> Optional[nn.Module]:
        return self.accelerator.unwrap_model(self.model).critic

    # -- one PPO step: the experience, the update, the commit --------------------------------------
    def train_step(self, prompts: List[str]) -> Dict[str, float]:
        """One PPO step on this process's prompts: the experience, then the update. Returns its
        metrics, averaged over processes: the same keys in every step of a run."""
        cfg, timer, start = self.cfg, Timer(self.device), time.perf_counter()
        schedule = minibatch_schedule(len(prompts) * cfg.GROUP_SIZE, self.state.global_step, cfg)
        experience, first_pass, moments, metrics = self.make_experience(prompts, schedule, timer)
        finite = torch.isfinite(torch.stack([t.sum() for t in experience.tensors()])).all()
        self.stop_request.check(self.backend)
        nonfinite, trained = self.backend.all_sum(torch.stack([(~finite).float(),
                                                               experience.trained.sum().float()]))
        with timer("update"):
            if nonfinite == 0 and trained > 0:
                metrics.update(self.ppo_update(experience, schedule, first_pass))
            else:
                if nonfinite:
                    logger.warning(f"step {self.state.global_step + 1}: NaN / inf in the scores or "
                                   "advantages (reward model or compute_rewards); the update is "
                                   "skipped.")
                else:
                    logger.info(f"step {self.state.global_step + 1}: the responses of every group "
                                "scored the same (DYNAMIC_SAMPLING): nothing to learn, no update.")
                metrics.update(skipped_update_metrics(optimizer_steps_per_update(schedule),
                                                      experience.values is not None, cfg,
                                                      nothing_to_learn=bool(nonfinite == 0)))
        metrics = self.backend.mean_metrics(metrics)
        self.commit_step(metrics, moments, len(experience) * self.backend.world)
        timer["step"] = time.perf_counter() - start
        generated = self.backend.all_sum(experience.response_mask.sum().float()).item()
        metrics.update({f"time/{name}": seconds for name, seconds in timer.items()})
        metrics["throughput/tokens_per_second"] = generated / timer["step"]
        metrics.update({f"lr/{name}": group["lr"]
                        for name, group in zip(("policy", "critic"), self.optimizer.param_groups)})
        return metrics

    def make_experience(self, prompts: List[str], schedule=None, timer: Optional[Timer] = None
                        ) -> Tuple[Experience, Optional[PolicyPass], Optional[tuple],
                                   Dict[str, torch.Tensor]]:
        """The rollout recipe for this process's prompts, GROUP_SIZE responses each: 1-3 here, 4-6
        in experience_of. Returns the complete experience, the update's first forward when the
        minibatch schedule lets it stand for the old pass (else None: always without a schedule),
        the reward moments to keep, and the rollout's metrics."""
        check = lambda: self.stop_request.check(self.backend)      # noqa: E731
        timer = timer if timer is not None else Timer(self.device)
        self.generated_ids = {}
        with timer("generate"):            # 1. sample, cut each response after its first stop token
            rollout = self.generate_response([p for p in prompts
                                              for _ in range(self.cfg.GROUP_SIZE)])
        check()
        with timer("score"):               # 2-3. score, reference reward, missing-EOS penalty
            scores, moments, metrics = self.score_rollout(rollout)
        check()
        with timer("forward"):
            experience, first_pass, pass_metrics = self.experience_of(rollout, scores, schedule)
        return experience, first_pass, moments, {**metrics, **pass_metrics}

    def generate_response(self, prompts: List[str], max_new_tokens: Optional[int] = None,
                          do_sample: bool = True) -> Rollout:
        """One response per prompt, in batches of BATCH_SIZE * GROUP_SIZE, each cut after its first
        stop token."""
        cfg, pad_id = self.cfg, self.tokenizer.pad_token_id
        self.prepare_prompts(prompts)
        config = self.generation_config(do_sample, max_new_tokens or cfg.MAX_NEW_TOKENS)
        policy = self.policy.eval()    # eval mode: gradient checkpointing would disable the cache
        queries = [self.prompt_ids[p] for p in prompts]
        responses, has_eos = [], []
        for start in range(0, len(prompts), self.chunk):
            query_ids, query_mask = pad(queries[start:start + self.chunk], pad_id, "left")
            with torch.no_grad(), self.backend.autocast():
                out = policy.generate(input_ids=query_ids.to(self.device), generation_config=config,
                                      attention_mask=query_mask.long().to(self.device))
            generated = out[:, query_ids.shape[1]:].cpu()                           # (b, T)
            lengths, has_stop = truncate_at_stop(generated, self.stop_ids)
            responses += [row[:n].tolist() for row, n in zip(generated, lengths.tolist())]
            has_eos += has_stop.tolist()
        policy.train()
        bodies = [r[:-1] if eos else r for r, eos in zip(responses, has_eos)]
        texts = response_texts(self.tokenizer, queries, bodies)
        self.generated_ids.update(zip(zip(prompts, texts), bodies))
        query_ids, query_mask = pad(queries, pad_id, "left")
        response_ids, response_mask = pad(responses, pad_id, "right")
        to = self.device
        return Rollout(list(prompts), query_ids.to(to), query_mask.to(to), response_ids.to(to),
                       response_mask.to(to), texts, torch.tensor(has_eos, device=to))

    def score_rollout(self, rollout: Rollout
                      ) -> Tuple[torch.Tensor, Optional[tuple], Dict[str, torch.Tensor]]:
        """Steps 2-3: score = the weighted sum of the reward terms (reward_terms), normalised,
        clipped, minus MISSING_EOS_PENALTY for responses that never stopped. Returns (scores (B,),
        the running reward moments to keep when REWARD_NORMALIZATION is on (else None), metrics:
        each term's mean and std over all processes as reward/<name>/mean and /std)."""
        cfg = self.cfg
        terms = self.reward_terms(rollout.prompts, rollout.responses)
        scores = sum(weight * terms[name] for name, (_, weight) in self.reward_functions.items())
        correct, has_ref = self.reference_matches(rollout.prompts, rollout.responses)
        count = torch.tensor(float(len(scores)), device=self.device)
        sums = self.backend.all_sum(torch.stack([scores.sum(), (scores ** 2).sum(), count,
                                                 correct.sum(), has_ref.sum().float(),
                                                 *term_sums(terms)]))
        total, total_sq, count, n_correct, n_ref = sums[:5]
        metrics = term_statistics(list(terms), sums[5:], count)
        if self.reward_hook in terms:
            metrics["objective/rm_score"] = terms[self.reward_hook].mean()
        if self.references:    # a per-run key: NaN in a step none of whose prompts has one
            metrics["train/accuracy"] = n_correct / n_ref
        moments = None
        if cfg.REWARD_NORMALIZATION:
            s, mean = self.state, (total / count).item()
            var = max((total_sq / count).item() - mean ** 2, 0.0)
            moments = merge_moments(s.reward_mean, s.reward_var, s.reward_count, mean, var,
                                    int(count.item()))
            scores = (scores - moments[0]) / math.sqrt(moments[1] + 1e-8)
        if cfg.REWARD_CLIP:
            scores = scores.clamp(-cfg.REWARD_CLIP, cfg.REWARD_CLIP)
        scores, overlong = penalised(scores, rollout.has_eos, rollout.response_mask.sum(1), cfg)
        if cfg.OVERLONG_BUFFER:
            metrics["objective/overlong_penalty"] = overlong.mean()
        metrics["objective/score"] = scores.mean()
        return scores, moments, metrics

    def reward_terms(self, prompts: List[str], responses: List[str]) -> Dict[str, torch.Tensor]:
        """Each term of the score by name, unweighted, (B,) float32: compute_rewards (the reward
        model's score by default), the rules of REWARD_FUNCTIONS and the Python reward functions,
        each checked (checked_rewards); the reward model placed once for all of them."""
        references = [self.references.get(p) for p in prompts]
        with placed(self.reward_model, self.device, self.cfg.OFFLOAD_REF_AND_REWARD):
            return {name: (self.rewards_of(prompts, responses) if name == self.reward_hook else
                           torch.tensor(checked_rewards(name, function, prompts, responses,
                                                        references), device=self.device))
                    for name, (function, _) in self.reward_functions.items()}

    def rewards_of(self, prompts: List[str], responses: List[str]) -> torch.Tensor:
        """compute_rewards, checked: (B,) float32 (the caller has placed the reward model)."""
        scores = self.compute_rewards(prompts, responses)
        scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1).to(self.device)
        if len(scores) != len(responses):
            raise TrainingError(f"compute_rewards returned {len(scores)} scores for "
                                f"{len(responses)} responses; it must return one score per "
                                "response.")
        return scores

    def reference_matches(self, prompts: List[str],
                          responses: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(correct (B,) float, has_reference (B,) bool) under ANSWER_MATCH against the dataset's
        outputs."""
        refs = [self.references.get(p) for p in prompts]
        correct = [float(r is not None and answer_matches(text, r, self.cfg.ANSWER_MATCH))
                   for text, r in zip(responses, refs)]
        return (torch.tensor(correct, device=self.device),
                torch.tensor([r is not None for r in refs], device=self.device))

    def experience_of(self, rollout: Rollout, scores: torch.Tensor, schedule=None
                      ) -> Tuple[Experience, Optional[PolicyPass], Dict[str, torch.Tensor]]:
        """Steps 4-6 of the recipe on a scored rollout: (experience, first pass or None,
        metrics)."""
        cfg, mask = self.cfg, rollout.response_mask
        beta = 0.0 if cfg.KL_IN_LOSS else self.state.kl_coef        # KL_IN_LOSS: not in the reward
        ref_logprobs = self.reference_logprobs(rollout)                         # 4. log pi_ref
        if schedule is not None and reuses_first_pass(schedule, len(rollout)):  # 4. pi_old, V_old
            order = schedule[0][0][0]                       # the first micro-batch, in its order
            first_pass = self.forward(rollout.select(order))
            old = first_pass.detached_rows(torch.argsort(order))
        else:
            first_pass, old = None, self.old_pass(rollout)
        advantages, returns, kl, unwhitened = compute_advantages(               # 5-6.
            scores, old.logprobs, ref_logprobs, old.values, mask, beta, cfg, self.backend.all_sum)
        trained = torch.ones(len(rollout), dtype=torch.bool, device=mask.device)
        if cfg.DYNAMIC_SAMPLING:
            trained = ~uninformative_groups(scores, cfg.GROUP_SIZE)
        experience = Experience(rollout.query_ids, rollout.query_mask, rollout.response_ids, mask,
                                rollout.has_eos, scores, old.logprobs, ref_logprobs, old.values,
                                advantages, returns, trained)
        return experience, first_pass, experience_metrics(experience, old.entropy, kl, beta,
                                                          unwhitened, cfg)

    @torch.no_grad()
    def reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """log pi_ref of every response token (B, T), the reference placed once for the whole
        rollout; None without a reference (no KL in the objective)."""
        if self.ref is None:
            return None
        logprobs = torch.zeros(rollout.response_ids.shape, device=self.device)
        offload = self.cfg.OFFLOAD_REF_AND_REWARD
        with placed(self.ref, self.device, offload), self.backend.autocast():
            for idx in torch.arange(len(rollout)).split(self.chunk):
                rows = rollout.select(idx)
                logprobs[idx, :rows.response_ids.shape[1]] = self.ref(
                    *rows.sequences(), rows.response_ids, self.cfg.TEMPERATURE)
        return logprobs

    @torch.no_grad()
    def old_pass(self, rollout: Rollout) -> PolicyPass:
        """log pi_old, entropy and V_old of every response token, micro-batch by micro-batch (B, T)
        each."""
        length = rollout.response_ids.shape[1]
        parts = [self.forward(rollout.select(idx)) for idx in
                 torch.arange(len(rollout)).split(self.chunk)]
        return PolicyPass(*(None if pieces[0] is None else torch.cat(
            [nn.functional.pad(p.float(), (0, length - p.shape[1])) for p in pieces])
            for pieces in zip(*parts)))

    def forward(self, rows: Rows) -> PolicyPass:
        """The trained models over some rows, on the numeric path of the update (with gradients)."""
        ids, attention = rows.sequences()
        with self.backend.autocast():
            return PolicyPass(*self.model(ids, attention, rows.response_ids, self.cfg.TEMPERATURE))

    def ppo_update(self, experience: Experience, schedule=None,
                   first_pass: Optional[PolicyPass] = None) -> Dict[str, torch.Tensor]:
        """GROUP_EPOCHES shuffled passes over the experience, an optimizer step per minibatch (none
        for a minibatch with nothing to train: a stale Adam momentum would move the weights); with
        TARGET_KL, the remaining passes are dropped once the approximate KL of a pass exceeds it."""
        cfg = self.cfg
        schedule = schedule or minibatch_schedule(len(experience), self.state.global_step, cfg)
        totals: Dict[str, torch.Tensor] = {}
        norms, skipped, empty, epochs_done = [], 0, 0, 0
        for minibatches in schedule:
            epoch: Dict[str, torch.Tensor] = {}
            for micro_batches in minibatches:
                sums = self.minibatch_update(experience, micro_batches, first_pass)
                first_pass = None
                if sums is None:
                    norms.append(torch.full((len(self.optimizer.param_groups),), math.nan,
                                            device=self.device))
                    skipped, empty = skipped + 1, empty + 1
                    continue
                epoch = {k: epoch.get(k, 0) + v for k, v in sums.items()}
                step_norms, stepped = self.optimizer_step()
                norms.append(step_norms)
                skipped += not stepped
            totals = {k: totals.get(k, 0) + v for k, v in epoch.items()}
            epochs_done += 1
            if cfg.TARGET_KL:
                kl, tokens = self.backend.all_sum(torch.stack([epoch["approx_kl"],
                                                               epoch["tokens"]]))
                if kl / tokens > cfg.TARGET_KL:
                    break
        return update_metrics(totals, torch.stack(norms), epochs_done, skipped,
                              empty if cfg.DYNAMIC_SAMPLING else None)

    def minibatch_update(self, experience: Experience, micro_batches: List[torch.Tensor],
                         first_pass: Optional[PolicyPass] = None) -> Dict[str, torch.Tensor]:
        """Forward and backward over one minibatch; every loss term is a sum over rows divided by
        its count over the whole minibatch on all processes (loss_counts), so the gradient does not
        depend on how it is split. Returns ppo_loss's statistics summed over the minibatch, or
        None when DYNAMIC_SAMPLING left no row of it to train on any process."""
        batches = [experience.select(idx) for idx in micro_batches]
        counts = self.backend.all_sum(sum(loss_counts(batch, self.cfg) for batch in batches))
        if counts[0] == 0:
            return None
        counts = counts / self.backend.world               # DDP averages gradients over processes
        totals: Dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            last = i == len(micro_batches) - 1
            with self.backend.micro_batch(last):
                current = first_pass if first_pass is not None else self.forward(batch)
                loss, sums = ppo_loss(*current, batch, self.cfg, counts,
                                      self.state.global_step >= self.cfg.VALUE_WARMUP_STEPS)
                self.backend.backward(loss, last)
            first_pass = None
            totals = {k: totals.get(k, 0) + v for k, v in sums.items()}
        return totals

    def optimizer_step(self) -> Tuple[torch.Tensor, bool]:
        """Clip, then step at the scheduled learning rates, or skip a step with a NaN / inf gradient
        (weights, optimizer state and lr schedule untouched). Returns (gradient norms, stepped)."""
        norms, stepped, note = self.backend.step(learning_rates(self.state, self.cfg))
        self.state.optimizer_steps += stepped
        if not stepped:
            logger.warning(f"step {self.state.global_step + 1}: {note}.")
        return norms, stepped

    def commit_step(self, metrics: Dict[str, float], moments: Optional[tuple],
                    n_responses: int) -> None:
        """What a completed step changes in the run state besides the optimizer: reward moments,
        the NaN skip counters (an optimizer step with nothing to train is not one), the adaptive
        KL coefficient."""
        cfg, s = self.cfg, self.state
        if moments is not None:
            s.reward_mean, s.reward_var, s.reward_count = moments
        skipped = (metrics["ppo/skipped_optimizer_steps"] -
                   metrics.get("ppo/empty_minibatches", 0)) > 0
        s.consecutive_skips = s.consecutive_skips + 1 if skipped else 0
        if s.consecutive_skips >= cfg.MAX_CONSECUTIVE_SKIPS:
            raise TrainingError(
                f"{s.consecutive_skips} steps in a row hit a NaN / inf (MAX_CONSECUTIVE_SKIPS = "
                f"{cfg.MAX_CONSECUTIVE_SKIPS}); stopping. The last checkpoint is intact. Try a "
                "lower LEARNING_RATE, MAX_GRAD_NORM = 0.5, or check the reward model's scores.")
        kl = metrics.get("objective/kl", math.nan)
        if not math.isfinite(kl):
            return
        if cfg.ADAPTIVE_KL:
            s.kl_coef = adaptive_kl_coef(s.kl_coef, kl, n_responses, cfg.ADAPTIVE_KL_TARGET,
                                         cfg.ADAPTIVE_KL_HORIZON)
        if kl < -0.1 and cfg.KL_ESTIMATOR == "k1" and not self.warned_negative_kl:
            self.warned_negative_kl = True
            logger.warning(f"Mean KL is negative ({kl:.3f}): responses are not sampled from "
                           "the policy itself (filtered sampling, a changed generate, or a "
                           "temperature mismatch).")

    # -- the guide's hooks -------------------------------------------------------------------------
    def compute_rewards(self, prompts: List[str], responses: List[str]) -> torch.Tensor:
        """One score per response, shape (B,). Override to add terms (the guide's custom reward
        section)."""
        return self.reward_model_scores(prompts, responses)

    def reward_model_score(self, prompt: str, response: str) -> torch.Tensor:
        """The reward model's score of one response (a 0-dim tensor)."""
        return self.reward_model_scores([prompt], [response])[0]

    @torch.no_grad()
    def reward_model_scores(self, prompts: List[str], responses: List[str]) -> torch.Tensor:
        """Batched reward-model scores (B,) of reward_input_ids, read at the last real token."""
        if self.reward_model is None:
            raise TrainingError("There is no reward model (REWARD_MODEL = None), so "
                                "reward_model_score / reward_model_scores cannot score: the "
                                "rewards come from REWARD_FUNCTIONS and reward_functions=[...] "
                                "(logged as reward/<name>), or name a REWARD_MODEL.")
        rows, scores = self.reward_input_ids(prompts, responses), []
        for start in range(0, len(rows), self.chunk):
            ids, mask = pad(rows[start:start + self.chunk], self.reward_tokenizer.pad_token_id,
                            "right")
            with self.backend.autocast():
                scores.append(sequence_scores(self.reward_model, ids.to(self.device),
                                              mask.long().to(self.device)))
        return torch.cat(scores)

    def compute_diversity(self, response: str) -> float:
        """distinct-2 of the response in the policy's tokens: distinct token bigrams / bigrams, in
        [0, 1]; 1 = no bigram repeats, near 0 = a loop ("7 7 7 7"). 0 for a response of fewer
        than 2 tokens (nothing to measure, and no bonus for saying nothing)."""
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        bigrams = list(zip(ids, ids[1:]))
        return len(set(bigrams)) / len(bigrams) if bigrams else 0.0

    @torch.no_grad()
    def evaluate(self, eval_prompts: List[str]) -> Dict[str, float]:
        """Generate for this process's share of eval_prompts (greedy unless EVAL_GREEDY is False)
        and measure, over all processes: the reward (the weighted sum of the reward terms) and each
        term's mean and std, accuracy against references, response length, EOS rate. Override to
        add metrics: eval_metrics["custom_metric"] = ...; logged as eval/<name>;
        self.eval_responses holds the responses (this process's share)."""
        prompts, real = shard(eval_prompts, self.backend.rank, self.backend.world)
        self.generated_ids = {}
        rollout = self.generate_response(prompts, do_sample=not self.cfg.EVAL_GREEDY)
        terms = self.reward_terms(rollout.prompts, rollout.responses)
        reward = sum(weight * terms[name] for name, (_, weight) in self.reward_functions.items())
        correct, has_ref = self.reference_matches(rollout.prompts, rollout.responses)
        counted = (torch.arange(len(prompts), device=self.device) < real).float()   # not padding
        rows = torch.stack([reward, rollout.response_mask.sum(1).float(), rollout.has_eos.float(),
                            correct, has_ref.float(), torch.ones_like(reward)])
        sums = self.backend.all_sum(torch.cat([(rows * counted).sum(1),
                                               term_sums(terms, counted)]))
        self.eval_responses = rollout.responses[:real]
        self.eval_samples = [{"prompt": p, "response": r, "reward": float(s)} for p, r, s in
                             zip(prompts[:real], rollout.responses, reward)
                             ][:self.cfg.NUM_SAMPLES_TO_LOG]
        reward, length, eos, correct, has_ref, count = sums[:6].tolist()
        metrics = {"reward": reward / count, "response_length": length / count,
                   "eos_rate": eos / count}
        if has_ref:
            metrics["accuracy"] = correct / has_ref
        statistics = term_statistics(list(terms), sums[6:], sums[5])
        return {**metrics, **{name: value.item() for name, value in statistics.items()}}

    # -- tokens the hooks rely on ------------------------------------------------------------------
    def prepare_prompts(self, prompts: Sequence[str]) -> None:
        """Tokenize new prompts once (fit_prompts): self.prompt_ids, and what the policy then
        sees for the reward model, self.prompt_texts (as rendered) and self.prompt_contents."""
        new = [p for p in dict.fromkeys(prompts) if p not in self.prompt_ids]
        if not new:
            return
        limit = self.cfg.MAX_PROMPT_LENGTH
        fitted = fit_prompts(self.tokenizer, new, self.cfg.USE_CHAT_TEMPLATE, limit)
        for prompt, (ids, text, content) in zip(new, fitted):
            self.prompt_ids[prompt], self.prompt_texts[prompt] = ids, text
            self.prompt_contents[prompt] = content
        too_long = sum(content != prompt for prompt, (_, _, content) in zip(new, fitted))
        if too_long:
            logger.warning(f"{too_long} of {len(new)} prompts are longer than MAX_PROMPT_LENGTH = "
                           f"{limit} tokens; their content keeps its last tokens (the chat "
                           "template and BOS are kept whole).")

    def generation_config(self, do_sample: bool, max_new_tokens: int):
        """Sampling from the full softmax(logits / T): every filter the model's generation_config
        may set (top-k, top-p, min-p, typical, repetition penalties, minimum length) is
        neutralised."""
        from transformers import GenerationConfig
        sampling = ({"temperature": self.cfg.TEMPERATURE, "top_k": 0, "top_p": 1.0,
                     "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
                     # min_p = 0.0 would still add a no-op warper
                     "min_p": None if self.policy.generation_config.min_p is None else 0.0}
                    if do_sample else {})
        return GenerationConfig(
            do_sample=do_sample, max_new_tokens=max_new_tokens, min_new_tokens=0, num_beams=1,
            repetition_penalty=1.0, no_repeat_ngram_size=0, use_cache=True, **sampling,
            eos_token_id=self.stop_ids.tolist(), pad_token_id=self.tokenizer.pad_token_id,
            bos_token_id=self.tokenizer.bos_token_id)

    def reward_input_ids(self, prompts: List[str], responses: List[str]) -> List[List[int]]:
        """What the reward model reads for each pair, in its tokenizer's ids: the policy's own ids
        of a pair that generate_response wrote, when the reward model shares the policy's tokenizer
        and has no chat template; else its own template with prompt and response as two turns, or
        the text the policy conditioned on followed by what it wrote."""
        tok, rows, texts = self.reward_tokenizer, [], []
        bos = tok.bos_token_id
        adds_bos = bos is not None and self.reward_specials[0][:1] == [bos]
        for p, r in zip(prompts, responses):
            own = self.generated_ids.get((p, r)) if self.reward_reads_policy_ids else None
            if own is not None:
                rows.append(reward_ids_from_policy(self.prompt_ids[p], own, *self.reward_specials,
                                                   self.reward_max_length))
                continue
            rows.append(None)
            if tok.chat_template:        # its own template separates the turns
                texts.append(tok.apply_chat_template(
                    [{"role": "user", "content": self.prompt_contents.get(p, p)},
                     {"role": "assistant", "content": r.lstrip()}], tokenize=False))
            else:                        # the text the policy conditioned on, then what it wrote
                text = self.prompt_texts.get(p, p) + r
                # a template's BOS as text: the tokenizer adds its own
                texts.append(text.removeprefix(tok.bos_token) if adds_bos else text)
        encoded = iter(tok(texts, add_special_tokens=not tok.chat_template,
                           truncation=self.reward_max_length is not None,
                           max_length=self.reward_max_length)["input_ids"] if texts else [])
        return [row if row is not None else next(encoded) for row in rows]


# ---------------------------------------------------------------------------------------------
# 6. PPOTrainer: the training loop: evaluation, early stopping, checkpoints, resume, signals
# ---------------------------------------------------------------------------------------------
class PPOTrainer(PPOStep):
    """PPO-RLHF trainer. Keyword arguments: the constants of section 2 (e.g. BATCH_SIZE=2), and
    resume_from_checkpoint="OUTPUT_DIR/checkpoints/step_N" to continue a run exactly."""

    def train(self, train_prompts: Optional[List[str]] = None,
              eval_prompts: Optional[List[str]] = None) -> str:
        """Train until NUM_EPOCHES, MAX_STEPS or early stopping; without prompts, on TRAIN_DATASETS
        and EVAL_DATASETS. Returns why it stopped."""
        if train_prompts is None:
            train_prompts, eval_prompts, references = load_data(self.cfg)
            self.references.update(references)
        eval_prompts = list(eval_prompts or [])
        check_run_start(self.cfg, self.output_dir, self.checkpoint is not None, eval_prompts)
        self.prepare_prompts(list(train_prompts) + eval_prompts)
        self.plan = make_plan(len(train_prompts), self.cfg, self.backend.world)
        self.state = timed_schedule(self.state, self.plan, self.cfg)
        if self.checkpoint is not None:
            self.abandon_later_run()
        self.files.open(self.state.global_step if self.checkpoint else None)
        with self.stop_request:        # until the files are closed: a launcher's SIGTERM is caught
            try:
                reason = self.run_loop(train_prompts, eval_prompts)
                if self.state.global_step > max(self.saved_step, 0):
                    self.save_checkpoint(final=True)
                self.files.close()
                self.backend.wait()    # no process exits before the main one has closed its files
            except RuntimeError as e:
                if self.backend.world == 1 or not is_peer_failure(e):
                    raise
                self.files.close()
                raise TrainingError(f"Another process of this run died or stopped answering "
                                    f"({first_line(e)}), so this one stops too. The checkpoints "
                                    "are intact: run again to resume from the latest.") from None
        if reason == "interrupted":
            raise TrainingInterrupted(self.stop_request.signum, checkpoint_path(
                self.output_dir, self.state.global_step) if self.state.global_step else None)
        logger.info(f"Training finished ({reason}) at step {self.state.global_step}. "
                    f"Outputs: {self.output_dir}")
        if self.state.best_step >= 0:
            logger.info(best_policy_line(self.state, self.cfg, self.output_dir,
                                         self.last_eval_metric))
        return reason

    def run_loop(self, train_prompts: List[str], eval_prompts: List[str]) -> str:
        """The step-0 evaluation and the loop; returns why it stopped."""
        try:
            if self.state.global_step == 0 and self.state.last_eval_step < 0 and eval_prompts:
                metrics, _, error = self.evaluation(eval_prompts)
                if error:
                    raise error
                self.log_row(metrics)
            return self.train_loop(train_prompts, eval_prompts)
        except StepDropped:
            return "interrupted"

    def train_loop(self, train_prompts: List[str], eval_prompts: List[str]) -> str:
        cfg, plan, backend = self.cfg, self.plan, self.backend
        for epoch in range(self.state.epoch, cfg.NUM_EPOCHES):
            self.state.epoch = epoch
            order = epoch_order(len(train_prompts), cfg.SEED, epoch)
            # the bar counts the steps this run takes in this epoch (MAX_STEPS may end it early)
            steps = min(plan.steps_per_epoch, plan.total_steps - epoch * plan.steps_per_epoch)
            with tqdm(total=steps, initial=math.ceil(self.state.position / plan.prompts_per_step),
                      desc=f"Epoch {epoch + 1}/{cfg.NUM_EPOCHES}", disable=not self.is_main,
                      dynamic_ncols=True, bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} "
                                                     "[{elapsed}<{remaining}]") as bar:
                while self.state.position < len(train_prompts):
                    if self.state.global_step >= plan.total_steps:
                        return "max_steps"
                    batch = step_prompt_indices(order, self.state.position, plan.prompts_per_step)
                    rng = rng_state()
                    try:
                        metrics = self.train_step([train_prompts[i]
                                                   for i in batch[backend.rank::backend.world]])
                    except StepDropped:                  # undo what the dropped step drew
                        set_rng_state(rng)
                        raise
                    self.state.position = min(self.state.position + plan.prompts_per_step,
                                              len(train_prompts))
                    self.state.global_step += 1
                    bar.update(1)
                    reason = self.after_step(metrics, eval_prompts, bar)
                    if reason:
                        return reason
            self.state.epoch, self.state.position = epoch + 1, 0
        return "completed"

    def after_step(self, metrics: Dict[str, float], eval_prompts: List[str], bar) -> Optional[str]:
        """Evaluate, log, save, and decide whether to stop, after PPO step global_step."""
        cfg, step = self.cfg, self.state.global_step
        stopping = self.stop_request.agreed(self.backend)      # the same on every process
        stop, error = False, None
        if eval_prompts and not stopping and (
                step >= self.plan.total_steps or
                (cfg.EVAL_EVERY_N_STEPS and step % cfg.EVAL_EVERY_N_STEPS == 0)):
            eval_metrics, stop, error = self.evaluation(eval_prompts)
            metrics.update(eval_metrics)
        self.log_row(metrics)
        bar.set_description_str(f"Epoch {self.state.epoch + 1}/{cfg.NUM_EPOCHES}: "
                                f"{progress_postfix(metrics)}")
        last = step >= self.plan.total_steps or stop or error or stopping
        if (cfg.SAVE_EVERY_N_STEPS and step % cfg.SAVE_EVERY_N_STEPS == 0) or stop or error:
            self.save_checkpoint(final=last)
        if error:
            raise error
        if stop:
            logger.info(f"Early stopping: {cfg.EARLY_STOPPING_METRIC} has not improved for "
                        f"{self.state.evals_without_improvement} evaluations; "
                        f"best {self.state.best_metric:.4g} at step {self.state.best_step}")
            return "early_stopping"
        return "interrupted" if stopping else None

    # -- evaluations: early stopping, the best policy ----------------------------------------------
    def evaluation(self, eval_prompts: List[str]) -> Tuple[Dict[str, float], bool, Optional[str]]:
        """run_evaluation, then EARLY_STOPPING_METRIC's bookkeeping (the step-0 evaluation too):
        best/ rewritten at an improvement. Returns (metrics, early stop, the error of a metric the
        evaluation does not produce)."""
        metrics = self.run_evaluation(eval_prompts)
        value = metrics.get(self.cfg.EARLY_STOPPING_METRIC)
        if value is None:
            return metrics, False, missing_eval_metric(self.cfg, metrics)
        self.state, improved, stop = track_eval(self.state, value, self.cfg)
        self.last_eval_metric = value
        if improved and self.cfg.SAVE_BEST_POLICY:
            self.save_policy(self.output_dir / "best")
        return metrics, stop, None

    def run_evaluation(self, eval_prompts: List[str]) -> Dict[str, float]:
        """evaluate(), averaged over processes, keys prefixed with eval/, samples logged."""
        start = time.perf_counter()
        self.eval_samples = []
        metrics = self.evaluate(eval_prompts)
        metrics = self.backend.mean_metrics({k if k.startswith("eval/") else f"eval/{k}": v
                                             for k, v in metrics.items()})
        self.state.last_eval_step = self.state.global_step
        summary = " ".join(f"{k[5:]}={v:.4g}" for k, v in metrics.items())
        metrics["time/eval"] = time.perf_counter() - start
        logger.info(f"eval at step {self.state.global_step}: {summary}")
        for sample in self.eval_samples:
            logger.info(f"  prompt: {sample['prompt']!r}\n  response: {sample['response']!r}\n"
                        f"  reward: {sample['reward']:.3f}")
        self.files.samples(self.state.global_step, self.eval_samples)
        return metrics

    def log_row(self, metrics: Dict[str, float]) -> None:
        s = self.state
        epoch = s.epoch + (s.position / self.plan.prompts if self.plan else 0.0)
        self.files.log({"step": s.global_step, "epoch": epoch, **metrics}, s.global_step)

    # -- checkpoints -------------------------------------------------------------------------------
    def abandon_later_run(self) -> None:
        """A resume from an older checkpoint abandons what the run wrote after it: the later
        checkpoints, and a best/ written later, move aside (set_aside_later). best/ then holds this
        run's best again: the resumed policy, or the policy of the best step's checkpoint; when
        neither is on disk the best is tracked afresh."""
        s = self.state
        best_moved = self.backend.from_main(
            set_aside_later(self.output_dir, s.global_step) if self.is_main else None)
        if not best_moved or s.best_step < 0 or not self.cfg.SAVE_BEST_POLICY:
            return
        source = checkpoint_path(self.output_dir, s.best_step)
        if s.best_step == s.global_step:
            self.save_policy(self.output_dir / "best")
        elif (source / "policy").is_dir():
            self.save_policy(self.output_dir / "best", source)
        else:
            logger.warning(f"No checkpoint holds this run's best policy (step {s.best_step}): the "
                           "best is tracked afresh from the next evaluation.")
            s.best_metric, s.best_step, s.evals_without_improvement = None, -1, 0

    def save_policy(self, folder: Path, source: Optional[Path] = None) -> None:
        """best/: the policy (or the one saved in the checkpoint step_N `source`) and tokenizer in
        Hugging Face format, in the model's own dtype (under LoRA merged, or the adapter by
        SAVE_POLICY_AS), with best.json naming its step; written atomically."""
        s, cfg = self.state, self.cfg
        best = {"step": s.best_step, "metric": cfg.EARLY_STOPPING_METRIC, "value": s.best_metric}

        def write(tmp: Path) -> None:
            merged = cfg.SAVE_POLICY_AS == "merged"
            if source is None or uses_adapters(cfg):
                adapter = (source / "policy_adapter" if source is not None else
                           tmp / "adapter" if merged else tmp)
                write_policy(self.policy if source is None else None, self.tokenizer, tmp,
                             adapter, cfg, self.policy_dtype, merged)
            else:
                write_model(load_causal_lm("ACTOR_MODEL", str(source / "policy"), cfg,
                                           self.policy_dtype), self.tokenizer, tmp)
            (tmp / "best.json").write_text(json.dumps(best))
        failure = None
        if self.is_main:
            try:
                write_atomically(folder, write)
            except WRITE_ERRORS as e:
                failure = (f"Could not write {folder}: {why_not_written(e)}. Free space (or fix "
                           "permissions); the checkpoints are intact.")
        failure = self.backend.first_failure(failure)
        if failure:
            raise TrainingError(failure)

    def save_checkpoint(self, final: bool = False) -> Path:
        """OUTPUT_DIR/checkpoints/step_N/{policy/, critic/, training_state.pt, config.json},
        complete or absent (`final`: the run's last); a write that fails fails every process with
        the same error."""
        path = checkpoint_path(self.output_dir, self.state.global_step)
        try:
            write_checkpoint(path, self.state, self.backend, self.cfg, self.policy, self.critic,
                             self.tokenizer, final)
            failure = None
        except TrainingError as e:
            failure = str(e)
        failure = self.backend.first_failure(failure)
        if failure:
            raise TrainingError(failure)
        self.saved_step = self.state.global_step
        if self.is_main:
            rotate_checkpoints(self.output_dir / "checkpoints", self.cfg.SAVE_TOTAL_LIMIT,
                               keep=self.state.best_step if self.state.best_step >= 0 else None)
        self.backend.wait()
        return path


# ---------------------------------------------------------------------------------------------
# 7. Processes: the backend (one process, DDP, fp16, DeepSpeed ZeRO), signals, timing
# ---------------------------------------------------------------------------------------------
def use_cpu(cfg: Config) -> bool:
    """CPU when asked or when there is no GPU (then accelerate's multi-process backend is gloo)."""
    return cfg.DEVICE == "cpu" or not torch.cuda.is_available()


def use_deepspeed() -> bool:
    """Launched by `accelerate launch --config_file configs/deepspeed_zero2.yaml` (or another
    DeepSpeed config)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def process_state(cfg: Config):
    """accelerate's per-process state, created once (the Accelerator reuses it). accelerate would
    run DeepSpeed on CPUs as one process per rank, so DeepSpeed without a GPU (the tests) gets gloo
    explicitly."""
    from accelerate import PartialState
    # else an installed DeepSpeed, imported by accelerate, prints that it found no GPU
    if use_cpu(cfg):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    timeout = datetime.timedelta(seconds=cfg.DISTRIBUTED_TIMEOUT)
    if use_deepspeed() and use_cpu(cfg):
        return PartialState(backend="gloo", timeout=timeout)
    return PartialState(cpu=use_cpu(cfg), timeout=timeout)


def is_peer_failure(error: BaseException) -> bool:
    """Whether an error says that another process of the run died or stopped answering: gloo's
    closed connection, NCCL's errors, the process group's timeout."""
    import torch.distributed as dist
    words = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL",
             "timed out", "Timed out")
    return isinstance(error, getattr(dist, "DistError", ())) or (
        isinstance(error, RuntimeError) and any(w in str(error) for w in words))


def resolve_mixed_precision(cfg: Config) -> str:
    if cfg.MIXED_PRECISION != "auto":
        return cfg.MIXED_PRECISION
    on_gpu = cfg.DEVICE != "cpu" and torch.cuda.is_available()
    return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"


class Backend:
    """How a loss becomes an optimizer step, and how values combine across processes, for one
    process or DDP through accelerate (with fp16's loss scaler); DeepSpeedBackend replaces what
    DeepSpeed does itself. The training step calls these and never asks which one it runs on."""

    def __init__(self, cfg: Config):
        from accelerate import Accelerator
        process_state(cfg)
        self.cfg = cfg
        self.accelerator = Accelerator(cpu=use_cpu(cfg) and not use_deepspeed(),
                                       mixed_precision=resolve_mixed_precision(cfg))
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main, self.device = self.accelerator.is_main_process, self.accelerator.device
        self.mixed_precision = self.accelerator.mixed_precision
        self.model = self.optimizer = None

    @staticmethod
    def create(cfg: Config) -> "Backend":
        return DeepSpeedBackend(cfg) if use_deepspeed() else Backend(cfg)

    def prepare(self, model: nn.Module, optimizer):
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # accelerate wraps the forward to return float32 outputs under mixed precision: the update
        # would keep an fp32 copy of the (B, T, V) logits and its gradient. Every call enters
        # autocast itself, so the plain forward is kept.
        self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        return self.model, self.optimizer

    def autocast(self):
        return self.accelerator.autocast()

    def micro_batch(self, last: bool):
        """DDP all-reduces the gradients in the backward of a minibatch's last micro-batch only."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.accelerator.backward(loss)

    def step(self, learning_rates: Sequence[float]) -> Tuple[torch.Tensor, bool, str]:
        """Clip each model's gradient norm, then step; skip (weights and optimizer state untouched)
        when a gradient is NaN / inf. Returns (gradient norms (models,), stepped, what a skip
        did)."""
        self.accelerator.unscale_gradients()
        groups = self.optimizer.param_groups
        norms = torch.stack([torch.nn.utils.clip_grad_norm_(g["params"], self.cfg.MAX_GRAD_NORM)
                             for g in groups])
        stepped = bool(torch.isfinite(norms).all())
        note = (f"non-finite gradient (norms {norms.tolist()}); optimizer step skipped, "
                "weights unchanged")
        if stepped:
            for group, lr in zip(groups, learning_rates):
                group["lr"] = lr
                if lr == 0:             # a frozen model (VALUE_WARMUP_STEPS): AdamW skips it whole
                    for p in group["params"]:
                        p.grad = None
            self.optimizer.step()
        # fp16: back off the loss scale as GradScaler's skip does
        elif self.accelerator.scaler is not None:
            self.accelerator.scaler.update()
            note += f"; fp16 loss scale lowered to {self.accelerator.scaler.get_scale():g}"
        self.optimizer.zero_grad(set_to_none=True)
        return norms, stepped, note

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, "sum") if self.world > 1 else tensor

    def mean_metrics(self, metrics: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """Every metric averaged over the processes that have a finite value of it (NaN where none
        has), in one transfer to the host. The names are agreed first, so a key one process lacks is
        a NaN there, never a misaligned average."""
        names = sorted(metrics)
        if self.world > 1:
            names = sorted(set().union(*gather_object([names])))
        values = torch.stack([torch.as_tensor(metrics.get(k, math.nan), dtype=torch.float64,
                                              device=self.device).reshape(()) for k in names])
        if self.world > 1:
            finite = torch.isfinite(values)
            total, count = self.all_sum(torch.stack([torch.where(finite, values, 0.0),
                                                     finite.double()]))
            values = total / count
        return dict(zip(names, values.tolist()))

    def from_main(self, value):
        """The main process's value, on every process."""
        if self.world > 1:
            box = [value]
            broadcast_object_list(box)
            value = box[0]
        return value

    def gather_rng(self) -> List[dict]:
        return gather_object([rng_state()]) if self.world > 1 else [rng_state()]

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def first_failure(self, failure: Optional[str]) -> Optional[str]:
        """The first process's failure message (or None), on every process: a write that failed
        on one process fails the run on all of them, with the same message."""
        failures = gather_object([failure]) if self.world > 1 else [failure]
        return next((f for f in failures if f is not None), None)

    def optimizer_state(self) -> Optional[dict]:
        return self.optimizer.state_dict()

    def save_optimizer_parts(self, path: Path) -> List[Path]:
        return []

    def load_optimizer(self, checkpoint: Path, saved: dict) -> None:
        if saved["optimizer"] is None:
            raise TrainingError(f"{checkpoint} was written under DeepSpeed: resume it with the "
                                "same `accelerate launch --config_file ...` command.")
        self.optimizer.load_state_dict(saved["optimizer"])
        if saved.get("scaler") and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(saved["scaler"])


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO through accelerate: ppo.py's constants decide its batch, accumulation and
    clipping (its config's values are replaced); ppo.py marks the accumulation boundary itself and
    sets the learning rates before each step; each process holds (and checkpoints) its part of the
    optimizer."""

    def prepare(self, model: nn.Module, optimizer):
        cfg, plugin = self.cfg, self.accelerator.state.deepspeed_plugin
        micro = cfg.BATCH_SIZE * cfg.GROUP_SIZE
        plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=micro,
            gradient_accumulation_steps=cfg.GRADIENT_ACCUMULATION_STEPS,
            train_batch_size=micro * cfg.GRADIENT_ACCUMULATION_STEPS * self.world,
            gradient_clipping=cfg.MAX_GRAD_NORM)
        plugin.deepspeed_config.pop("scheduler", None)
        logger.info(f"DeepSpeed ZeRO stage {plugin.zero_stage}: optimizer state split over "
                    f"{self.world} processes; MAX_GRAD_NORM clips the joint norm of both models")
        return super().prepare(model, optimizer)

    def micro_batch(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # the loss is already normalised over the minibatch: no division by the accumulation steps
        self.model.set_gradient_accumulation_boundary(last)
        self.model.backward(loss, scale_wrt_gas=False)

    def step(self, learning_rates: Sequence[float]) -> Tuple[torch.Tensor, bool, str]:
        """DeepSpeed clips the joint gradient norm, steps and zeroes the gradients; it skips a step
        whose gradients overflow. Its joint norm stands for each model's norm."""
        for group, lr in zip(self.optimizer.param_groups, learning_rates):
            group["lr"] = lr
        self.model.step()
        norm = self.model.get_global_grad_norm()
        norm = float(math.nan if norm is None else norm)
        norms = torch.full((len(self.optimizer.param_groups),), norm, device=self.device)
        return norms, bool(self.model.was_step_applied()), f"non-finite gradient (norm {norm}); " \
            "DeepSpeed skipped the optimizer step"

    def optimizer_state(self) -> Optional[dict]:
        return None

    def save_optimizer_parts(self, path: Path) -> List[Path]:
        """Each process writes its part beside the checkpoint-to-be; the main process moves them all
        in."""
        zero = self.model.optimizer
        parts = [path.parent / f".tmp_{path.name}__optimizer_rank_{r}.pt"
                 for r in range(self.world)]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"base": zero.optimizer.state_dict(),
                        "fp32": list(zero.single_partition_of_fp32_groups)}, parts[self.rank])
            failure = None
        except WRITE_ERRORS as e:
            failure = (f"Could not write {parts[self.rank]}: {why_not_written(e)}. Free space (or "
                       "fix permissions); the previous checkpoints are intact.")
        failure = self.first_failure(failure)
        if failure:
            raise TrainingError(failure)
        return parts

    def load_optimizer(self, checkpoint: Path, saved: dict) -> None:
        saved_world = len(list(checkpoint.glob("optimizer_rank_*.pt")))
        if saved_world != self.world:
            raise TrainingError(f"{checkpoint} holds the DeepSpeed optimizer state of "
                                f"{saved_world} process(es), this run has {self.world}: resume it "
                                f"with --num_processes {saved_world or 'N'} "
                                "and the same DeepSpeed config.")
        part = torch.load(checkpoint / f"optimizer_rank_{self.rank}.pt", map_location="cpu",
                          weights_only=True)
        zero = self.model.optimizer
        zero.optimizer.load_state_dict(part["base"])
        for mine, theirs in zip(zero.single_partition_of_fp32_groups, part["fp32"]):
            mine.data.copy_(theirs)


class TrainingError(Exception):
    """The run cannot go on (repeated NaN, bad output of an override): one message, exit 1."""


class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM: a checkpoint of the last completed step was written."""

    def __init__(self, signum: int, checkpoint: Optional[Path]):
        super().__init__(signum, checkpoint)
        self.signum, self.checkpoint = signum, checkpoint


class StepDropped(Exception):
    """A signal arrived before the update of the step in flight began: the step is dropped."""


class StopRequest:
    """SIGINT / SIGTERM while training: the first finishes (or drops) the step in flight, then the
    run saves and exits; a second exits at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.previous: dict = {}

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning(f"Received {signal.Signals(signum).name}: stopping after the step in flight "
                       "and saving a checkpoint. Press Ctrl-C again to exit at once (no checkpoint "
                       "of this step).")

    def __enter__(self):
        threading = sys.modules["threading"]
        # signals reach the main thread only
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle)
                             for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def agreed(self, backend: "Backend") -> bool:
        """Whether a signal arrived on any process: every process gets the same answer, so none
        takes a branch the others do not (a signal may reach one process only: a preempted node, a
        killed worker)."""
        received = torch.tensor(float(self.signum is not None), device=backend.device)
        return bool(backend.all_sum(received) > 0)

    def check(self, backend: "Backend") -> None:
        """Drop the step in flight when a signal arrived on any process."""
        if self.agreed(backend):
            raise StepDropped()


class Timer(dict):
    """Seconds per phase of one step: `with timer("generate"): ...` (waits for the GPU to
    finish)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self[name] = self.get(name, 0.0) + time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# 8. Tokens and text: prompts in, responses out, what the reward model reads; answer rules
# ---------------------------------------------------------------------------------------------
def encode_prompts(tokenizer, contents: List[str],
                   use_template: bool) -> List[Tuple[List[int], str]]:
    """(token ids, text) the policy conditions on for each prompt content: inside its chat template
    (which writes any BOS itself), or after the BOS the tokenizer adds."""
    if not (use_template and tokenizer.chat_template):
        return list(zip(tokenizer(contents, add_special_tokens=True)["input_ids"], contents))
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                           add_generation_prompt=True) for c in contents]
    return list(zip(tokenizer(texts, add_special_tokens=False)["input_ids"], texts))


def response_texts(tokenizer, prompt_ids: List[List[int]],
                   response_ids: List[List[int]]) -> List[str]:
    """Each response decoded after its prompt and cut off that prompt's own decode: the boundary
    keeps the space the tokenizer puts there (SentencePiece and word-level decoders drop a first
    token's leading space when a response is decoded alone, which glued "was" + "very" into
    "wasvery")."""
    def decode(ids):
        return tokenizer.batch_decode(ids, skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False)
    prompts = decode(prompt_ids)
    joint = decode([list(p) + list(r) for p, r in zip(prompt_ids, response_ids)])
    texts = [j[len(p):] if j.startswith(p) else None for p, j in zip(prompts, joint)]
    alone = decode([r for r, text in zip(response_ids, texts) if text is None])
    return [text if text is not None else alone.pop(0) for text in texts]


TOKENIZER_PROBES = ("Hello world", " a leading space,  two spaces",
                    "What is 3 + 4?\nThe answer is 7.", "naïve café, 日本語, 🙂", "x\t\ty  \n\nz")


def shares_tokenizer(policy_tokenizer, reward_tokenizer) -> bool:
    """Whether the reward model's tokenizer is the policy's in effect: the same vocabulary and the
    same ids for the same texts (a path or a class name proves nothing)."""
    if policy_tokenizer.get_vocab() != reward_tokenizer.get_vocab():
        return False
    return all(policy_tokenizer(text, add_special_tokens=False)["input_ids"] ==
               reward_tokenizer(text, add_special_tokens=False)["input_ids"]
               for text in TOKENIZER_PROBES)


def special_tokens_around(tokenizer) -> Tuple[List[int], List[int]]:
    """The ids a tokenizer's post-processor puts before and after a text (BOS, EOS, ...)."""
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    return [], []


def reward_ids_from_policy(prompt_ids: List[int], response_ids: List[int], prefix: List[int],
                           suffix: List[int], limit: Optional[int]) -> List[int]:
    """A reward model's input made of the policy's own ids: the reward tokenizer's special tokens
    around prompt + response (a BOS the prompt starts with is not doubled), the content cut from
    the left to fit `limit`, as the tokenizer truncates text."""
    content = list(prompt_ids) + list(response_ids)
    if prefix and content[:len(prefix)] == prefix:
        content = content[len(prefix):]
    if limit is not None:
        content = content[max(0, len(content) - max(1, limit - len(prefix) - len(suffix))):]
    return list(prefix) + content + list(suffix)


def reward_input_plan(policy_tokenizer, tokenizer, model: Optional[nn.Module]
                      ) -> Tuple[Optional[int], bool, Tuple[List[int], List[int]]]:
    """How the reward model reads a pair (nothing without one): (its longest input, whether it
    reads the policy's own ids, its tokenizer's special tokens around a text). A reward model
    without a chat template and with the policy's tokenizer reads the ids the policy sampled: no
    decode and re-encode, which may merge or split tokens differently."""
    if model is None:
        return None, False, ([], [])
    reads_ids = not tokenizer.chat_template and shares_tokenizer(policy_tokenizer, tokenizer)
    if reads_ids:
        logger.info("The reward model has the policy's tokenizer and no chat template: it reads "
                    "the policy's own token ids of prompt and response.")
    return reward_input_limit(tokenizer, model), reads_ids, special_tokens_around(tokenizer)


def reward_plan(cfg, functions: Sequence, hook: Optional[str]
                ) -> Dict[str, Tuple[Optional[object], float]]:
    """The terms of the score, name -> (reward function, weight): `hook` is the guide's
    compute_rewards (the reward model's score, or an override), weight 1; then the rules of
    REWARD_FUNCTIONS (REFERENCE_REWARD is the "answer" rule's weight), then the Python functions
    of PPOTrainer(reward_functions=[f, (g, 0.5)]), each function(prompts, responses, references)
    -> one number per response."""
    terms: Dict[str, Tuple[Optional[object], float]] = {hook: (None, 1.0)} if hook else {}
    rules = {**cfg.REWARD_FUNCTIONS, **({"answer": cfg.REFERENCE_REWARD}
                                         if cfg.REFERENCE_REWARD else {})}
    terms.update({name: (rule_reward(name, cfg), float(w)) for name, w in rules.items()})
    for entry in functions:
        function, weight = entry if isinstance(entry, tuple) else (entry, 1.0)
        name = getattr(function, "__name__", type(function).__name__)
        if (not callable(function) or name in terms or isinstance(weight, bool)
                or not isinstance(weight, (int, float))):
            raise ConfigError(f"reward_functions: {entry!r} must be a function, or (function, "
                              "weight), whose name is not taken (by: "
                              f"{', '.join(terms) or 'nothing'}).")
        terms[name] = (function, float(weight))
    if not terms:
        raise ConfigError("Nothing gives a reward: REWARD_MODEL = None, REWARD_FUNCTIONS is empty "
                          "and no reward_functions=[...] were given. Name a reward model, a rule "
                          '(REWARD_FUNCTIONS = {"answer": 1.0}) or a function.')
    return terms


def reward_input_limit(tokenizer, model: nn.Module) -> Optional[int]:
    """The longest input the reward model takes (learned positions end there); None when
    unbounded."""
    config = model.config
    limits = [getattr(config, "max_position_embeddings", None) or
              getattr(config, "n_positions", None),
              tokenizer.model_max_length if tokenizer.model_max_length < 1e9 else None]
    limits = [n for n in limits if n]
    return min(limits) if limits else None


def fit_prompts(tokenizer, prompts: List[str], use_template: bool,
                limit: int) -> List[Tuple[List[int], str, str]]:
    """(ids, text, content) the policy conditions on for each prompt: its content inside the chat
    template (or after the tokenizer's BOS); a prompt longer than `limit` tokens keeps the end of
    its content, so BOS and the template's header survive."""
    fitted = []
    for prompt, (ids, text) in zip(prompts, encode_prompts(tokenizer, prompts, use_template)):
        content = prompt
        if len(ids) > limit:
            content_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            keep = len(content_ids) - (len(ids) - limit)      # the template's tokens stay
            # re-encoding may merge differently
            while len(ids) > limit and keep > 0:
                content = tokenizer.decode(content_ids[-keep:], skip_special_tokens=True)
                (ids, text), keep = encode_prompts(tokenizer, [content], use_template)[0], keep - 1
            if len(ids) > limit:
                raise ConfigError(f"MAX_PROMPT_LENGTH = {limit} leaves no room for a prompt: the "
                                  f"chat template and special tokens alone take {len(ids)} tokens.")
        fitted.append((ids, text, content))
    return fitted


def template_turn_end(tokenizer) -> Optional[int]:
    """The special token the chat template writes right after an assistant's message (<|im_end|>,
    <|eot_id|>, <end_of_turn>, ...), or None: a base model with a chat template may have another
    EOS."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"},
                                              {"role": "assistant", "content": "y"}],
                                             tokenize=False)
    except Exception:                                # a template that refuses this conversation
        return None
    tail = tokenizer(text[text.rfind("y") + 1:], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items()
                                                 if t.special}
    return next((i for i in tail if i in special), None)


def check_generation_prompt(tokenizer) -> None:
    """USE_CHAT_TEMPLATE needs a template that ends the user's turn: with a generation prompt
    (ChatML, Llama-3) or a closing marker ([/INST] of Llama-2 / Mistral); one that leaves the user's
    text open would have the policy continue the user's turn."""
    messages = [{"role": "user", "content": "ZQXJ"}]
    with_prompt = tokenizer.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=True)
    closed = with_prompt[with_prompt.rfind("ZQXJ") + 4:].strip()
    if with_prompt == tokenizer.apply_chat_template(messages, tokenize=False) and not closed:
        raise ConfigError("ACTOR_MODEL's chat template neither opens the assistant's turn "
                          "(add_generation_prompt changes nothing) nor closes the user's, so "
                          "responses would continue the user's text. Use a template that does, or "
                          "set USE_CHAT_TEMPLATE = False.")


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> Optional[float]:
    numbers = NUMBER.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")


def boxed(text: str) -> Optional[str]:
    """The content of the last \\boxed{...} in a text (one level of nested braces), or None."""
    found = BOXED.findall(text)
    return found[-1].strip() if found else None


def same_answer(got: Optional[str], expected: Optional[str]) -> bool:
    """Two answers agree: as numbers when both are numbers, else as text without spaces."""
    if got is None or expected is None:
        return False
    if NUMBER.fullmatch(got.strip()) and NUMBER.fullmatch(expected.strip()):
        return last_number(got) == last_number(expected)
    return "".join(got.split()) == "".join(expected.split())


ANSWER_RULES = {  # ANSWER_MATCH: (response, the dataset's reference) -> whether the answer is right
    # the last numbers agree (GSM8K's "#### 72" and "... the answer is 72." match)
    "last_number": lambda response, reference: (
        last_number(response) is not None and last_number(response) == last_number(reference)),
    # MATH's convention: the last \\boxed{} of the response against the reference's (or all of it)
    "boxed": lambda response, reference: same_answer(boxed(response),
                                                     boxed(reference) or reference.strip()),
    "exact": lambda response, reference: response.split() == reference.split(),  # up to spaces
    "contains": lambda response, reference: reference.strip() in response,
}


def answer_matches(response: str, reference: str, rule: str) -> bool:
    """The accuracy / reference-reward rule ANSWER_RULES[rule]."""
    return ANSWER_RULES[rule](response, reference)


def rule_reward(name: str, cfg):
    """A rule of RULE_REWARDS as a reward function: (prompts, responses, references) -> values."""
    rule = RULE_REWARDS[name]
    return lambda prompts, responses, references: [
        rule(response, reference, cfg) for response, reference in zip(responses, references)]


def checked_rewards(name: str, function, prompts: List[str], responses: List[str],
                    references: List[Optional[str]]) -> List[float]:
    """A reward function's values for a batch: one finite number per response. An exception, a
    wrong length, a NaN or a non-number is one TrainingError that names the function and the
    prompt (found by calling the function on one pair at a time when it raised)."""
    def fail(problem: str, prompt: str) -> TrainingError:
        return TrainingError(f"Reward function {name!r} {problem} for the prompt {prompt!r}; it "
                             "must return one finite number per response: function(prompts, "
                             "responses, references) -> a list of floats.")
    try:
        values = function(prompts, responses, references)
    except Exception as e:
        for pair in zip(prompts, responses, references):
            try:
                function(*([part] for part in pair))
            except Exception as single:
                raise fail(f"raised {first_line(single)}", pair[0]) from e
        raise fail(f"raised {first_line(e)} (on the whole batch)", prompts[0]) from e
    values = values.tolist() if hasattr(values, "tolist") else values
    if not isinstance(values, (list, tuple)) or len(values) != len(responses):
        size = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise fail(f"returned {size} values for {len(responses)} responses", prompts[0])
    for prompt, value in zip(prompts, values):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"returned {value!r} ({type(value).__name__}), not a number", prompt)
        if not math.isfinite(value):
            raise fail(f"returned {value}", prompt)
    return [float(v) for v in values]


RULE_REWARDS = {  # REWARD_FUNCTIONS: (response, its prompt's reference or None, settings) -> 1 or 0
    "answer": lambda response, reference, cfg: float(   # the answer is right (ANSWER_MATCH)
        reference is not None and answer_matches(response, reference, cfg.ANSWER_MATCH)),
    "format": lambda response, reference, cfg: float(   # FORMAT_PATTERN is found in it
        re.search(cfg.FORMAT_PATTERN, response) is not None),
    "number": lambda response, reference, cfg: float(last_number(response) is not None),
}


# ---------------------------------------------------------------------------------------------
# 9. Run bookkeeping: learning-rate schedules, evaluations, random state
# ---------------------------------------------------------------------------------------------
def learning_rates(state, cfg) -> Tuple[float, float]:
    """Policy and critic learning rates at the state's optimizer step: schedule (over the state's
    horizon) x plateau scale x base; the policy's is 0 in the first VALUE_WARMUP_STEPS PPO steps
    (the backend then takes no step for it: its optimizer state stays as it was)."""
    schedule = (lr_factor(state.optimizer_steps, state.lr_horizon, cfg.WARMUP_STEPS,
                          cfg.LR_SCHEDULER_TYPE, state.lr_restart, state.lr_restart_factor)
                if cfg.USE_LR_SCHEDULER else 1.0)
    factor = schedule * state.lr_scale
    policy = float(state.global_step >= cfg.VALUE_WARMUP_STEPS)
    return cfg.LEARNING_RATE * factor * policy, cfg.CRITIC_LEARNING_RATE * factor


LR_SCHEDULES = {  # LR_SCHEDULER_TYPE: progress in [0, 1] after warmup -> factor of the base rate
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "linear": lambda progress: 1.0 - progress,
    "constant": lambda progress: 1.0,
    "plateau": lambda progress: 1.0,            # scaled on evaluation instead (track_eval)
}


def lr_factor(step: int, total_steps: float, warmup_steps: int, kind: str, restart: int = 0,
              restart_factor: float = 1.0) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warmup, then the
    schedule LR_SCHEDULES[kind] until total_steps (inf: no end, so no decay). A schedule re-timed
    at optimizer step `restart` goes on from restart_factor there, over what is left."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    start = max(warmup_steps, restart)
    progress = min(1.0, (step - start) / max(1, total_steps - start))
    return restart_factor * LR_SCHEDULES[kind](progress)


def timed_schedule(state, plan, cfg) -> "TrainState":
    """The state with its learning-rate horizon set to the plan's optimizer steps, as a run starts.
    A resumed run whose plan has another length (MAX_STEPS, NUM_EPOCHES or the data changed)
    re-times what is left of its schedule: from the factor it reached, over the optimizer steps
    left, so the rate never jumps back up (the second audit's N6)."""
    s = dataclasses.replace(state)
    if s.lr_horizon == plan.optimizer_steps:
        return s
    if math.isfinite(s.lr_horizon) and cfg.USE_LR_SCHEDULER:
        s.lr_restart = max(s.optimizer_steps, cfg.WARMUP_STEPS)
        s.lr_restart_factor = lr_factor(s.lr_restart, s.lr_horizon, cfg.WARMUP_STEPS,
                                        cfg.LR_SCHEDULER_TYPE, state.lr_restart,
                                        state.lr_restart_factor)
        logger.warning(f"The run now plans {plan.optimizer_steps} optimizer steps instead of "
                       f"{int(s.lr_horizon)} (MAX_STEPS, NUM_EPOCHES or the data changed): the "
                       f"learning-rate schedule is re-timed, from {s.lr_restart_factor:.3g} x the "
                       f"base rate at optimizer step {s.lr_restart} to its end at step "
                       f"{plan.optimizer_steps}. To train on at the base rate instead, resume "
                       "with USE_LR_SCHEDULER = False.")
    s.lr_horizon = plan.optimizer_steps
    return s


def eval_metric_in_use(cfg: Config) -> bool:
    """EARLY_STOPPING_METRIC drives early stopping, or the "plateau" learning-rate schedule."""
    return bool(cfg.EARLY_STOPPING_PATIENCE) or (cfg.USE_LR_SCHEDULER and
                                                 cfg.LR_SCHEDULER_TYPE == "plateau")


def missing_eval_metric(cfg: Config, metrics: Dict[str, float]) -> Optional[ConfigError]:
    """The error for an EARLY_STOPPING_METRIC that the evaluation does not produce (even while
    nothing uses it: a name that is never there is a typo, better caught before it is switched
    on)."""
    if cfg.EARLY_STOPPING_METRIC in metrics:
        return None
    return ConfigError(f"EARLY_STOPPING_METRIC = {cfg.EARLY_STOPPING_METRIC!r} is not an "
                       "evaluation metric; "
                       f"available: {sorted(k for k in metrics if k.startswith('eval/'))}.")


def track_eval(state: TrainState, value: float, cfg: Config) -> Tuple[TrainState, bool, bool]:
    """Early stopping and the "plateau" schedule after an evaluation whose EARLY_STOPPING_METRIC is
    value (higher is better): (new state, improved, stop)."""
    s = dataclasses.replace(state)
    improved = s.best_metric is None or value > s.best_metric + cfg.EARLY_STOPPING_MIN_DELTA
    if improved:
        s.best_metric, s.best_step, s.evals_without_improvement, s.plateau_bad_evals = (
            value, s.global_step, 0, 0)
    else:
        s.evals_without_improvement += 1
        s.plateau_bad_evals += 1
    if (cfg.USE_LR_SCHEDULER and cfg.LR_SCHEDULER_TYPE == "plateau" and
            s.plateau_bad_evals >= cfg.PLATEAU_PATIENCE):
        s.lr_scale *= cfg.PLATEAU_FACTOR
        s.plateau_bad_evals = 0
        logger.info(f"{cfg.EARLY_STOPPING_METRIC} has not improved for {cfg.PLATEAU_PATIENCE} "
                    f"evaluations: learning rates x {cfg.PLATEAU_FACTOR} "
                    f"(now x {s.lr_scale:.4g} of the base)")
    stop = (bool(cfg.EARLY_STOPPING_PATIENCE) and
            s.evals_without_improvement >= cfg.EARLY_STOPPING_PATIENCE)
    return s, improved, stop


def rng_state() -> dict:
    """Python, NumPy and torch generator states, as types torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def epoch_order(n: int, seed: int, epoch: int) -> List[int]:
    """The order of the training prompts in an epoch: the same on every process and after a
    resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


# ---------------------------------------------------------------------------------------------
# 10. Configuration loading and checks: constants < JSON/YAML file < --NAME=value < PPOTrainer(**kw)
# ---------------------------------------------------------------------------------------------
CHOICES = {  # the string settings: the names of their tables, or the values the backend knows
    "LR_SCHEDULER_TYPE": tuple(LR_SCHEDULES), "KL_ESTIMATOR": tuple(KL_ESTIMATORS),
    "POLICY_LOSS": tuple(POLICY_LOSSES), "LOSS_AGGREGATION": tuple(LOSS_AGGREGATIONS),
    "ANSWER_MATCH": tuple(ANSWER_RULES), "ADVANTAGE_ESTIMATOR": tuple(ADVANTAGE_ESTIMATORS),
    "DEVICE": ("auto", "cpu"), "MIXED_PRECISION": ("auto", "bf16", "fp16", "no"),
    "BASE_COMPUTE_DTYPE": ("auto", "bfloat16", "float16", "float32"),
    "SAVE_POLICY_AS": ("merged", "adapter"),
}
MODEL_KEYS = ("ACTOR_MODEL", "CRITIC_MODEL", "REWARD_MODEL")
STRUCTURE_KEYS = MODEL_KEYS + ("ADVANTAGE_ESTIMATOR", "USE_LORA", "LORA_R", "LORA_TARGET_MODULES",
                              "SHARED_BASE")


class ConfigError(Exception):
    """A mistake in the user's settings or files: printed as one message, no traceback, exit 2."""


class Config(dict):
    """The resolved settings: a dict of the UPPER_CASE names, also readable as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def default_config() -> Config:
    """The constants of section 2 as they are now (a test or an edited file may have changed
    them)."""
    return Config({name: copy.deepcopy(globals()[name]) for name in CONFIG_KEYS})


def first_line(error: BaseException) -> str:
    """`TypeName: first line of the message` (some exceptions carry no message at all)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def unknown_name_error(name: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(name.upper(), CONFIG_KEYS, n=1, cutoff=0.5)
    hint = (f" Did you mean {close[0]}?" if close
            else " The settings are the UPPER_CASE constants of ppo.py.")
    return ConfigError(f"Unknown setting {name!r} in {where}.{hint}")


def coerce_setting(name: str, value, where: str):
    """Check `value` against the type of the constant; an int may stand for a float."""
    default = globals()[name]
    if value is None or default is None:
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, type(default)) and (isinstance(value, bool) == isinstance(default, bool)):
        return value
    raise ConfigError(f"{name} in {where} must be a {type(default).__name__} like {default!r}, "
                      f"got {value!r} ({type(value).__name__}).")


def parse_flag_value(text: str):
    """`--NAME=value`: JSON (numbers, true/false/null, lists, objects), Python's True/False/None,
    else a string."""
    literal = {"True": True, "False": False, "None": None}
    if text in literal:
        return literal[text]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def read_config_file(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}, line {e.lineno}, column {e.colno}: "
                          f"invalid JSON ({e.msg}).") from None
    except Exception as e:  # yaml.YAMLError carries its own line and column in the message
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold one object of NAME: value pairs.")
    return data


def make_config(overrides: Optional[dict] = None, where: str = "PPOTrainer(...)",
                base=None) -> Config:
    cfg = default_config() if base is None else Config(base)
    for name, value in (overrides or {}).items():
        if name not in CONFIG_KEYS:
            raise unknown_name_error(name, where)
        cfg[name] = coerce_setting(name, value, where)
    return cfg


def parse_args(argv: Sequence[str]) -> Config:
    """Turn `[run.json|run.yaml] [--NAME=value ...]` into settings; flags win over the file."""
    cfg = default_config()
    for arg in argv:
        if arg.startswith("--"):
            name, eq, text = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"Flag {arg!r} needs a value: --{name}=VALUE.")
            cfg = make_config({name: parse_flag_value(text)}, f"flag {arg}", cfg)
        else:
            cfg = make_config(read_config_file(arg), arg, cfg)
    return cfg


POSITIVE, NON_NEGATIVE, UNIT = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, ">= 0"), (
    lambda v: 0 <= v <= 1, "in [0, 1]")
OPTIONAL_CLIP = (lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                         and v > 0), "a number > 0, or None for CLIP_RANGE")
BOUNDS = {  # each setting's own range: NAME -> (whether a value is in it, the range in words)
    **dict.fromkeys(("BATCH_SIZE", "GRADIENT_ACCUMULATION_STEPS", "NUM_MINI_BATCHES", "GROUP_SIZE",
                     "NUM_EPOCHES", "GROUP_EPOCHES", "MAX_NEW_TOKENS", "MAX_PROMPT_LENGTH",
                     "LEARNING_RATE", "CRITIC_LEARNING_RATE", "TEMPERATURE", "CLIP_RANGE",
                     "CLIP_RANGE_VALUE", "MAX_GRAD_NORM", "MAX_CONSECUTIVE_SKIPS"), POSITIVE),
    **dict.fromkeys(("MAX_STEPS", "MAX_TRAIN_SAMPLES", "MAX_EVAL_SAMPLES", "WEIGHT_DECAY",
                     "WARMUP_STEPS", "VALUE_LOSS_COEF", "ENTROPY_COEF", "KL_COEF", "KL_LOSS_COEF",
                     "MISSING_EOS_PENALTY", "REWARD_CLIP", "TARGET_KL", "EVAL_EVERY_N_STEPS",
                     "SAVE_EVERY_N_STEPS", "SAVE_TOTAL_LIMIT", "EARLY_STOPPING_PATIENCE",
                     "NUM_SAMPLES_TO_LOG", "ADAPTIVE_KL_HORIZON", "OVERLONG_PENALTY"),
                    NON_NEGATIVE),
    "GAMMA": UNIT, "LAM": UNIT, "PLATEAU_FACTOR": (lambda v: 0 < v < 1, "in (0, 1)"),
    "CLIP_RANGE_LOW": OPTIONAL_CLIP, "CLIP_RANGE_HIGH": OPTIONAL_CLIP,
    "DUAL_CLIP": (lambda v: v == 0 or v > 1, "> 1 (3.0 is usual), or 0 for off"),
    "LORA_R": (lambda v: v >= 1, ">= 1"),
    "LAM_VALUE": (lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                          and 0 <= v <= 1), "in [0, 1], or None for LAM"),
    **dict.fromkeys(("LENGTH_ADAPTIVE_LAM", "VALUE_WARMUP_STEPS", "POSITIVE_LM_COEF"),
                    NON_NEGATIVE),
}
GROUP_ONLY = "'grpo', 'dr_grpo' or 'rloo'"
RULES = [  # settings that cannot work together: (whether the settings break the rule, the message)
    (lambda c: not c.TRAIN_DATASETS,
     "TRAIN_DATASETS is empty: give at least one dataset of prompts."),
    *[(lambda c, name=name: not (isinstance(c[name], list) and
                                 all(isinstance(spec, dict) for spec in c[name])),
       name + ' must be a list of {{"path", "type", "input", "output"}} objects.')
      for name in ("TRAIN_DATASETS", "EVAL_DATASETS")],
    (lambda c: not (isinstance(c.STOP_TOKENS, list) and
                    all(isinstance(token, str) for token in c.STOP_TOKENS)),
     'STOP_TOKENS must be a list of token strings, e.g. ["<|im_end|>"].'),
    (lambda c: c.ADVANTAGE_ESTIMATOR in GROUP_ESTIMATORS and c.GROUP_SIZE < 2,
     "ADVANTAGE_ESTIMATOR = {ADVANTAGE_ESTIMATOR!r} compares the responses to one prompt: set "
     "GROUP_SIZE >= 2 (4 to 16 is usual)."),
    (lambda c: c.POLICY_LOSS == "gspo" and c.ADVANTAGE_ESTIMATOR not in GROUP_ESTIMATORS,
     "POLICY_LOSS = 'gspo' weighs whole sequences by one ratio, so it needs one advantage per "
     "sequence: ADVANTAGE_ESTIMATOR = {ADVANTAGE_ESTIMATOR!r} gives one per token; use "
     + GROUP_ONLY + "."),
    (lambda c: c.POLICY_LOSS == "gspo" and c.LOSS_AGGREGATION != "seq-mean-token-mean",
     "POLICY_LOSS = 'gspo' is defined as a mean over sequences of the sequence ratio: set "
     "LOSS_AGGREGATION = 'seq-mean-token-mean' (now {LOSS_AGGREGATION!r})."),
    (lambda c: c.POLICY_LOSS == "cispo" and c.DUAL_CLIP,
     "DUAL_CLIP bounds PPO's clipped surrogate; POLICY_LOSS = 'cispo' has none (its weight is "
     "already clipped): set DUAL_CLIP = 0."),
    (lambda c: c.ADAPTIVE_KL and not c.KL_COEF,
     "ADAPTIVE_KL multiplies the KL coefficient, so from KL_COEF = 0 it stays 0: set KL_COEF > 0 "
     "(its start value, e.g. 0.05)."),
    (lambda c: c.KL_IN_LOSS and c.ADAPTIVE_KL,
     "ADAPTIVE_KL steers the reward's KL coefficient, and KL_IN_LOSS takes the KL out of the "
     "reward: turn one of them off."),
    (lambda c: c.DYNAMIC_SAMPLING and c.ADVANTAGE_ESTIMATOR not in GROUP_ESTIMATORS,
     "DYNAMIC_SAMPLING drops groups whose responses all scored the same, which carry no signal "
     "only for a group baseline: ADVANTAGE_ESTIMATOR = {ADVANTAGE_ESTIMATOR!r}; use "
     + GROUP_ONLY + "."),
    (lambda c: c.DYNAMIC_SAMPLING and c.KL_COEF and not c.KL_IN_LOSS,
     "DYNAMIC_SAMPLING drops groups whose scores are all equal, but with the KL in the reward "
     "(KL_COEF = {KL_COEF}) their advantages are not zero: set KL_COEF = 0 (DAPO has no KL) or "
     "KL_IN_LOSS = True."),
    (lambda c: not 0 <= c.OVERLONG_BUFFER <= c.MAX_NEW_TOKENS,
     "OVERLONG_BUFFER = {OVERLONG_BUFFER!r} must be in [0, MAX_NEW_TOKENS = {MAX_NEW_TOKENS}]."),
    (lambda c: not (isinstance(c.REWARD_FUNCTIONS, dict) and all(
        name in RULE_REWARDS and isinstance(weight, (int, float)) and not isinstance(weight, bool)
        for name, weight in c.REWARD_FUNCTIONS.items())),
     "REWARD_FUNCTIONS = {REWARD_FUNCTIONS!r} must map rule names (" + ", ".join(
         map(repr, RULE_REWARDS)) + ') to weights, e.g. {{"answer": 1.0}}; Python functions go '
     "to PPOTrainer(reward_functions=[...])."),
    (lambda c: "format" in c.REWARD_FUNCTIONS and regex_problem(c.FORMAT_PATTERN),
     lambda c: f"FORMAT_PATTERN = {c.FORMAT_PATTERN!r}: the \"format\" rule needs a regular "
               f"expression ({regex_problem(c.FORMAT_PATTERN)})."),
    (lambda c: c.ADVANTAGE_ESTIMATOR != "gae" and (
        c.VALUE_WARMUP_STEPS or c.LAM_VALUE is not None or c.LENGTH_ADAPTIVE_LAM),
     "VALUE_WARMUP_STEPS, LAM_VALUE and LENGTH_ADAPTIVE_LAM shape the critic's GAE, but "
     "ADVANTAGE_ESTIMATOR = {ADVANTAGE_ESTIMATOR!r} has no critic: use 'gae' or turn them off."),
    (lambda c: c.SHARED_BASE and c.CRITIC_MODEL not in (None, c.ACTOR_MODEL),
     "SHARED_BASE makes the critic an adapter on ACTOR_MODEL's base, so it cannot start from "
     "CRITIC_MODEL = {CRITIC_MODEL!r}: set CRITIC_MODEL = None."),
    (lambda c: c.LOAD_IN_4BIT and not (c.USE_LORA or c.SHARED_BASE),
     "LOAD_IN_4BIT freezes the base in 4-bit, so only adapters can learn: set USE_LORA = True or "
     "SHARED_BASE = True."),
    (lambda c: "answer" in c.REWARD_FUNCTIONS and c.REFERENCE_REWARD,
     "REFERENCE_REWARD is the weight of the \"answer\" rule, which REWARD_FUNCTIONS names too: "
     "set one of them."),
]


def regex_problem(pattern) -> Optional[str]:
    """Why `pattern` is not a regular expression, or None."""
    if not isinstance(pattern, str):
        return f"got {type(pattern).__name__}"
    try:
        re.compile(pattern)
    except re.error as e:
        return f"{e.msg} at position {e.pos}"
    return None
WARNINGS = [  # settings that work but are likely mistakes: (whether they apply, the warning)
    (lambda c: c.POLICY_LOSS == "gspo" and max(clip_ranges(c)) > 0.01,
     "POLICY_LOSS = 'gspo' clips a sequence ratio that is a geometric mean over its tokens, so a "
     "range of CLIP_RANGE = {CLIP_RANGE} seldom binds: the GSPO paper clips it to [1 - 3e-4, "
     "1 + 4e-4] (CLIP_RANGE_LOW = 3e-4, CLIP_RANGE_HIGH = 4e-4)."),
    (lambda c: c.POLICY_LOSS == "cispo" and c.CLIP_RANGE_LOW is None,
     "POLICY_LOSS = 'cispo': MiniMax-M1 bounds only the upper side of the weight, but "
     "CLIP_RANGE_LOW = None bounds the lower side too, at 1 - CLIP_RANGE (CLIP_RANGE = "
     "{CLIP_RANGE}): set CLIP_RANGE_LOW = 1.0 for no lower bound."),
]


def setting_warnings(cfg: Config) -> List[str]:
    """WARNINGS that apply to these settings (logged when the run starts)."""
    return [message.format_map(cfg) for applies, message in WARNINGS if applies(cfg)]


def validate_config(cfg: Config) -> None:
    """Check every setting against CHOICES and BOUNDS, and the settings against RULES, once,
    before any model is loaded: one error that lists every problem."""
    problems = [f"{name} = {cfg[name]!r} must be one of {', '.join(map(repr, choices))}."
                for name, choices in CHOICES.items() if cfg[name] not in choices]
    problems += [f"{name} = {cfg[name]!r} must be {words}."
                 for name, (in_range, words) in BOUNDS.items() if not in_range(cfg[name])]
    problems += [message(cfg) if callable(message) else message.format_map(cfg)
                 for broken, message in RULES if broken(cfg)]
    if problems:
        raise ConfigError("Invalid settings:\n  " + "\n  ".join(problems))


def describe_objective(cfg: Config) -> str:
    """One log line: the estimator, the policy loss and its clip, the aggregation, the KL."""
    low, high = clip_ranges(cfg)
    parts = [f"advantages {cfg.ADVANTAGE_ESTIMATOR}", f"policy loss {cfg.POLICY_LOSS}, ratio "
             f"clipped to [{1 - low:g}, {1 + high:g}]", f"{cfg.LOSS_AGGREGATION} aggregation"]
    if cfg.DUAL_CLIP:
        parts.append(f"dual clip {cfg.DUAL_CLIP:g}")
    parts.append(f"KL ({cfg.KL_ESTIMATOR}) in the loss x {cfg.KL_LOSS_COEF:g}" if cfg.KL_IN_LOSS
                 else f"KL ({cfg.KL_ESTIMATOR}) in the reward x {cfg.KL_COEF:g}"
                 + (" (adaptive)" if cfg.ADAPTIVE_KL else "") if uses_reference(cfg)
                 else "no KL (no reference model)")
    if cfg.ADVANTAGE_ESTIMATOR == "gae":
        lam = (f"1 - 1/({cfg.LENGTH_ADAPTIVE_LAM:g} x length)" if cfg.LENGTH_ADAPTIVE_LAM
               else f"{cfg.LAM:g}")
        parts.append(f"GAE lambda {lam} for the policy, "
                     f"{cfg.LAM if cfg.LAM_VALUE is None else cfg.LAM_VALUE:g} for the critic")
    if cfg.VALUE_WARMUP_STEPS:
        parts.append(f"only the critic trains in the first {cfg.VALUE_WARMUP_STEPS} steps")
    if cfg.POSITIVE_LM_COEF:
        parts.append(f"NLL x {cfg.POSITIVE_LM_COEF:g} on responses scoring >= "
                     f"{cfg.POSITIVE_LM_THRESHOLD:g}")
    if cfg.DYNAMIC_SAMPLING:
        parts.append("dynamic sampling")
    if cfg.OVERLONG_BUFFER:
        parts.append(f"overlong penalty up to {cfg.OVERLONG_PENALTY:g} over the last "
                     f"{cfg.OVERLONG_BUFFER} tokens (it replaces MISSING_EOS_PENALTY)")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# 11. Data: prompt datasets in the guide's format, read with the `datasets` library
# ---------------------------------------------------------------------------------------------
def resolve_path(path: str) -> str:
    """A relative path is looked up in the working directory, then next to ppo.py; else kept (a hub
    id)."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return str(candidate)
    beside = Path(__file__).resolve().parent / candidate
    return str(beside) if beside.exists() else path


def jsonl_line_of_row(path: str, row: int) -> int:
    """1-based line number of the row-th (0-based) non-blank line of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        seen = -1
        for number, line in enumerate(f, 1):
            seen += bool(line.strip())
            if seen == row:
                return number
    return row + 1


def read_jsonl_rows(path: str, where: str) -> List[dict]:
    """JSONL read line by line: the fallback when `datasets` cannot read a file, and the way to say
    exactly which line is wrong (1-based line and column)."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: {path}, line {number}, column {e.colno}: invalid JSON "
                                  f"({e.msg}). Each line must be one JSON object.") from None
            if not isinstance(row, dict):
                raise ConfigError(f'{where}: {path}, line {number}: expected a JSON object like '
                                  f'{{"problem": ..., "solution": ...}}, got {type(row).__name__}.')
            rows.append(row)
    return rows


def read_dataset(spec: dict, where: str) -> Tuple[str, Dict[str, list]]:
    """One {"path", "type", "input", "output"} entry -> (resolved path, {column: values}) for the
    columns the spec names, read with `datasets` (JSONL it cannot read is read line by line, to
    point at the bad line)."""
    import datasets
    if not isinstance(spec, dict) or not {"path", "type", "input"} <= set(spec):
        raise ConfigError(f'{where} must be like {{"path": "data.jsonl", "type": "jsonl", '
                          f'"input": "problem", "output": "solution"}} ("output" optional); '
                          f'got {spec!r}.')
    extra = set(spec) - {"path", "type", "input", "output"}
    if extra:
        raise ConfigError(f"{where} has unknown key(s) {sorted(extra)}; "
                          "allowed: path, type, input, output.")
    path, kind = resolve_path(str(spec["path"])), spec["type"]
    if kind not in ("jsonl", "parquet"):
        raise ConfigError(f'{where}: type {kind!r} is not supported; use "jsonl" or "parquet".')
    if not Path(path).is_file():
        raise ConfigError(f"{where}: dataset file {spec['path']} not found "
                          f"(working directory: {os.getcwd()}).")
    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    # a bad file gets our message, not theirs too
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        dataset = (datasets.Dataset.from_json if kind == "jsonl"
                   else datasets.Dataset.from_parquet)(path)
        names, column = dataset.column_names, dataset.__getitem__
    except Exception as e:
        if kind == "parquet":
            if parquet_rows(path) == 0:
                raise ConfigError(f"{where}: {path} has no usable rows.") from None
            raise ConfigError(f"{where}: {path} is not a readable Parquet file "
                              f"({first_line(e)}).") from None
        rows = read_jsonl_rows(path, where)
        if not rows:
            raise ConfigError(
                f"{where}: {path} "
                f"{'is empty' if not os.path.getsize(path) else 'has only blank lines'}"
                "; it has no usable rows.") from None
        names = list(dict.fromkeys(k for row in rows for k in row))
        column = lambda name: [row.get(name) for row in rows]  # noqa: E731
    finally:
        datasets.logging.set_verbosity(verbosity)
    for role in ("input", "output"):
        if spec.get(role) is not None and spec[role] not in names:
            raise ConfigError(f"{where}: column {spec[role]!r} (\"{role}\") is not in {path}; "
                              f"its columns are {names}.")
    return path, {spec[r]: column(spec[r]) for r in ("input", "output") if spec.get(r) is not None}


def parquet_rows(path: str) -> Optional[int]:
    import pyarrow.parquet as pq
    try:
        return pq.read_metadata(path).num_rows
    except Exception:
        return None


def load_prompts(specs: List[dict], limit: int, name: str) -> Tuple[List[str], Dict[str, str]]:
    """All datasets of TRAIN_DATASETS or EVAL_DATASETS, concatenated: (prompts, {prompt:
    reference})."""
    prompts, references = [], {}
    for i, spec in enumerate(specs):
        where = f"{name}[{i}]"
        path, columns = read_dataset(spec, where)
        inputs = columns[spec["input"]]
        outputs = columns[spec["output"]] if spec.get("output") else [None] * len(inputs)
        if not inputs:
            raise ConfigError(f"{where}: {path} has no usable rows.")
        for row, (prompt, reference) in enumerate(zip(inputs, outputs)):
            if not isinstance(prompt, str) or not prompt.strip():
                place = (f"line {jsonl_line_of_row(path, row)}" if spec["type"] == "jsonl"
                         else f"row {row + 1}")
                raise ConfigError(f"{where}: {path}, {place}: the prompt column {spec['input']!r} "
                                  f"holds {prompt!r}; every prompt must be a non-empty string.")
            prompts.append(prompt)
            if reference is not None:
                references.setdefault(prompt, str(reference))
    return (prompts[:limit] if limit else prompts), references


def load_data(cfg: Config) -> Tuple[List[str], List[str], Dict[str, str]]:
    """(train prompts, eval prompts, {prompt: reference}) from TRAIN_DATASETS and EVAL_DATASETS."""
    train_prompts, train_refs = load_prompts(cfg.TRAIN_DATASETS, cfg.MAX_TRAIN_SAMPLES,
                                             "TRAIN_DATASETS")
    eval_prompts, eval_refs = load_prompts(cfg.EVAL_DATASETS, cfg.MAX_EVAL_SAMPLES, "EVAL_DATASETS")
    return train_prompts, eval_prompts, {**train_refs, **eval_refs}


# ---------------------------------------------------------------------------------------------
# 12. Models and tokenizers: loading, checking and saving the four models
# ---------------------------------------------------------------------------------------------
def model_error(name: str, path: str, problem: str) -> ConfigError:
    return ConfigError(f"{name} = {path!r}: {problem}")


def load_model_config(name: str, path: str, cfg: Config):
    """(resolved path, config), with an error that names the constant when there is no model
    there."""
    from transformers import AutoConfig
    resolved = resolve_path(path)
    try:
        config = AutoConfig.from_pretrained(resolved, trust_remote_code=cfg.TRUST_REMOTE_CODE)
    except (OSError, ValueError) as e:
        if not Path(resolved).exists() and (resolved.startswith((".", "/", "~")) or
                                            resolved.count("/") > 1):
            raise model_error(name, path, "no such folder.") from None
        if "custom code" in str(e) and not cfg.TRUST_REMOTE_CODE:
            raise model_error(name, path, "its model comes with custom code, which runs only with "
                              "TRUST_REMOTE_CODE = True: set it if you trust that code.") from None
        raise model_error(name, path, f"cannot load a model config from it ({first_line(e)}). "
                          "Give a local folder made by save_pretrained, or a Hugging Face hub id "
                          "(downloads need network access).") from None
    return resolved, config


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout off in every layer, so the PPO ratio is exactly 1 before the first update. The
    modules are changed, not the config, so a saved checkpoint keeps the user's dropout settings."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for key, value in list(vars(module).items()):
            if "dropout" in key and isinstance(value, float):
                setattr(module, key, 0.0)
    return model


def check_model_kind(name: str, path: str, config, kind: str) -> None:
    """kind "causal": a generative model; "reward": a sequence classifier with one label; "critic":
    either."""
    architectures = getattr(config, "architectures", None) or []
    if kind == "causal" and architectures and not any(
            a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
            for a in architectures):
        raise model_error(name, path, f"is a {architectures[0]}, not a causal language model "
                          "(AutoModelForCausalLM). Point it at a generative model.")
    if kind == "reward" and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise model_error(name, path, f"is a {architectures[0] if architectures else 'model'} "
                          "without a sequence-classification head; the reward model must load with "
                          "AutoModelForSequenceClassification (num_labels=1).")
    if kind == "reward" and config.num_labels != 1:
        raise model_error(name, path, f"has num_labels = {config.num_labels}; a reward model gives "
                          "one score per sequence (num_labels=1).")


def load_causal_lm(name: str, path: str, cfg: Config, dtype: torch.dtype, **extra):
    """A causal LM in `dtype`, dropout off (extra: from_pretrained's quantization_config, ...)."""
    from transformers import AutoModelForCausalLM
    resolved, config = load_model_config(name, path, cfg)
    check_model_kind(name, path, config, "causal")
    model = AutoModelForCausalLM.from_pretrained(resolved, config=config, dtype=dtype,
                                                 trust_remote_code=cfg.TRUST_REMOTE_CODE, **extra)
    return disable_dropout(model)


def load_sequence_classifier(name: str, path: str, cfg: Config, dtype: torch.dtype,
                             is_reward: bool):
    """The reward model, or the critic (from a reward model or a causal LM: its `score` head is the
    value head)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging
    resolved, config = load_model_config(name, path, cfg)
    check_model_kind(name, path, config, "reward" if is_reward else "critic")
    config.num_labels = 1
    new_head = not any(a.endswith("ForSequenceClassification")
                       for a in getattr(config, "architectures", None) or [])
    verbosity = hf_logging.get_verbosity()
    if new_head:                       # transformers would report the new head as MISSING
        hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolved, config=config, dtype=dtype, trust_remote_code=cfg.TRUST_REMOTE_CODE)
    finally:
        hf_logging.set_verbosity(verbosity)
    if not is_reward and not isinstance(getattr(model, "score", None), nn.Linear):
        raise model_error(name, path, f"{type(model).__name__} has no `score` head; the critic "
                          "must be a decoder-only model (Llama, Qwen2, Mistral, GPT-2, ...).")
    if new_head:
        std = getattr(config.get_text_config(), "initializer_range", None)
        logger.info(f"The critic is {name} = {path!r}, a causal LM, with a new value head "
                    "(`score`: hidden size -> 1), initialised as transformers does"
                    f"{f' from N(0, {std:g}^2)' if std else ''}: its values start near 0 and "
                    "learn from the first step.")
    return disable_dropout(model)


def load_tokenizer(name: str, path: str, cfg: Config):
    from transformers import AutoTokenizer
    resolved, _ = load_model_config(name, path, cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=cfg.TRUST_REMOTE_CODE)
    except (OSError, ValueError, TypeError) as e:
        raise model_error(name, path, f"has no usable tokenizer ({first_line(e)}); save one next "
                          "to the model with tokenizer.save_pretrained(folder).") from None
    if tokenizer.pad_token is None:
        distinct = tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token
        tokenizer.pad_token = tokenizer.unk_token if distinct else tokenizer.eos_token
        logger.info(f"{name}: the tokenizer has no pad token; padding with {tokenizer.pad_token!r} "
                    "(masks never depend on the pad id, so this is safe).")
    return tokenizer


def vocab_size(config) -> Optional[int]:
    return getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                   "vocab_size", None)


def stop_token_ids(tokenizer, path: str, config, stop_tokens: List[str]) -> torch.Tensor:
    """EOS of the tokenizer and of the policy's generation_config (chat models end turns with their
    own token), plus STOP_TOKENS: a response ends at the first of them."""
    from transformers import GenerationConfig
    try:
        generation = GenerationConfig.from_pretrained(path)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    configured = generation.eos_token_id
    ids = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    for token in stop_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ConfigError(f"STOP_TOKENS: {token!r} is not a single token of the policy's "
                              "tokenizer.")
        ids.add(token_id)
    ids.discard(None)
    if not ids:
        raise ConfigError("The policy's tokenizer has no EOS token: add one, or list an end token "
                          "in STOP_TOKENS.")
    return torch.tensor(sorted(ids))


def enable_checkpointing(model: nn.Module, context_fn=None) -> None:
    """Activation (gradient) checkpointing, non-reentrant so frozen inputs and LoRA need no extra
    hooks; context_fn sets up the recompute (Adapters.checkpoint_contexts)."""
    kwargs = {"use_reentrant": False, **({"context_fn": context_fn} if context_fn else {})}
    enable = getattr(model, "activation_checkpointing_enable", None)  # name since transformers 5.x
    if enable is not None:
        enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def uses_adapters(cfg: Config) -> bool:
    """The policy is a LoRA adapter on a frozen base (USE_LORA, or SHARED_BASE)."""
    return bool(cfg.USE_LORA or cfg.SHARED_BASE)


def load_base(cfg: Config, dtype: torch.dtype, device) -> nn.Module:
    """ACTOR_MODEL as the frozen base of the adapters: in `dtype`, or with LOAD_IN_4BIT in 4-bit NF4
    (bitsandbytes; computing in BASE_COMPUTE_DTYPE), prepared for k-bit training."""
    if not cfg.LOAD_IN_4BIT:
        return load_causal_lm("ACTOR_MODEL", cfg.ACTOR_MODEL, cfg, dtype)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("LOAD_IN_4BIT needs bitsandbytes: pip install bitsandbytes") from None
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig
    on_gpu = torch.device(device).type == "cuda"
    compute = (getattr(torch, cfg.BASE_COMPUTE_DTYPE) if cfg.BASE_COMPUTE_DTYPE != "auto" else
               torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=compute)
    try:
        base = load_causal_lm("ACTOR_MODEL", cfg.ACTOR_MODEL, cfg, compute,
                              quantization_config=quantization, device_map={"": device})
    except (RuntimeError, ValueError, ImportError, NotImplementedError) as e:
        raise ConfigError(f"LOAD_IN_4BIT: bitsandbytes cannot load ACTOR_MODEL in 4-bit on "
                          f"{device} ({first_line(e)}); set LOAD_IN_4BIT = False.") from None
    for module in base.modules():
        # bitsandbytes repacks a CPU layer's weights at its first eval-mode forward without grad
        # (generate) for a kernel that has no backward: every later backward through the base
        # would then lose the gradient to the layers below, silently
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    logger.info(f"ACTOR_MODEL in 4-bit NF4 (bitsandbytes), computing in {compute}: "
                f"{base.get_memory_footprint() / 2 ** 20:.0f} MB")
    return prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)


def lora_config(cfg: Config):
    from peft import LoraConfig
    targets = cfg.LORA_TARGET_MODULES
    targets = (targets if targets == "all-linear"
               else [name.strip() for name in targets.split(",") if name.strip()])
    return LoraConfig(r=cfg.LORA_R, lora_alpha=cfg.LORA_ALPHA, lora_dropout=cfg.LORA_DROPOUT,
                      target_modules=targets, task_type="CAUSAL_LM")


def apply_lora(base: nn.Module, cfg: Config, checkpoint: Optional[Path] = None,
               critic: bool = False) -> nn.Module:
    """The policy's trainable LoRA adapter on `base` (peft's "default": new, or the checkpoint's
    policy_adapter/), and with critic=True the critic's ("critic", from the checkpoint's critic/)
    beside it on the same base; the policy's active."""
    from peft import PeftModel, get_peft_model
    if checkpoint is not None:
        model = PeftModel.from_pretrained(base, str(checkpoint / "policy_adapter"),
                                          is_trainable=True)
        if critic:
            model.load_adapter(str(checkpoint / "critic"), adapter_name="critic", is_trainable=True)
    else:
        model = get_peft_model(base, lora_config(cfg))
        if critic:
            model.add_adapter("critic", lora_config(cfg))
    model.set_adapter("default")
    return model


class Adapters:
    """The adapters of a shared base: `with adapters.active("critic"):` runs the base with the
    critic's adapter, the policy's ("default") again after. peft's set_adapter freezes the other
    adapter, and both learn in one backward, so every trainable parameter gets requires_grad back.
    Gradient checkpointing recomputes a layer in backward, when another adapter may be active:
    checkpoint_contexts makes each recompute run with the adapter of the layer's first run."""

    def __init__(self, model: nn.Module):
        self.model, self.current = model, "default"
        self.trainable = [p for n, p in model.named_parameters() if "lora_" in n]
        for p in self.trainable:
            p.requires_grad_(True)

    def switch(self, name: str) -> None:
        self.model.set_adapter(name)
        for p in self.trainable:
            p.requires_grad_(True)
        self.current = name

    @contextlib.contextmanager
    def active(self, name: str):
        previous = self.current
        self.switch(name)
        try:
            yield
        finally:
            self.switch(previous)

    def checkpoint_contexts(self):
        return contextlib.nullcontext(), self.active(self.current)


def value_head(model: nn.Module, checkpoint: Optional[Path]) -> nn.Linear:
    """SHARED_BASE's value head: hidden size -> 1, float32, new (as transformers initialises a
    `score` head) or the checkpoint's critic/value_head.safetensors."""
    from safetensors.torch import load_file
    config = model.config.get_text_config()
    head = nn.Linear(config.hidden_size, 1, bias=False)
    if checkpoint is not None:
        head.load_state_dict(load_file(checkpoint / "critic" / "value_head.safetensors"))
    else:
        nn.init.normal_(head.weight, std=getattr(config, "initializer_range", 0.02))
    return head


@dataclasses.dataclass
class Models:
    """What load_models builds: tokenizers, stop tokens, the prepared trained models and their
    optimizer, and the frozen reference and reward models."""
    tokenizer: object
    reward_tokenizer: object
    stop_ids: torch.Tensor
    model: nn.Module                     # PolicyAndCritic, wrapped by the backend (DDP / DeepSpeed)
    optimizer: object
    ref: Reference
    reward_model: nn.Module
    policy_dtype: torch.dtype            # what ACTOR_MODEL's weights were saved in (best/ too)


def critic_source(cfg: Config) -> Tuple[str, str]:
    """(constant, path) the critic starts from: CRITIC_MODEL, or ACTOR_MODEL when it is None."""
    return ("CRITIC_MODEL", cfg.CRITIC_MODEL) if cfg.CRITIC_MODEL else ("ACTOR_MODEL",
                                                                           cfg.ACTOR_MODEL)


def load_tokenizers(cfg: Config):
    """Configs, tokenizers and stop tokens of every model, checked before any weights load:
    (policy tokenizer, reward tokenizer or None, stop ids, the policy's config)."""
    policy_path, policy_config = load_model_config("ACTOR_MODEL", cfg.ACTOR_MODEL, cfg)
    check_model_kind("ACTOR_MODEL", cfg.ACTOR_MODEL, policy_config, "causal")
    tokenizer = load_tokenizer("ACTOR_MODEL", cfg.ACTOR_MODEL, cfg)
    tokenizer.padding_side = "left"
    reward_tokenizer = None
    if cfg.REWARD_MODEL is not None:
        _, reward_config = load_model_config("REWARD_MODEL", cfg.REWARD_MODEL, cfg)
        check_model_kind("REWARD_MODEL", cfg.REWARD_MODEL, reward_config, "reward")
        reward_tokenizer = load_tokenizer("REWARD_MODEL", cfg.REWARD_MODEL, cfg)
        reward_tokenizer.truncation_side = "left"      # an over-long input keeps the response
    stop_ids = stop_token_ids(tokenizer, policy_path, policy_config, cfg.STOP_TOKENS)
    if cfg.USE_CHAT_TEMPLATE and tokenizer.chat_template:
        check_generation_prompt(tokenizer)
        turn_end = template_turn_end(tokenizer)
        if turn_end is not None and turn_end not in stop_ids:
            logger.info("The chat template ends a turn with "
                        f"{tokenizer.convert_ids_to_tokens(turn_end)!r}: it ends a response too.")
            stop_ids = torch.cat([stop_ids, torch.tensor([turn_end])]).sort().values
    if cfg.ADVANTAGE_ESTIMATOR == "gae":
        _, critic_config = load_model_config(*critic_source(cfg), cfg)
        critic_vocab = vocab_size(critic_config)
        if critic_vocab is not None and critic_vocab < len(tokenizer):
            raise model_error(*critic_source(cfg),
                              f"has a vocabulary of {critic_vocab} tokens, "
                              f"fewer than the policy's {len(tokenizer)}: the critic reads the "
                              "policy's tokens, so start it from a model with the policy's "
                              "tokenizer.")
    return tokenizer, reward_tokenizer, stop_ids, policy_config


def uses_reference(cfg: Config) -> bool:
    """Whether the objective holds a KL to the reference; without one the reference is neither
    loaded nor run (as TRL does at beta = 0)."""
    return bool(cfg.KL_IN_LOSS or cfg.KL_COEF)


def load_models(cfg: Config, backend: "Backend", checkpoint: Optional[Path]) -> Models:
    """Policy and critic (trained, float32 master weights, from the checkpoint when resuming), the
    frozen reference (float32 like the policy; under LoRA the policy's base) and reward model (in
    the mixed-precision dtype), one AdamW over both trained models, prepared."""
    tokenizer, reward_tokenizer, stop_ids, policy_config = load_tokenizers(cfg)
    frozen_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(backend.mixed_precision,
                                                                       torch.float32)
    parked = "cpu" if cfg.OFFLOAD_REF_AND_REWARD else backend.device
    reference, shared = None, cfg.SHARED_BASE and cfg.ADVANTAGE_ESTIMATOR == "gae"
    if uses_adapters(cfg):
        policy = apply_lora(load_base(cfg, frozen_dtype, backend.device), cfg, checkpoint,
                            critic=shared)
        reference = Reference(policy, adapters_off=True) if uses_reference(cfg) else None
    else:
        start = str(checkpoint / "policy") if checkpoint else cfg.ACTOR_MODEL
        policy = load_causal_lm("ACTOR_MODEL", start, cfg, torch.float32)
        if uses_reference(cfg):
            # float32 like the policy: both take one numeric path under autocast (KL 0 at step 0)
            frozen = load_causal_lm("ACTOR_MODEL", cfg.ACTOR_MODEL, cfg, torch.float32)
            reference = Reference(frozen.requires_grad_(False).eval(), adapters_off=False)
            reference.to(parked)
    if reference is None:
        logger.info("No KL to the reference in the objective (KL_COEF = 0, no KL_IN_LOSS): the "
                    "reference model is neither loaded nor run.")
    critic, adapters = None, Adapters(policy) if shared else None
    if shared:
        critic = value_head(policy, checkpoint)
    elif cfg.ADVANTAGE_ESTIMATOR == "gae":
        name, path = critic_source(cfg)
        critic = load_sequence_classifier(name, str(checkpoint / "critic") if checkpoint else path,
                                          cfg, torch.float32, is_reward=False)
    for model in (policy, None if shared else critic):
        if model is not None and cfg.GRADIENT_CHECKPOINTING:
            enable_checkpointing(model, adapters.checkpoint_contexts if adapters else None)
    reward = None
    if cfg.REWARD_MODEL is not None:
        reward = load_sequence_classifier("REWARD_MODEL", cfg.REWARD_MODEL, cfg, frozen_dtype,
                                          is_reward=True).requires_grad_(False).eval().to(parked)
    named = list(policy.named_parameters())     # with SHARED_BASE the critic's adapter is here too
    policy_params = [p for n, p in named if p.requires_grad and ".critic." not in n]
    critic_params = ([] if critic is None else list(critic.parameters()) +
                     [p for n, p in named if ".critic." in n])
    groups = [{"params": params, "lr": lr}
              for params, lr in ((policy_params, cfg.LEARNING_RATE),
                                 (critic_params, cfg.CRITIC_LEARNING_RATE)) if params]
    # fused: one kernel per optimizer step instead of a dozen small ops per tensor
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.WEIGHT_DECAY, fused=True)
    # training mode (dropout is off): gradient checkpointing acts in training mode only
    model, optimizer = backend.prepare(PolicyAndCritic(policy, critic, adapters).train(), optimizer)
    counts = [f"{sum(p.numel() for p in g['params']) / 1e6:.2f}M" for g in groups]
    kind = "adapter + value head on the policy's base" if shared else type(critic).__name__
    logger.info(f"policy {type(policy).__name__} ({counts[0]} trainable parameters), critic "
                f"{kind if critic else 'none'} ({counts[1] if critic else 0}), device "
                f"{backend.device}, mixed precision {backend.mixed_precision}")
    check_learning_rate(policy, cfg)
    return Models(tokenizer, reward_tokenizer, stop_ids, model, optimizer, reference, reward,
                  saved_dtype(policy_config))


def check_learning_rate(policy: nn.Module, cfg: Config) -> None:
    billions = sum(p.numel() for p in policy.parameters()) / 1e9
    if billions >= 0.3 and not uses_adapters(cfg) and cfg.LEARNING_RATE > 2e-5:
        logger.warning(f"LEARNING_RATE = {cfg.LEARNING_RATE:g} is far above the usual 1e-6 to 5e-6 "
                       f"for a {billions:.1f}B-parameter policy; PPO is likely to diverge.")


def write_policy(policy: nn.Module, tokenizer, folder: Path, adapter_folder: Path,
                 cfg: Config, dtype: torch.dtype = torch.float32, merged: bool = True) -> None:
    """A folder AutoModelForCausalLM.from_pretrained loads, its weights in `dtype`. Under LoRA the
    policy's adapter goes to adapter_folder (what a resume loads; policy None: the adapter saved
    there already), and `folder` gets it too (small; transformers loads it onto ACTOR_MODEL through
    peft), or with `merged` base + adapter merged on a CPU copy in `dtype` (training is
    untouched)."""
    if not uses_adapters(cfg):
        return write_model(policy, tokenizer, folder, dtype)
    from peft import PeftModel
    if policy is not None:                          # None: adapter_folder holds a saved adapter
        policy.save_pretrained(adapter_folder, selected_adapters=["default"])
    if not merged:
        if folder != adapter_folder:
            shutil.copytree(adapter_folder, folder, dirs_exist_ok=True)
        return tokenizer.save_pretrained(folder)
    base = load_causal_lm("ACTOR_MODEL", cfg.ACTOR_MODEL, cfg, dtype)
    write_model(PeftModel.from_pretrained(base, str(adapter_folder)).merge_and_unload(), tokenizer,
                folder, dtype)


def write_critic(critic: nn.Module, policy: nn.Module, tokenizer, folder: Path,
                 cfg: Config) -> None:
    """critic/: the critic model with the policy's tokenizer (it reads the policy's tokens), or with
    SHARED_BASE its adapter (peft's files) and value_head.safetensors."""
    if not cfg.SHARED_BASE:
        return write_model(critic, tokenizer, folder)
    from safetensors.torch import save_file
    policy.save_pretrained(folder.parent, selected_adapters=["critic"])     # writes folder/
    save_file({k: v.detach().cpu().contiguous() for k, v in critic.state_dict().items()},
              folder / "value_head.safetensors")


def write_model(model: nn.Module, tokenizer, folder: Path,
                dtype: Optional[torch.dtype] = None) -> None:
    """save_pretrained, the floating-point weights cast to `dtype` on the host when given (tied
    weights stay one tensor), and the config saying so."""
    state = None
    if dtype is not None and any(p.dtype != dtype for p in model.parameters()):
        cast: Dict[int, torch.Tensor] = {}
        state = {name: cast.setdefault(t.data_ptr(), t.to("cpu", dtype) if t.is_floating_point()
                                       else t.cpu()) for name, t in model.state_dict().items()}
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    if state is not None:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        config["dtype"] = str(dtype).removeprefix("torch.")
        (Path(folder) / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(folder)


def saved_dtype(config) -> torch.dtype:
    """The dtype a model folder's weights were saved in (its config's dtype; float32 if none)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = getattr(torch, str(dtype).removeprefix("torch."), None) if dtype else None
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


# ---------------------------------------------------------------------------------------------
# 13. Checkpoints and run files: atomic writes, discovery, rotation, loading without running code
# ---------------------------------------------------------------------------------------------
CHECKPOINT_FILES = ("training_state.pt", "config.json")     # and policy/: a model or an adapter
CHECKPOINT_HELP = ("Check: 1. the checkpoint path is right; 2. training_state.pt exists in it; "
                   "3. the model architecture matches the checkpoint (ACTOR_MODEL, CRITIC_MODEL).")


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step}"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")) + [folder]:
        fsync_path(path)


WRITE_ERRORS = (OSError, SafetensorError)     # a full disk, a read-only folder, ...


def why_not_written(error: Exception) -> str:
    """The system's reason: No space left on device, File too large, Permission denied, ..."""
    return getattr(error, "strerror", None) or first_line(error)


def write_atomically(final: Path, write) -> None:
    """write(tmp) into a temporary sibling folder, flush it to disk, then rename it to `final`: a
    crash leaves either the old state or the complete new one, never a half-written folder under
    that name."""
    tmp = final.parent / f".tmp_{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)                          # a leftover of an interrupted save of ours
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".old_{final.name}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_path(final.parent)
    if old.exists():
        shutil.rmtree(old)


def write_checkpoint(path: Path, state: TrainState, backend: Backend, cfg: Config,
                     policy: nn.Module, critic: Optional[nn.Module], tokenizer,
                     final: bool = False) -> None:
    """step_N/{policy/, critic/, training_state.pt, config.json} (+ optimizer parts under
    DeepSpeed), written by the main process into a temporary folder that is renamed when
    complete. Under LoRA policy/ is the adapter, merged in the run's last checkpoint (`final`)
    when SAVE_POLICY_AS = "merged"."""
    rng = backend.gather_rng()
    parts = backend.save_optimizer_parts(path)
    if not backend.is_main:
        return
    scaler = backend.accelerator.scaler
    training_state = {"format": 1, "state": dataclasses.asdict(state), "rng": rng,
                      "optimizer": backend.optimizer_state(),
                      "scaler": scaler.state_dict() if scaler is not None else None}

    def write(tmp: Path) -> None:
        for part in parts:
            os.replace(part, tmp / part.name.split("__", 1)[1])
        write_policy(policy, tokenizer, tmp / "policy", tmp / "policy_adapter", cfg,
                     merged=final and cfg.SAVE_POLICY_AS == "merged")
        if critic is not None:
            write_critic(critic, policy, tokenizer, tmp / "critic", cfg)
        torch.save(training_state, tmp / "training_state.pt")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    try:
        write_atomically(path, write)
    except WRITE_ERRORS as e:
        raise TrainingError(f"Could not write checkpoint {path}: {why_not_written(e)}. "
                            f"Free space on the disk holding {path.parent} (or fix its "
                            "permissions); the previous checkpoints there are intact. Run again to "
                            "resume from the latest.") from None
    logger.info(f"Checkpoint saved: {path}")


def restore_checkpoint(saved: dict, checkpoint: Path, cfg: Config, backend: Backend) -> TrainState:
    """The run state of a checkpoint's training_state.pt, its optimizer and RNG restored (its
    weights were loaded with the models). Settings changed since then win over what the state
    remembers of them."""
    known = {f.name for f in dataclasses.fields(TrainState)}
    state = TrainState(**{k: v for k, v in saved["state"].items() if k in known})
    backend.load_optimizer(checkpoint, saved)
    rng = saved["rng"]
    set_rng_state(rng[backend.rank] if len(rng) > backend.rank else rng[0])
    if len(rng) <= backend.rank:
        logger.warning(f"{checkpoint} was saved by {len(rng)} process(es); process {backend.rank} "
                       "continues with the random state of process 0.")
    before = saved.get("config", {})
    if not (cfg.ADAPTIVE_KL and before.get("ADAPTIVE_KL", True)):
        state.kl_coef = cfg.KL_COEF     # a fixed coefficient, or a controller that starts now
    elif before.get("KL_COEF", cfg.KL_COEF) != cfg.KL_COEF:
        logger.info(f"ADAPTIVE_KL: the controller's KL coefficient {state.kl_coef:.4g} from the "
                    f"checkpoint continues; KL_COEF = {cfg.KL_COEF} is only the start value of a "
                    "new run.")
    if before.get("EARLY_STOPPING_METRIC", cfg.EARLY_STOPPING_METRIC) != cfg.EARLY_STOPPING_METRIC:
        logger.info(f"EARLY_STOPPING_METRIC changed to {cfg.EARLY_STOPPING_METRIC!r}: its best "
                    "value and patience counters start afresh.")
        state.best_metric, state.best_step = None, -1
        state.evals_without_improvement = state.plateau_bad_evals = 0
    logger.info(f"Resumed from {checkpoint}: step {state.global_step}, epoch {state.epoch + 1}, "
                f"{state.position} prompts into it")
    return state


def set_aside_later(output_dir: Path, step: int) -> bool:
    """On a resume from step k, the step_N folders with N > k and a best/ written after k belong to
    the run that this one replaces: they move to checkpoints/abandoned_<time>_<id>/ (nothing is
    deleted; the log says where), so this run writes its own and RESUME = 'yes' finds them. A best/
    without best.json (written by an older ppo.py) counts as later when later checkpoints exist.
    Returns whether best/ moved."""
    root = Path(output_dir) / "checkpoints"
    later = sorted((p for p in root.glob("step_*") if p.name[5:].isdigit() and
                    int(p.name[5:]) > step), key=lambda p: int(p.name[5:]))
    best = Path(output_dir) / "best"
    try:
        best_later = json.loads((best / "best.json").read_text(encoding="utf-8"))["step"] > step
    except (OSError, ValueError, KeyError, TypeError):
        best_later = best.is_dir() and bool(later)
    if not later and not best_later:
        return False
    aside = Path(tempfile.mkdtemp(prefix=f"abandoned_{time.strftime('%Y%m%d_%H%M%S')}_",
                                  dir=root))
    for path in later + ([best] if best_later else []):
        path.rename(aside / path.name)
    moved = [p.name for p in later] + (["best"] if best_later else [])
    logger.warning(f"Resuming from step {step}: {', '.join(moved)} came later, from the run this "
                   f"one replaces; moved to {aside} (delete it when you no longer need it).")
    return best_later


def check_run_start(cfg: Config, output_dir: Path, resuming: bool, eval_prompts: List[str]) -> None:
    """A new run never writes over another's outputs, and an evaluation metric in use needs an
    evaluation set."""
    if not resuming and holds_run(output_dir):
        raise ConfigError(f"OUTPUT_DIR = {str(output_dir)!r} already holds a run (checkpoints or "
                          "logs/metrics.jsonl). Resume it (RESUME = 'yes', or "
                          "resume_from_checkpoint=...), or choose another OUTPUT_DIR; nothing "
                          "there is overwritten.")
    if eval_metric_in_use(cfg) and not eval_prompts:
        raise ConfigError(f"EARLY_STOPPING_METRIC = {cfg.EARLY_STOPPING_METRIC!r} drives early "
                          "stopping or the plateau schedule, but EVAL_DATASETS is empty: add an "
                          "evaluation set, or set EARLY_STOPPING_PATIENCE = 0.")


def best_policy_line(state: TrainState, cfg: Config, output_dir: Path,
                     last_value: Optional[float]) -> str:
    """The run's last log line: the best evaluation, where its policy is, how the final one did."""
    where = (f"in {Path(output_dir) / 'best'}" if cfg.SAVE_BEST_POLICY else
             "not kept (SAVE_BEST_POLICY = False)")
    final = ("" if last_value is None else
             f"; the final policy (step {state.global_step}) has {last_value:.4g}")
    return (f"Best policy: {cfg.EARLY_STOPPING_METRIC} = {state.best_metric:.4g} at step "
            f"{state.best_step}, {where}{final}")


def holds_run(output_dir) -> bool:
    """Whether a training run has already written checkpoints or metrics into this folder."""
    metrics = Path(output_dir) / "logs" / "metrics.jsonl"
    return bool(list_checkpoints(output_dir)) or (metrics.exists() and metrics.stat().st_size > 0)


def list_checkpoints(output_dir) -> List[Tuple[int, Path]]:
    """Complete checkpoints under OUTPUT_DIR/checkpoints, oldest first by step number."""
    root = Path(output_dir) / "checkpoints"
    found = []
    for path in root.glob("step_*") if root.is_dir() else []:
        if path.name[5:].isdigit() and all((path / f).exists() for f in CHECKPOINT_FILES) and any(
                (path / "policy" / f).exists() for f in ("config.json", "adapter_config.json")):
            found.append((int(path.name[5:]), path))
    return sorted(found)


def rotate_checkpoints(root: Path, limit: int, keep: Optional[int]) -> None:
    """Keep the newest `limit` checkpoints (and step `keep`); called only after a new one is
    complete."""
    if not limit:
        return
    checkpoints = list_checkpoints(root.parent)
    for step, path in checkpoints[:-limit]:
        if step != keep:
            shutil.rmtree(path)
            logger.info(f"Removed old checkpoint {path} (SAVE_TOTAL_LIMIT = {limit})")


def load_checkpoint_state(path: Path, cfg: Config) -> dict:
    """Check a checkpoint folder and compare its settings; returns its training_state.pt (tensors
    only), with the checkpoint's settings under "config"."""
    critic = (() if cfg.ADVANTAGE_ESTIMATOR != "gae" else
              ("critic/adapter_config.json", "critic/value_head.safetensors") if cfg.SHARED_BASE
              else ("critic/config.json",))
    needed = CHECKPOINT_FILES + critic + (("policy_adapter/adapter_config.json",)
                                          if uses_adapters(cfg) else ("policy/config.json",))
    missing = [f for f in needed if not (path / f).exists()]
    if not path.is_dir() or missing:
        what = ("does not exist" if not path.is_dir()
                else f"is incomplete (missing {', '.join(missing)})")
        raise ConfigError(f"Checkpoint {path} {what}. {CHECKPOINT_HELP}")
    try:
        saved = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
        saved_cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except Exception as e:
        raise ConfigError(f"Checkpoint {path}: cannot read training_state.pt / config.json "
                          f"({first_line(e)}). {CHECKPOINT_HELP}") from None
    changed = [k for k in CONFIG_KEYS
               if k in saved_cfg and saved_cfg[k] != cfg[k] and k not in ("RESUME",)]
    models = [k for k in changed if k in STRUCTURE_KEYS and (
        k not in MODEL_KEYS or resolve_path(str(saved_cfg[k])) != resolve_path(str(cfg[k])))]
    if models:
        raise ConfigError(f"Checkpoint {path} was trained with other models: " + "; ".join(
            f"{k} was {saved_cfg[k]!r}, now {cfg[k]!r}" for k in models) + ". Resume with the "
            "same models, or set RESUME = 'no' to start a new run.")
    for k in changed:
        if k not in STRUCTURE_KEYS:
            logger.warning(f"Resuming with a changed setting: {k} was {saved_cfg[k]!r}, "
                           f"now {cfg[k]!r}")
    saved["config"] = saved_cfg
    return saved


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume keep exactly the rows up to the checkpoint's step (dropping those the interrupted
    run wrote after it, and a torn last line)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if (row := json_row(line)) is not None and row.get("step", math.inf) <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


def json_row(line: str) -> Optional[dict]:
    """One line of metrics.jsonl as a dict, or None for a torn or foreign line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def read_metrics(path: Path) -> List[dict]:
    return [row for line in path.read_text(encoding="utf-8").splitlines()
            if (row := json_row(line))]


class RunFiles:
    """The run's outputs, written by the main process only: training_config.json,
    logs/metrics.jsonl (one row per step and evaluation, flushed as written), logs/samples.jsonl,
    wandb, and the charts."""

    def __init__(self, cfg: Config, output_dir: Path, is_main: bool, log_path: Optional[Path]):
        self.cfg, self.output_dir, self.is_main, self.log_path = cfg, output_dir, is_main, log_path
        self.metrics_path = output_dir / "logs" / "metrics.jsonl"
        self.metrics_file = self.wandb_run = None

    def open(self, resumed_step: Optional[int]) -> None:
        """Start writing; a resumed run first cuts metrics.jsonl back to its checkpoint's step."""
        if not self.is_main:
            return
        try:
            (self.output_dir / "training_config.json").write_text(json.dumps(self.cfg, indent=2,
                                                                             ensure_ascii=False))
            if resumed_step is not None:
                truncate_metrics(self.metrics_path, resumed_step)
            self.metrics_file = open(self.metrics_path, "a", encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"OUTPUT_DIR = {str(self.output_dir)!r} is not writable "
                              f"({e.strerror}); choose another folder or fix its "
                              "permissions.") from None
        logger.info(f"Log: {self.log_path}; metrics: {self.metrics_path}")
        if self.cfg.USE_WANDB:
            self.wandb_run = start_wandb(self.cfg, self.output_dir,
                                         resuming=resumed_step is not None)

    def log(self, row: dict, step: int) -> None:
        if self.metrics_file is None:
            return
        self.metrics_file.write(json.dumps(json_safe(row), ensure_ascii=False) + "\n")
        self.metrics_file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def samples(self, step: int, samples: List[dict]) -> None:
        if not self.is_main or not samples:
            return
        with open(self.output_dir / "logs" / "samples.jsonl", "a", encoding="utf-8") as f:
            for sample in samples:
                f.write(json.dumps({"step": step, **sample}, ensure_ascii=False) + "\n")
        if self.wandb_run is not None:
            import wandb
            table = wandb.Table(columns=["step", "prompt", "response", "reward"],
                                data=[[step, s["prompt"], s["response"], s["reward"]]
                                      for s in samples])
            self.wandb_run.log({"eval/samples": table}, step=step)

    def close(self) -> None:
        """Flush and close the metrics, finish wandb, draw the charts from metrics.jsonl."""
        if self.metrics_file is None:
            return
        self.metrics_file.close()
        self.metrics_file = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
        try:
            for path in plot_metrics(read_metrics(self.metrics_path), self.output_dir):
                logger.info(f"Chart: {path}")
        except Exception as e:    # a chart must never cost the run its checkpoint or exit status
            logger.warning(f"Could not draw the charts: {type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------
# 14. Logging, metrics and charts
# ---------------------------------------------------------------------------------------------
class TqdmLoggingHandler(logging.Handler):
    """Echo log lines to the terminal without breaking the progress bar."""

    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(output_dir: Path, is_main: bool) -> Optional[Path]:
    """OUTPUT_DIR/logs/training_YYYYmmdd_HHMMSS.log plus the terminal, on the main process only."""
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.ERROR)
    console = TqdmLoggingHandler()
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(console)
    if not is_main:
        return None
    logs = output_dir / "logs"
    try:
        logs.mkdir(parents=True, exist_ok=True)
        path = logs / f"training_{time.strftime('%Y%m%d_%H%M%S')}.log"
        file_handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"OUTPUT_DIR = {str(output_dir)!r} is not writable ({e.strerror}); "
                          "choose another folder or fix its permissions.") from None
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(file_handler)
    return path


def progress_postfix(metrics: Dict[str, float]) -> str:
    """The guide's terminal line: PL:0.3245 VL:0.1234 R:1.56 A:0.23 E:0.678 LR:1.00e-06"""
    value = {k: metrics.get(k, math.nan)
             for k in ("ppo/loss/policy", "ppo/loss/value", "objective/score",
                       "ppo/advantages_mean", "objective/entropy", "lr/policy")}
    return (f"PL:{value['ppo/loss/policy']:.4f} VL:{value['ppo/loss/value']:.4f} "
            f"R:{value['objective/score']:.2f} A:{value['ppo/advantages_mean']:.2f} "
            f"E:{value['objective/entropy']:.3f} LR:{value['lr/policy']:.2e}")


def json_safe(value):
    """NaN / inf -> null, so that every line of metrics.jsonl is valid JSON for jq."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value


def start_wandb(cfg: Config, output_dir: Path, resuming: bool):
    """A wandb run whose id is kept in OUTPUT_DIR, so a resumed training continues the same run."""
    try:
        import wandb
    except ImportError:
        logger.warning("USE_WANDB = True but the wandb package is not installed "
                       "(pip install wandb); continuing without it.")
        return None
    id_file = output_dir / "wandb_run_id.txt"
    run_id = id_file.read_text().strip() if resuming and id_file.exists() else uuid.uuid4().hex[:12]
    try:
        run = wandb.init(project=cfg.WANDB_PROJECT, entity=cfg.WANDB_ENTITY, id=run_id,
                         resume="allow", name=cfg.WANDB_RUN_NAME or output_dir.name,
                         config=dict(cfg), dir=str(output_dir))
    except Exception as e:
        logger.warning(f"wandb could not start ({first_line(e)}); run `wandb login` "
                       "or set WANDB_MODE=offline. Continuing without it.")
        return None
    id_file.write_text(run_id)
    return run


HEALTH_PANELS = (  # ppo_metrics_with_entropy.png: (title, metrics drawn together, y label)
    ("Reward", ("objective/score", "eval/reward"), "score"),
    ("Accuracy against references", ("train/accuracy", "eval/accuracy"), "fraction correct"),
    ("KL(policy || reference) per response", ("objective/kl",), "nats"),
    ("Entropy per token", ("objective/entropy",), "nats"),
    ("Policy loss", ("ppo/loss/policy",), "loss"),
    ("Value loss", ("ppo/loss/value",), "loss"),
    ("Clip fractions", ("ppo/policy/clipfrac", "ppo/val/clipfrac"), "fraction of tokens"),
    ("Approximate KL(old || new) in the update", ("ppo/policy/approx_kl",), "nats"),
    ("Critic explained variance", ("ppo/val/explained_variance",), "1 = perfect"),
)


def smooth(values: Sequence[float], weight: float = 0.8) -> List[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def draw_series(ax, rows: List[dict], key: str) -> bool:
    """One metric on one axis: evaluations as points, step metrics raw (faint) and smoothed."""
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if not points:
        return False
    steps, values = zip(*points)
    if key.startswith("eval/") or 2 * len(points) < len(rows):          # evaluations: a point each
        ax.plot(steps, values, "o-", markersize=4, linewidth=1.2, label=f"{key} (evaluation)")
    else:
        line, = ax.plot(steps, values, linewidth=0.8, alpha=0.3)
        ax.plot(steps, smooth(values), linewidth=1.6, color=line.get_color(), label=key)
    return True


def plot_metrics(rows: List[dict], output_dir: Path) -> List[Path]:
    """training_metrics_detailed.png (every metric, a panel each) and ppo_metrics_with_entropy.png
    (PPO health)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if isinstance(r, dict) and "step" in r]
    names = sorted({k for r in rows for k, v in r.items()
                    if k not in ("step", "epoch") and isinstance(v, (int, float))},
                   key=lambda k: (not k.startswith(("eval/", "objective/")), k))
    layouts = (("training_metrics_detailed.png", [(k, (k,), "") for k in names]),
               ("ppo_metrics_with_entropy.png",
                [p for p in HEALTH_PANELS if any(k in names for k in p[1])]))
    outputs = []
    for filename, panels in layouts:
        if not panels:
            continue
        cols = min(4 if len(panels) > 9 else 3, len(panels))
        fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, squeeze=False,
                                 figsize=(4.6 * cols, 3.1 * math.ceil(len(panels) / cols)))
        for ax, (title, keys, ylabel) in zip(axes.flat, panels):
            drawn = [draw_series(ax, rows, key) for key in keys]
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("PPO step", fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.tick_params(labelsize=8)
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.grid(alpha=0.3)
            if sum(drawn) > 1:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        # fixed margins in inches: tight_layout costs a full draw
        width, height = fig.get_size_inches()
        fig.suptitle(f"{Path(output_dir).resolve().name}: "
                     + ("all metrics (faint: raw, solid: smoothed, dots: evaluations)"
                        if "detailed" in filename else "PPO health"),
                     fontsize=12, y=1 - 0.12 / height, va="top")
        fig.subplots_adjust(left=0.65 / width, right=1 - 0.2 / width, bottom=0.5 / height,
                            top=1 - 0.7 / height, wspace=0.32, hspace=0.55 * 3.1 / (3.1 - 0.55))
        path = Path(output_dir) / filename
        fig.savefig(path, dpi=90)
        plt.close(fig)
        outputs.append(path)
    return outputs


# ---------------------------------------------------------------------------------------------
# 15. Entry point
# ---------------------------------------------------------------------------------------------
def ask_yes_no(question: str) -> Optional[bool]:
    """y / n at a terminal; anything else asks again; None on end of input."""
    while True:
        try:
            answer = input(question).strip().lower()
        except EOFError:
            return None
        if answer in ("y", "yes"):
            return True
        if answer in ("n", "no"):
            return False


def choose_resume(cfg: Config) -> Tuple[Optional[str], Config, str]:
    """(checkpoint to resume or None, settings (a new OUTPUT_DIR when the user starts over), note
    for the log)."""
    if cfg.RESUME not in ("ask", "yes", "no"):
        return cfg.RESUME, cfg, f"Resuming from {cfg.RESUME} (RESUME)"
    checkpoints = list_checkpoints(cfg.OUTPUT_DIR)
    fresh = f"{cfg.OUTPUT_DIR.rstrip('/')}_{time.strftime('%Y%m%d_%H%M%S')}"
    start_over = (None, Config({**cfg, "OUTPUT_DIR": fresh}),
                  f"Starting a new run in {fresh}; the run in {cfg.OUTPUT_DIR} is left untouched")
    if not checkpoints or cfg.RESUME == "no":
        return start_over if holds_run(cfg.OUTPUT_DIR) else (None, cfg, "")
    latest = checkpoints[-1][1]
    if cfg.RESUME == "yes":
        return str(latest), cfg, f"Resuming from {latest} (RESUME = 'yes')"
    if not sys.stdin or not sys.stdin.isatty():
        return (str(latest), cfg,
                f"Found {latest}; no terminal to ask, so resuming from it (RESUME = 'ask')")
    print(f"发现检查点: checkpoints/{latest.name}\nFound checkpoint: {latest}")
    answer = ask_yes_no("是否从检查点恢复训练？(y/n): ")
    if answer is None:
        return str(latest), cfg, f"Found {latest}; no answer (end of input), so resuming from it"
    return (str(latest), cfg, f"Resuming from {latest}") if answer else start_over


def agree_on_resume(cfg: Config) -> Tuple[Optional[str], Config, str]:
    """The main process decides (and asks at the terminal); every other process follows its
    answer."""
    state = process_state(cfg)
    decision = [choose_resume(cfg) if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(decision)
    return decision[0]


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """`python ppo.py [run.json|run.yaml] [--NAME=value ...]` or `python ppo.py --plot OUTPUT_DIR`.
    Returns the exit status: 0 done, 1 training error, 2 bad settings or input, 130 / 143
    interrupted."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["--plot"]:
            return plot_run(argv[1:])
        cfg = parse_args(argv)
        validate_config(cfg)
        train_prompts, eval_prompts, references = load_data(cfg)
        resume, cfg, note = agree_on_resume(cfg)
        trainer = PPOTrainer(resume_from_checkpoint=resume, **cfg)
        if note:
            logger.info(note)
        trainer.references.update(references)
        trainer.train(train_prompts, eval_prompts)
        # a process group left to interpreter exit can abort in gloo
        trainer.accelerator.end_training()
        return 0
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        logger.error(str(e)) if logger.handlers else print(f"Error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        name = signal.Signals(e.signum).name if e.signum else "a signal to another process"
        print(f"Interrupted by {name}; " + (
            f"checkpoint: {e.checkpoint}. Run again to resume." if e.checkpoint else
            "it came before the first step was completed: nothing was trained, and no checkpoint "
            "was written. Run again to start over."), file=sys.stderr)
        return 128 + (e.signum or signal.SIGTERM)
    except KeyboardInterrupt:
        print("Interrupted; nothing of the step in flight was saved. Run again to resume from the "
              "last checkpoint.", file=sys.stderr)
        return 130
    except torch.cuda.OutOfMemoryError:
        print("Error: CUDA out of memory. Try BATCH_SIZE = 1, GRADIENT_ACCUMULATION_STEPS = 4 or "
              "more, GROUP_SIZE = 1, and a smaller MAX_NEW_TOKENS.", file=sys.stderr)
        return 1


def plot_run(args: List[str]) -> int:
    if len(args) != 1:
        raise ConfigError("Usage: python ppo.py --plot OUTPUT_DIR")
    metrics = Path(args[0]) / "logs" / "metrics.jsonl"
    if not metrics.exists():
        raise ConfigError(f"{metrics} does not exist: --plot needs the OUTPUT_DIR of a run.")
    for path in plot_metrics(read_metrics(metrics), Path(args[0])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
