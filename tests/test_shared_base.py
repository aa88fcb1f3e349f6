"""SHARED_BASE: the policy and the critic are two LoRA adapters on one frozen base, the value head reads the
critic adapter's last hidden state, and the reference is the base with every adapter off. Each test would
fail on a wrong design: the shared model against separate models with the same weights, the gradients, the
adapter left active, gradient checkpointing's recompute, two processes, the small checkpoint that resumes
exactly, the policy saved merged or as an adapter; LOAD_IN_4BIT's error without bitsandbytes."""
import json
import os
import sys

import pytest
import torch
from conftest import ROOT, TORCHRUN, launch, tiny_settings
from safetensors.torch import load_file

import ppo

PROMPTS = ["What is 3 + 4?", "What is 12 + 5?", "What is 41 + 9?", "What is 7 + 0?"]


def shared(tiny, out, **overrides):
    return tiny_settings(tiny, out, **{"SHARED_BASE": True, "CRITIC_MODEL": None, "LORA_R": 4,
                                       "EVAL_DATASETS": [], **overrides})


def randomize_adapters(model, seed):
    """LoRA's B starts at 0 (the adapters change nothing): random weights make every comparison count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def separate_lora(tiny, trainer, adapter):
    """A fresh base with one LoRA adapter holding the trainer's `adapter` weights ("default" or "critic")."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    base = ppo.load_causal_lm("ACTOR_MODEL", tiny["policy"], trainer.cfg, torch.float32)
    model = get_peft_model(base, ppo.lora_config(trainer.cfg))
    set_peft_model_state_dict(model, get_peft_model_state_dict(trainer.policy, adapter_name=adapter))
    return model.eval()


def rows_of(trainer):
    trainer.prepare_prompts(PROMPTS)
    rollout = trainer.generate_response(PROMPTS)
    ids, mask = rollout.sequences()
    return rollout, ids, mask


def test_one_base_gives_what_separate_models_give(tiny, tmp_path):
    """With random adapters: the shared policy's log pi equals a separate LoRA policy's with the same adapter,
    its values a separate base + the critic's adapter + the value head, and its reference the bare base; a
    reference run with the policy's adapter on would differ (what this test would catch)."""
    trainer = ppo.PPOTrainer(**shared(tiny, tmp_path / "out"))
    model = trainer.accelerator.unwrap_model(trainer.model)
    randomize_adapters(trainer.policy, 0)
    rollout, ids, mask = rows_of(trainer)
    temperature = trainer.cfg.TEMPERATURE
    with torch.no_grad():
        logprobs, _, values = model(ids, mask, rollout.response_ids, temperature)
        reference = trainer.ref(ids, mask, rollout.response_ids, temperature)
        policy = separate_lora(tiny, trainer, "default")
        critic = separate_lora(tiny, trainer, "critic")
        base = ppo.load_causal_lm("ACTOR_MODEL", tiny["policy"], trainer.cfg, torch.float32).eval()
        t = rollout.response_ids.shape[1]
        expect_lp = ppo.logprobs_and_entropy(ppo.response_logits(policy, True, ids, mask, t), rollout.response_ids,
                                             temperature)[0]
        hidden = ppo.body(critic)(input_ids=ids, attention_mask=mask, use_cache=False,
                                  position_ids=ppo.position_ids_from_mask(mask)).last_hidden_state
        expect_values = trainer.critic(hidden).squeeze(-1)[:, -t - 1:-1]
        expect_ref = ppo.logprobs_and_entropy(ppo.response_logits(base, True, ids, mask, t), rollout.response_ids,
                                              temperature)[0]
    valid = rollout.response_mask
    torch.testing.assert_close(logprobs[valid], expect_lp[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values[valid], expect_values[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference[valid], expect_ref[valid], atol=1e-5, rtol=1e-5)
    assert (reference - logprobs)[valid].abs().max() > 1e-2, "the adapters changed nothing: a vacuous test"
    assert trainer.policy.active_adapter == "default"


def test_only_the_adapters_and_the_value_head_learn(tiny, tmp_path):
    """One minibatch update: gradients on both adapters and the value head, none on the base; the optimizer
    holds exactly those parameters, the policy's in the first group and the critic's in the second."""
    trainer = ppo.PPOTrainer(**shared(tiny, tmp_path / "out"))
    randomize_adapters(trainer.policy, 1)
    experience, _, _, _ = trainer.make_experience(PROMPTS[:2])
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.minibatch_update(experience, [torch.arange(len(experience))])
    model = trainer.accelerator.unwrap_model(trainer.model)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all("lora_" in n or n.startswith("critic.") for n in with_grad)
    assert any(".default." in n for n in with_grad) and any(".critic." in n for n in with_grad)
    assert "critic.weight" in with_grad
    groups = [{id(p) for p in g["params"]} for g in trainer.optimizer.param_groups]
    named = dict(model.named_parameters())
    assert groups[0] == {id(p) for n, p in named.items() if ".default." in n}
    assert groups[1] == {id(p) for n, p in named.items() if ".critic." in n or n.startswith("critic.")}
    trained = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    adapters = sum(p.numel() for n, p in named.items() if "lora_" in n)
    assert trained == adapters + trainer.critic.weight.numel()
    assert not any(p.requires_grad for n, p in named.items() if "lora_" not in n and not n.startswith("critic."))


def test_gradient_checkpointing_recomputes_with_the_right_adapter(tiny, tmp_path):
    """Checkpointed layers are recomputed in backward, after the critic's pass has switched back to the
    policy's adapter: the gradients equal those without checkpointing (a recompute with the wrong adapter
    would give the critic the policy's activations)."""
    grads = {}
    for on in (False, True):
        trainer = ppo.PPOTrainer(**shared(tiny, tmp_path / f"gc{on}", GRADIENT_CHECKPOINTING=on))
        randomize_adapters(trainer.policy, 2)
        torch.manual_seed(5)
        experience, _, _, _ = trainer.make_experience(PROMPTS[:2])
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.minibatch_update(experience, [torch.arange(len(experience))])
        grads[on] = {n: p.grad.clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()
                     if p.grad is not None}
    assert grads[False].keys() == grads[True].keys()
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-6, rtol=1e-4, msg=name)


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


def test_two_processes_give_the_gradient_of_one(tiny, tmp_path):
    """DDP over 2 processes (gloo), each with half the rollout: the adapters' and the head's synchronised
    gradients equal one process's over the whole rollout."""
    import dataclasses
    settings = shared(tiny, tmp_path / "out", STOP_TOKENS=["1", "2", "3"], MAX_NEW_TOKENS=10)
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
    launch(TORCHRUN, [driver], tmp_path, 29701, timeout=300)
    both = torch.load(tmp_path / "grads.pt", weights_only=True)
    assert single.keys() == both.keys() and any(".critic." in n for n in single)
    for name in single:
        torch.testing.assert_close(both[name], single[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("save_as", ["merged", "adapter"])
def test_checkpoints_hold_adapters_resume_exactly_and_save_the_final_policy(tiny, tmp_path, save_as):
    """A checkpoint holds the two adapters and the value head, not the base; a resume from step_1 ends with
    step_2's exact weights; the run's last policy/ (and best/) is a plain model or an adapter by
    SAVE_POLICY_AS, and AutoModelForCausalLM loads either with the trainer's logits."""
    import shutil
    from transformers import AutoModelForCausalLM
    settings = shared(tiny, tmp_path / "a", MAX_STEPS=2, SAVE_EVERY_N_STEPS=1, SAVE_POLICY_AS=save_as,
                      EVAL_DATASETS=tiny_settings(tiny, tmp_path)["EVAL_DATASETS"], EVAL_EVERY_N_STEPS=1)
    first = ppo.PPOTrainer(**settings)
    first.train()
    step_1 = tmp_path / "a" / "checkpoints" / "step_1"
    base_bytes = os.path.getsize(os.path.join(tiny["policy"], "model.safetensors"))
    assert not (step_1 / "policy" / "model.safetensors").exists()
    assert (step_1 / "policy" / "adapter_config.json").exists()
    assert (step_1 / "critic" / "adapter_config.json").exists()
    assert (step_1 / "critic" / "value_head.safetensors").exists()
    held = {str(f.relative_to(step_1)): list(load_file(f)) for f in step_1.rglob("*.safetensors")}
    assert sorted(held) == ["critic/adapter_model.safetensors", "critic/value_head.safetensors",
                            "policy/adapter_model.safetensors", "policy_adapter/adapter_model.safetensors"]
    assert all("lora_" in k for f, keys in held.items() if "adapter_model" in f for k in keys)
    assert held["critic/value_head.safetensors"] == ["weight"]
    trained = sum(p.numel() for g in first.optimizer.param_groups for p in g["params"])
    held_bytes = sum((step_1 / f).stat().st_size for f in held if not f.startswith("policy/"))
    assert held_bytes < 4 * trained + 20_000 < base_bytes       # float32 adapters + head (+ headers), no base
    final = tmp_path / "a" / "checkpoints" / "step_2" / "policy"
    assert (final / "model.safetensors").exists() == (save_as == "merged")
    assert (final / "adapter_config.json").exists() == (save_as == "adapter")
    assert ((tmp_path / "a" / "best" / "adapter_config.json").exists()) == (save_as == "adapter")
    from transformers import AutoTokenizer
    ids = first.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    # the guide's snippet on a checkpoint whose policy/ is only the adapter: transformers loads it through peft
    middle = AutoModelForCausalLM.from_pretrained(step_1 / "policy")
    assert AutoTokenizer.from_pretrained(step_1 / "policy")(PROMPTS[0], return_tensors="pt")["input_ids"].equal(ids)
    assert middle(ids).logits.isfinite().all()
    loaded = AutoModelForCausalLM.from_pretrained(final)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, first.policy(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    resumed = ppo.PPOTrainer(resume_from_checkpoint=str(tmp_path / "b" / "checkpoints" / "step_1"),
                             **{**settings, "OUTPUT_DIR": str(tmp_path / "b")})
    resumed.train()
    for part in ("policy_adapter/adapter_model.safetensors", "critic/adapter_model.safetensors",
                 "critic/value_head.safetensors"):
        a = load_file(tmp_path / "a" / "checkpoints" / "step_2" / part)
        b = load_file(tmp_path / "b" / "checkpoints" / "step_2" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_4bit_needs_bitsandbytes(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)           # as if it were not installed
    with pytest.raises(ppo.ConfigError, match="LOAD_IN_4BIT needs bitsandbytes: pip install bitsandbytes"):
        ppo.PPOTrainer(**shared(tiny, tmp_path / "out", LOAD_IN_4BIT=True))


@pytest.mark.parametrize("settings, words", [
    ({"SHARED_BASE": True, "CRITIC_MODEL": "data/tiny-reward"}, ["SHARED_BASE", "CRITIC_MODEL = None"]),
    ({"LOAD_IN_4BIT": True}, ["LOAD_IN_4BIT", "USE_LORA = True", "SHARED_BASE = True"]),
])
def test_layout_settings_that_cannot_work(settings, words):
    with pytest.raises(ppo.ConfigError) as error:
        ppo.validate_config(ppo.make_config(settings))
    assert all(w in str(error.value) for w in words), str(error.value)


class ScriptedMetric(ppo.PPOTrainer):
    """The evaluation's reward is the step (the best is the latest), or flat at 0.5 with `flat`."""
    flat = False

    def evaluate(self, eval_prompts):
        super().evaluate(eval_prompts)
        return {"reward": 0.5 if self.flat else float(self.state.global_step)}


@pytest.mark.parametrize("save_as", ["merged", "adapter"])
def test_a_roll_back_rebuilds_best_from_the_checkpoints_adapter(tiny, tmp_path, save_as):
    """3 steps (best at step 3), then a resume from step_1 whose evaluations never beat step 1's: best/ is
    rebuilt from step_1, whose policy/ is only an adapter: merged onto the base, or that adapter itself."""
    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    settings = shared(tiny, out, MAX_STEPS=3, SAVE_EVERY_N_STEPS=1, EVAL_EVERY_N_STEPS=1, LEARNING_RATE=1e-2,
                      SAVE_POLICY_AS=save_as, EVAL_DATASETS=tiny_settings(tiny, tmp_path)["EVAL_DATASETS"])
    ScriptedMetric(**settings).train()
    step_1 = out / "checkpoints" / "step_1"

    class Flat(ScriptedMetric):
        flat = True
    resumed = Flat(resume_from_checkpoint=str(step_1), **settings)
    resumed.train()
    assert resumed.state.best_step == 1
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 1
    if save_as == "adapter":
        best = load_file(out / "best" / "adapter_model.safetensors")
        at_1 = load_file(step_1 / "policy_adapter" / "adapter_model.safetensors")
        assert best.keys() == at_1.keys() and all(torch.equal(best[k], at_1[k]) for k in best)
        return
    from peft import PeftModel
    base = ppo.load_causal_lm("ACTOR_MODEL", tiny["policy"], resumed.cfg, torch.float32)
    expected = PeftModel.from_pretrained(base, str(step_1 / "policy_adapter")).eval()
    ids = resumed.tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out / "best")(ids).logits
        torch.testing.assert_close(got, expected(ids).logits, atol=1e-5, rtol=1e-4)
        assert (got - resumed.policy(input_ids=ids).logits).abs().max() > 1e-4   # not the resumed policy
