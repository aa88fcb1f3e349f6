"""Build the embedded default task of the PPO-RLHF trainer: small-number arithmetic.

Task
    Problems "What is 37 + 8?" with operands 0-99, at least one of them single-digit, + or -, and
    never a negative difference (2,855 such problems exist). Reference solutions read
    "37+8=45. The answer is 45.". 400 problems are held out for evaluation, the rest are train.

Design
    PPO must visibly improve a tiny policy on held-out problems in minutes, guided by nothing but a
    reward model. So the policy is made *systematically* wrong on purpose, in a way that sampling
    still escapes:
    * Policy (Llama, ~1M parameters, word-level tokenizer) is fine-tuned from scratch on solutions
      whose worked step is always right but whose final answer copies the first operand
      ("37+8=45. The answer is 37.") 75% of the time on additions and 35% on subtractions. Greedy
      decoding therefore gets additions wrong and subtractions right (accuracy ~1/3), while
      sampling finds the right answer often enough for PPO to learn from. A single kind of wrong
      answer matters: wrong answers spread over many values would leave the right one the most
      likely, and greedy decoding would already be right.
    * Reward model (same shape, LlamaForSequenceClassification) starts from the fine-tuned
      policy's backbone with a fresh scalar head and is trained with a pairwise Bradley-Terry loss
      (reference solution vs a negative) plus a small term keeping scores centred on 0. Negatives:
      final answer differs from the step (the systematic copy and other values), step and answer
      both wrong but consistent (so wrong arithmetic is not rewarded), truncated and garbled text.
    * Conventions shared with the trainer: the policy's prompt is the problem text (BOS + tokens,
      left padding) and it continues with " " + solution + EOS. The reward model reads
      `problem + " " + decoded response`; its own tokenizer appends EOS and pads on the right, so
      the score (HF pools at the last non-pad token, pad != eos) is always read at that EOS.

Command (from the repo root; ~6 minutes on 2 CPU cores, deterministic)
    python data/build_default.py
Writes data/arithmetic_{train,eval}.{jsonl,parquet}, data/tiny-policy/, data/tiny-reward/ and
data/build_report.json (also printed).
"""

import json
import random
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          GenerationConfig, LlamaConfig, LlamaForCausalLM,
                          LlamaForSequenceClassification, PreTrainedTokenizerFast)

# ----------------------------------------------------------------------------- settings
DATA = Path(__file__).resolve().parent
SEED = 0
N_EVAL = 400
P_WRONG = {"+": 0.75, "-": 0.35}          # chance that an SFT final answer copies the first operand
# lr 1e-3 decayed from the start: 3e-3 held high left the held-out step only ~65% right.
SFT_STEPS, SFT_BATCH, SFT_LR = 750, 64, 1e-3
RM_STEPS, RM_BATCH, RM_LR, RM_CENTER = 600, 64, 1e-3, 0.01
WARMUP = 30
# Negative types for the reward model and how often each is drawn during its training. Checking the
# arithmetic ("both_wrong") is the hard part: with this budget it stays ~60% right whatever its
# share, and a share of 40% or more stalls the easy kinds too (copy/other-final ~70% instead of
# ~99%), so it gets a quarter. The other kinds are learned within ~100 steps.
NEG_MIX = {"copy_operand": 0.30, "other_final": 0.25, "both_wrong": 0.25,
           "truncated": 0.10, "garbled": 0.10}
MAX_NEW_TOKENS = 24
PAD, BOS, EOS = 0, 1, 2

torch.set_num_threads(2)
T0 = time.time()
timings = {}


def lap(name, since):
    timings[name] = round(time.time() - since, 1)
    return time.time()


# ----------------------------------------------------------------------------- problems and texts
def all_problems():
    """Every (a, op, b): operands 0-99, at least one single-digit, difference never negative."""
    out = []
    for a in range(100):
        for b in range(100):
            if min(a, b) <= 9:
                out.append((a, "+", b))
                if a >= b:                  # a >= b with a single-digit operand forces b <= 9
                    out.append((a, "-", b))
    return out


def result(p):
    a, op, b = p
    return a + b if op == "+" else a - b


def problem_text(p):
    a, op, b = p
    return f"What is {a} {op} {b}?"


def solution_text(p, step=None, final=None):
    """Worked step then final answer; by default both correct, `final` defaults to the step."""
    a, op, b = p
    step = result(p) if step is None else step
    final = step if final is None else final
    return f"{a}{op}{b}={step}. The answer is {final}."


def wrong_value(r, rng):
    """A wrong non-negative number: mostly near r (plausible slips), sometimes anywhere."""
    while True:
        if rng.random() < 0.7:
            v = r + rng.choice([-1, 1]) * rng.randint(1, 10)
        else:
            v = rng.randint(0, 198)
        if v >= 0 and v != r:
            return v


PIECES = re.compile(r"[A-Za-z]+|\d| |[^A-Za-z\d ]")   # same split as the tokenizer


def negative(p, kind, rng):
    """A response worse than the reference solution, of the given kind."""
    a, r = p[0], result(p)
    if kind == "copy_operand":      # the policy's systematic error (a + 0 = a: use another value)
        return solution_text(p, final=a if a != r else wrong_value(r, rng))
    if kind == "other_final":
        return solution_text(p, final=wrong_value(r, rng))
    if kind == "both_wrong":        # consistent, wrong arithmetic: 37+8=46. The answer is 46.
        return solution_text(p, step=wrong_value(r, rng))
    good = solution_text(p)
    if kind == "truncated":         # cut anywhere, including the empty response
        return good[:rng.randrange(len(good))]
    pieces = PIECES.findall(good)   # garbled: shuffled pieces of the solution or random pieces
    if rng.random() < 0.5:
        rng.shuffle(pieces)
        return "".join(pieces)
    return "".join(rng.choice(pieces + list("0123456789 +-=.")) for _ in range(rng.randint(1, 18)))


def final_answer(text):
    nums = re.findall(r"\d+", text)
    return int(nums[-1]) if nums else None


# ----------------------------------------------------------------------------- tokenizers
def make_tokenizer(for_reward):
    """Word-level: each digit, space and symbol is a token, the four words are whole tokens.
    Policy: BOS only, left padding (generation). Reward: BOS ... EOS, right padding, so the last
    non-pad token, where the score is read, is always the EOS the reward model was trained on."""
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]       # ids 0-3: pad != eos
    vocab = {t: i for i, t in enumerate(specials + list("0123456789 +-=.?,")
                                        + ["What", "is", "The", "answer"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECES.pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()                          # decode(encode(s)) == s exactly
    end = " <eos>" if for_reward else ""
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A" + end, pair="<bos> $A $B" + end,
        special_tokens=[("<bos>", BOS), ("<eos>", EOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", padding_side="right" if for_reward else "left",
        model_input_names=["input_ids", "attention_mask"])


def llama_config(vocab_size, **extra):
    return LlamaConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, intermediate_size=512,
                       max_position_embeddings=256, tie_word_embeddings=False,
                       pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, **extra)


def pad_right(seqs, value):
    n = max(map(len, seqs))
    return torch.tensor([s + [value] * (n - len(s)) for s in seqs])


def schedule(total):
    """Short linear warm-up, then linear decay to 5% of the peak learning rate."""
    return lambda step: min((step + 1) / WARMUP, max(0.05, 1.0 - step / total))


# ----------------------------------------------------------------------------- 1. data sets
t = time.time()
problems = all_problems()
random.Random(SEED).shuffle(problems)
eval_problems, train_problems = problems[:N_EVAL], problems[N_EVAL:]
for split, probs in (("train", train_problems), ("eval", eval_problems)):
    rows = [{"problem": problem_text(p), "solution": solution_text(p)} for p in probs]
    with open(DATA / f"arithmetic_{split}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    pq.write_table(pa.table({"question": [r["problem"] for r in rows],
                             "answer": [r["solution"] for r in rows]}),
                   DATA / f"arithmetic_{split}.parquet")
tok, rm_tok = make_tokenizer(for_reward=False), make_tokenizer(for_reward=True)
t = lap("data_s", t)

# ----------------------------------------------------------------------------- 2. policy SFT
# Each step draws fresh train problems and decides afresh whether the final answer copies the
# first operand, so the model learns the error *rate* per operator rather than memorising which
# problem was wrong. Loss on the response (" " + solution + EOS) only.
torch.manual_seed(SEED)
policy = LlamaForCausalLM(llama_config(len(tok)))


def response_ids(text):
    return tok(" " + text, add_special_tokens=False)["input_ids"] + [EOS]


sft_items = []
for p in train_problems:
    right = response_ids(solution_text(p))
    wrong = response_ids(solution_text(p, final=p[0]))     # same as right when b == 0
    sft_items.append((tok(problem_text(p))["input_ids"], right, wrong, P_WRONG[p[1]]))

rng = random.Random(SEED + 1)
opt = torch.optim.AdamW(policy.parameters(), lr=SFT_LR, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(SFT_STEPS))
policy.train()
sft_losses = []
for step in range(SFT_STEPS):
    ids, labels = [], []
    for prompt, right, wrong, p_wrong in rng.choices(sft_items, k=SFT_BATCH):
        resp = wrong if rng.random() < p_wrong else right
        ids.append(prompt + resp)
        labels.append([-100] * len(prompt) + resp)
    # Right padding needs no attention mask: causal tokens never see the pads that follow them.
    loss = policy(input_ids=pad_right(ids, PAD), labels=pad_right(labels, -100)).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    opt.step(), sched.step(), opt.zero_grad()
    sft_losses.append(loss.item())
    if step % 100 == 0 or step == SFT_STEPS - 1:
        print(f"sft step {step:4d}  loss {loss.item():.4f}  ({time.time() - t:.0f}s)", flush=True)
policy.eval()
t = lap("sft_s", t)


# ----------------------------------------------------------------------------- 3. policy evaluation
@torch.no_grad()
def generate(problems_, temperature, seed=SEED):
    """Responses (decoded without special tokens, as the trainer does) and whether EOS came."""
    enc = tok([problem_text(p) for p in problems_], return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    mode = (dict(do_sample=False) if temperature == 0 else
            dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0))
    out = policy.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=PAD,
                          eos_token_id=EOS, **mode)
    new = out[:, enc["input_ids"].shape[1]:]
    return tok.batch_decode(new, skip_special_tokens=True), (new == EOS).any(1).tolist()


def grade(problems_, texts):
    return [final_answer(x) == result(p) for p, x in zip(problems_, texts)]


def mean(xs):
    xs = list(xs)
    return round(sum(xs) / max(1, len(xs)), 4)


greedy_texts, greedy_eos = generate(eval_problems, 0.0)
greedy_ok = grade(eval_problems, greedy_texts)
step_ok = [x.strip().startswith(solution_text(p).split(" ")[0])     # "37+8=45." comes first
           for p, x in zip(eval_problems, greedy_texts)]
policy_report = {
    "greedy_accuracy": mean(greedy_ok),
    "greedy_accuracy_add": mean(o for o, p in zip(greedy_ok, eval_problems) if p[1] == "+"),
    "greedy_accuracy_sub": mean(o for o, p in zip(greedy_ok, eval_problems) if p[1] == "-"),
    "greedy_step_accuracy": mean(step_ok),
    "greedy_eos_rate": mean(greedy_eos),
    "greedy_examples": [problem_text(p) + x for p, x in zip(eval_problems[:4], greedy_texts)],
}
sampled = {}
for temp in (1.0, 0.7):
    texts, eos = generate(eval_problems, temp)
    sampled[temp] = texts
    policy_report[f"sampled_T{temp}_accuracy"] = mean(grade(eval_problems, texts))
    policy_report[f"sampled_T{temp}_eos_rate"] = mean(eos)
print(json.dumps(policy_report, indent=1), flush=True)
t = lap("policy_eval_s", t)

# ----------------------------------------------------------------------------- 4. reward model
# Backbone copied from the fine-tuned policy (it already reads the arithmetic); `score` is fresh.
torch.manual_seed(SEED + 2)
rm = LlamaForSequenceClassification(llama_config(len(rm_tok), num_labels=1))
rm.model.load_state_dict(policy.model.state_dict())


def rm_scores(texts):
    enc = rm_tok(texts, return_tensors="pt", padding=True)
    return rm(**enc).logits.squeeze(-1)


rng = random.Random(SEED + 3)
kinds, weights = list(NEG_MIX), list(NEG_MIX.values())
opt = torch.optim.AdamW(rm.parameters(), lr=RM_LR, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(RM_STEPS))
rm.train()
for step in range(RM_STEPS):
    batch = rng.choices(train_problems, k=RM_BATCH)
    chosen = [problem_text(p) + " " + solution_text(p) for p in batch]
    rejected = [problem_text(p) + " " + negative(p, rng.choices(kinds, weights)[0], rng)
                for p in batch]
    s = rm_scores(chosen + rejected)
    sc, sr = s[:RM_BATCH], s[RM_BATCH:]
    # Bradley-Terry: chosen above rejected; the centring term keeps each pair's mean near 0.
    loss = -F.logsigmoid(sc - sr).mean() + RM_CENTER * ((sc + sr) ** 2).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
    opt.step(), sched.step(), opt.zero_grad()
    if step % 50 == 0 or step == RM_STEPS - 1:
        acc = (sc > sr).float().mean().item()
        print(f"rm step {step:4d}  loss {loss.item():.4f}  acc {acc:.2f}  "
              f"({time.time() - t:.0f}s)", flush=True)
rm.eval()
t = lap("rm_train_s", t)


# ----------------------------------------------------------------------------- 5. reward-model eval
def auc(pos, neg):
    """Chance a random right response outscores a random wrong one (ties count half)."""
    if not pos or not neg:
        return None
    return round(sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg)), 4)


rng = random.Random(SEED + 4)
with torch.no_grad():
    good = rm_scores([problem_text(p) + " " + solution_text(p) for p in eval_problems]).tolist()
    rm_report = {"mean_score_correct": mean(good), "pairwise_accuracy": {}, "mean_score": {}}
    for kind in NEG_MIX:
        negs = [negative(p, kind, rng) for p in eval_problems]
        bad = rm_scores([problem_text(p) + " " + x for p, x in zip(eval_problems, negs)]).tolist()
        wins = [g > b for g, b in zip(good, bad)]
        rm_report["pairwise_accuracy"][kind] = mean(wins)
        rm_report["mean_score"][kind] = mean(bad)
        if kind == "both_wrong":    # slips of less than 10 are the hard part of checking arithmetic
            near = [abs(final_answer(x) - result(p)) < 10 for p, x in zip(eval_problems, negs)]
            acc = rm_report["pairwise_accuracy"]
            acc["both_wrong_off_by_1_to_9"] = mean(w for w, n in zip(wins, near) if n)
            acc["both_wrong_off_by_10_or_more"] = mean(w for w, n in zip(wins, near) if not n)
    # The policy's own responses, exactly as the trainer will present them.
    for name, texts in (("greedy", greedy_texts), ("sampled_T1.0", sampled[1.0])):
        scores = rm_scores([problem_text(p) + x for p, x in zip(eval_problems, texts)]).tolist()
        ok = grade(eval_problems, texts)
        right = [s for s, o in zip(scores, ok) if o]
        wrong = [s for s, o in zip(scores, ok) if not o]
        rm_report[f"policy_{name}"] = {
            "auc": auc(right, wrong),
            "accuracy_at_0": mean((s > 0) == o for s, o in zip(scores, ok)),
            "mean_score_right": mean(right), "mean_score_wrong": mean(wrong)}
print(json.dumps(rm_report, indent=1), flush=True)
t = lap("rm_eval_s", t)

# ----------------------------------------------------------------------------- 6. save and check
policy.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
for model, tokenizer, name in ((policy, tok, "tiny-policy"), (rm, rm_tok, "tiny-reward")):
    model.save_pretrained(DATA / name)
    tokenizer.save_pretrained(DATA / name)

# Reload through the Auto classes, as the trainer will, and check nothing was lost on the way.
probe = [problem_text(p) + " " + solution_text(p) for p in eval_problems[:8]]
with torch.no_grad():
    p2, t2 = (AutoModelForCausalLM.from_pretrained(DATA / "tiny-policy"),
              AutoTokenizer.from_pretrained(DATA / "tiny-policy"))
    r2, rt2 = (AutoModelForSequenceClassification.from_pretrained(DATA / "tiny-reward"),
               AutoTokenizer.from_pretrained(DATA / "tiny-reward"))
    enc = t2(probe, return_tensors="pt", padding=True)
    assert torch.allclose(p2(**enc).logits, policy(**enc).logits, atol=1e-5)
    assert torch.allclose(r2(**rt2(probe, return_tensors="pt", padding=True)).logits.squeeze(-1),
                          rm_scores(probe), atol=1e-5)
    assert rt2(probe[0])["input_ids"][-1] == EOS and t2(probe[0])["input_ids"][-1] != EOS
t = lap("save_s", t)


def folder_mb(path):
    return round(sum(f.stat().st_size for f in path.iterdir()) / 2**20, 2)


timings["total_s"] = round(time.time() - T0, 1)
report = {
    "data": {"train": len(train_problems), "eval": len(eval_problems),
             "eval_additions": sum(p[1] == "+" for p in eval_problems),
             "sft_p_wrong_final": P_WRONG},
    "sft": {"steps": SFT_STEPS, "batch": SFT_BATCH, "lr": SFT_LR,
            "final_loss": round(sum(sft_losses[-50:]) / 50, 4)},
    "policy": policy_report,
    "reward_model": rm_report,
    "params": {"policy": sum(q.numel() for q in policy.parameters()),
               "reward": sum(q.numel() for q in rm.parameters())},
    "folder_mb": {n: folder_mb(DATA / n) for n in ("tiny-policy", "tiny-reward")},
    "timings": timings,
}
(DATA / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
