"""Scale and memory: torchrun (gloo on CPU), gradient equivalence across processes, LoRA, critic-free runs."""
import dataclasses
import json
import os
import subprocess
import sys

import torch
from conftest import ROOT, TORCHRUN, launch, llama_config, save_model, tiny_settings, word_tokenizer

import ppo

PROMPTS = ["What is 3 + 4?", "What is 12 + 5?", "What is 41 + 9?", "What is 7 + 0?"]
def run_torchrun(args, tmp_path, port):
    return launch(TORCHRUN, args, tmp_path, port)


def test_torchrun_trains_writes_one_set_of_outputs_and_resumes(tiny, tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "run.json"
    config.write_text(json.dumps(tiny_settings(tiny, out, MAX_STEPS=3, SAVE_EVERY_N_STEPS=2, EVAL_EVERY_N_STEPS=2)))
    result = run_torchrun([ROOT / "ppo.py", config], tmp_path, 29561)
    assert "on 2 process(es)" in result.stderr
    assert len(list((out / "logs").glob("training_*.log"))) == 1
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]                      # one writer, not two
    samples = [json.loads(line) for line in (out / "logs" / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [0, 2, 3] and len(samples) == 3 * 2   # rank 0's 2 eval prompts
    state = torch.load(out / "checkpoints" / "step_2" / "training_state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert state["state"]["position"] == 2 * 2 * 4                      # 2 steps x 2 processes x BATCH_SIZE
    # Resume under torchrun from step 2 (step 3 removed), to step 4.
    import shutil
    shutil.rmtree(out / "checkpoints" / "step_3")
    result = run_torchrun([ROOT / "ppo.py", config, "--RESUME=yes", "--MAX_STEPS=4"], tmp_path, 29562)
    assert "Resumed from" in result.stderr and "step 2" in result.stderr
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert (out / "checkpoints" / "step_4" / "training_state.pt").exists()


DRIVER = """
import json, sys, torch
sys.path.insert(0, {root!r})
import ppo
settings = json.load(open({config!r}))
trainer = ppo.PPOTrainer(**settings)
experience = ppo.Experience(**torch.load({rollout!r}, weights_only=True))
rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
shard = experience.select(torch.arange(rank, len(experience), world))
trainer.minibatch_update(shard, [torch.arange(len(shard))])
grads = {{n: p.grad.clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}}
if rank == 0:
    torch.save(grads, {grads!r})
trainer.accelerator.wait_for_everyone()
trainer.accelerator.end_training()
"""


def test_two_processes_give_the_gradient_of_one(tiny, tmp_path, make_trainer):
    """DDP over 2 processes, each with half the rollout: the synchronised gradient equals one process's
    gradient over the whole rollout (the loss is normalised by the token count of all processes)."""
    settings = tiny_settings(tiny, tmp_path / "out", STOP_TOKENS=["1", "2", "3"], MAX_NEW_TOKENS=10)
    trainer = ppo.PPOTrainer(**settings)
    rollout, _, _, _ = trainer.make_experience(PROMPTS)
    lengths = rollout.response_mask.sum(1)
    assert lengths[0::2].sum() != lengths[1::2].sum(), "want unequal token counts on the two processes"
    torch.save({f.name: getattr(rollout, f.name) for f in dataclasses.fields(rollout)}, tmp_path / "rollout.pt")
    trainer.minibatch_update(rollout, [torch.arange(len(rollout))])
    single = {n: p.grad.clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}
    (tmp_path / "run.json").write_text(json.dumps(settings))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), config=str(tmp_path / "run.json"),
                                    rollout=str(tmp_path / "rollout.pt"), grads=str(tmp_path / "grads.pt")))
    run_torchrun([driver], tmp_path, 29563)
    both = torch.load(tmp_path / "grads.pt", weights_only=True)
    assert single.keys() == both.keys()
    for name in single:
        torch.testing.assert_close(both[name], single[name], atol=1e-6, rtol=1e-4, msg=name)
    assert any(g.abs().sum() > 0 for g in single.values())


def test_critic_free_estimators_load_no_critic(make_trainer, tmp_path):
    for estimator in ("grpo", "rloo", "reinforce++"):
        trainer = make_trainer(ADVANTAGE_ESTIMATOR=estimator, GROUP_SIZE=4, MAX_STEPS=1, SAVE_EVERY_N_STEPS=1,
                               EVAL_DATASETS=[], OUTPUT_DIR=str(tmp_path / estimator))
        assert trainer.critic is None and len(trainer.optimizer.param_groups) == 1
        rollout, _, _, metrics = trainer.make_experience(PROMPTS[:2])
        mask = rollout.response_mask
        kl = ppo.kl_penalty(rollout.old_logprobs, rollout.ref_logprobs, trainer.cfg.KL_ESTIMATOR)
        total = rollout.scores - trainer.state.kl_coef * torch.where(mask, kl, 0.0).sum(1)    # (B,)
        if estimator == "reinforce++":       # token returns of the shaped rewards, whitened over the batch
            rewards = ppo.shape_rewards(rollout.scores, kl, mask, trainer.state.kl_coef)
            returns = torch.stack([torch.flip(torch.cumsum(torch.flip(torch.where(mask[i], rewards[i], 0.0), [0]), 0),
                                              [0]) for i in range(len(mask))])
            valid = returns[mask]
            expected = torch.where(mask, (returns - valid.mean()) / (valid.var() + 1e-8).sqrt(), 0.0)
        else:
            groups = total.view(-1, 4)
            if estimator == "grpo":
                per_sequence = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-6)
            else:
                per_sequence = groups - (groups.sum(1, keepdim=True) - groups) / 3
            expected = torch.where(mask, per_sequence.reshape(-1, 1), 0.0)
        torch.testing.assert_close(rollout.advantages, expected, atol=1e-5, rtol=1e-5)
        trainer.train()
        step = trainer.output_dir / "checkpoints" / "step_1"
        assert (step / "policy").is_dir() and not (step / "critic").exists()
        row = json.loads((trainer.output_dir / "logs" / "metrics.jsonl").read_text().splitlines()[-1])
        assert "ppo/loss/value" not in row and "ppo/loss/policy" in row


def test_lora_trains_few_parameters_and_saves_a_plain_model(make_trainer):
    trainer = make_trainer(USE_LORA=True, LORA_R=2, LORA_TARGET_MODULES="q_proj,v_proj", MAX_STEPS=2,
                           SAVE_EVERY_N_STEPS=1, EVAL_DATASETS=[])
    policy = trainer.policy
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    total = sum(p.numel() for p in policy.parameters())
    assert trainable < 0.1 * total and all("lora_" in n for n, p in policy.named_parameters() if p.requires_grad)
    assert trainer.ref.model is policy                                    # no second copy for the reference
    base_before = {n: p.clone() for n, p in policy.named_parameters() if not p.requires_grad}
    trainer.train()
    assert all(torch.equal(p, base_before[n]) for n, p in policy.named_parameters() if not p.requires_grad)
    from transformers import AutoModelForCausalLM
    step = trainer.output_dir / "checkpoints" / "step_2"
    merged = AutoModelForCausalLM.from_pretrained(step / "policy")
    ids = trainer.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, policy(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    resumed = make_trainer(USE_LORA=True, LORA_R=2, LORA_TARGET_MODULES="q_proj,v_proj", MAX_STEPS=2,
                           EVAL_DATASETS=[])
    resumed = ppo.PPOTrainer(resume_from_checkpoint=str(step), **resumed.cfg)
    assert all(torch.equal(a, b) for a, b in zip(resumed.policy.parameters(), policy.parameters()))


MEMORY_DRIVER = """
import json, re, sys
sys.path.insert(0, {root!r})
import ppo
trainer = ppo.PPOTrainer(**json.load(open(sys.argv[1])))
prompts, _, _ = ppo.load_data(trainer.cfg)
trainer.prepare_prompts(prompts[:4])
trainer.train_step(prompts[:4])                      # one PPO step, without the charts drawn at the end of train()
trainable = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
# VmHWM is this process's own peak; ru_maxrss can report the parent's (pytest's) peak inherited over the spawn
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
print(json.dumps({{"peak_rss_mb": peak_kb / 1024, "trainable": trainable}}))
"""


def test_lora_uses_less_memory_than_full_training(tiny, tmp_path):
    """A 13M-parameter policy: LoRA holds no reference copy, no policy gradients and no policy Adam state."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    tok = word_tokenizer()
    big = LlamaForCausalLM(llama_config(len(tok), hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                        num_attention_heads=8, num_key_value_heads=8))
    path = save_model(big, tok, tmp_path / "big")
    driver = tmp_path / "memory.py"
    driver.write_text(MEMORY_DRIVER.format(root=str(ROOT)))
    results = {}
    for lora in (False, True):
        settings = tiny_settings(tiny, tmp_path / f"out_{lora}", ACTOR_MODEL=path, USE_LORA=lora, MAX_STEPS=1,
                                 EVAL_DATASETS=[], GROUP_EPOCHES=1)
        (tmp_path / f"run_{lora}.json").write_text(json.dumps(settings))
        out = subprocess.run([sys.executable, str(driver), str(tmp_path / f"run_{lora}.json")], capture_output=True,
                             text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-3000:]
        results[lora] = json.loads(out.stdout.strip().splitlines()[-1])
    print("memory:", results)
    assert results[True]["trainable"] < 0.1 * results[False]["trainable"]
    assert results[True]["peak_rss_mb"] < results[False]["peak_rss_mb"] - 100
