"""Settings that no other test reaches, each shown through the trainer on real tiny models: remote code runs only
with TRUST_REMOTE_CODE; WEIGHT_DECAY is AdamW's decoupled decay; ADAPTIVE_KL_TARGET and ADAPTIVE_KL_HORIZON steer
the KL coefficient; REWARD_CLIP bounds the score before the missing-EOS penalty; REFERENCE_REWARD and ANSWER_MATCH
score scripted responses against the dataset's references; WANDB_PROJECT names a real (offline) wandb run;
LORA_ALPHA and LORA_DROPOUT reach the adapters and their saved config; GRADIENT_CHECKPOINTING recomputes the
policy's layers and leaves the gradient as it was."""
import dataclasses
import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import llama_config, save_model, tiny_settings, word_tokenizer

import ppo

FAST = dict(MAX_STEPS=1, GROUP_EPOCHES=1, MAX_NEW_TOKENS=6, EVAL_DATASETS=[])
PROMPTS = ["What is 3 + 4?", "What is 12 + 5?", "What is 41 + 9?", "What is 7 + 0?"]
DEFAULTS = ppo.default_config()


# -- helpers --------------------------------------------------------------------------------------
class Scripted(ppo.PPOTrainer):
    """The trainer with the guide's hook compute_rewards giving `scores` (zeros when None), and each sampled
    response replaced by the next of `responses`, its EOS flag by the next of `has_eos`: the scoring of a real
    rollout sees exactly these."""
    scores = responses = has_eos = None

    def compute_rewards(self, prompts, responses):
        return torch.zeros(len(responses)) if self.scores is None else torch.tensor(self.scores)

    def generate_response(self, prompts, max_new_tokens=None, do_sample=True):
        rollout = super().generate_response(prompts, max_new_tokens, do_sample)
        script = {}
        if self.responses is not None:
            script["responses"] = list(self.responses)
        if self.has_eos is not None:
            script["has_eos"] = torch.tensor(self.has_eos, device=rollout.has_eos.device)
        return dataclasses.replace(rollout, **script)


def scripted(tiny, out, scores=None, responses=None, has_eos=None, references=None, **settings):
    trainer = Scripted(**tiny_settings(tiny, out, **{**FAST, **settings}))
    trainer.scores, trainer.responses, trainer.has_eos = scores, responses, has_eos
    trainer.references.update(references or {})
    return trainer


def trainable(trainer):
    return [p for group in trainer.optimizer.param_groups for p in group["params"]]


def checkpointing(model) -> bool:
    """Whether a transformers model has activation (gradient) checkpointing on, under either name."""
    return (model.is_activation_checkpointing if hasattr(type(model), "is_activation_checkpointing")
            else model.is_gradient_checkpointing)


def wandb_records(path: Path):
    """The records of a .wandb transaction log (wandb's LevelDB-style log: a 7-byte ':W&B' header, then 32 KiB
    blocks of chunks, each a 7-byte header (crc, length, kind) and its bytes), as wandb's protobuf Records."""
    from wandb.proto import wandb_internal_pb2
    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:                 # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            return
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):                          # FULL, or LAST of a record cut into chunks
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


# -- models ---------------------------------------------------------------------------------------
CUSTOM_CONFIGURATION = '''from transformers import LlamaConfig


class CustomLlamaConfig(LlamaConfig):
    model_type = "custom_llama"
'''
CUSTOM_MODELING = '''from transformers import LlamaForCausalLM

from .configuration_custom import CustomLlamaConfig


class CustomLlamaForCausalLM(LlamaForCausalLM):
    config_class = CustomLlamaConfig
'''


def custom_code_policy(folder: Path) -> str:
    """A tiny Llama policy saved as a model type transformers does not know, whose config.json maps
    AutoConfig / AutoModelForCausalLM to Python files in the folder (as a hub repo with custom code does)."""
    from transformers import GenerationConfig, LlamaForCausalLM
    torch.manual_seed(0)
    tokenizer = word_tokenizer()
    policy = LlamaForCausalLM(llama_config(len(tokenizer)))
    policy.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    save_model(policy, tokenizer, folder)
    (folder / "configuration_custom.py").write_text(CUSTOM_CONFIGURATION)
    (folder / "modeling_custom.py").write_text(CUSTOM_MODELING)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom_llama", architectures=["CustomLlamaForCausalLM"],
                  auto_map={"AutoConfig": "configuration_custom.CustomLlamaConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomLlamaForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return str(folder)


def test_trust_remote_code_runs_the_model_folders_own_code(tiny, tmp_path):
    """A policy with custom code is a ConfigError naming ACTOR_MODEL by default, and with TRUST_REMOTE_CODE loads
    as the folder's own class, for the policy and its frozen reference."""
    folder = custom_code_policy(tmp_path / "custom_policy")
    with pytest.raises(ppo.ConfigError) as refused:
        ppo.PPOTrainer(**tiny_settings(tiny, tmp_path / "refused", ACTOR_MODEL=folder, **FAST))
    assert str(refused.value).startswith(f"ACTOR_MODEL = {folder!r}") and "custom code" in str(refused.value)
    assert "TRUST_REMOTE_CODE = True" in str(refused.value)
    trainer = ppo.PPOTrainer(**tiny_settings(tiny, tmp_path / "trusted", ACTOR_MODEL=folder,
                                             TRUST_REMOTE_CODE=True, **FAST))
    for model in (trainer.policy, trainer.ref.model):
        assert type(model).__name__ == "CustomLlamaForCausalLM"
        assert type(model).__module__.startswith("transformers_modules.")        # imported from the folder
        assert model.config.model_type == "custom_llama"


# -- optimisation ---------------------------------------------------------------------------------
def test_weight_decay_is_decoupled_adamw_decay(tiny, tmp_path):
    """WEIGHT_DECAY is both param groups' weight_decay, and one optimizer step on the same gradients moves every
    trained weight p by exactly -lr * WEIGHT_DECAY * p more than without it (AdamW's decoupled decay)."""
    decay, runs = 0.5, {}
    for weight_decay in (0.0, decay):
        trainer = ppo.PPOTrainer(**tiny_settings(
            tiny, tmp_path / f"wd_{weight_decay}", WEIGHT_DECAY=weight_decay, LEARNING_RATE=1e-2,
            CRITIC_LEARNING_RATE=2e-2, USE_LR_SCHEDULER=False, **FAST))
        groups = trainer.optimizer.param_groups
        assert [g["weight_decay"] for g in groups] == [weight_decay, weight_decay]
        params = trainable(trainer)
        before = [p.detach().clone() for p in params]
        generator = torch.Generator().manual_seed(0)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        _, stepped = trainer.optimizer_step()
        assert stepped
        rates = [g["lr"] for g in groups for _ in g["params"]]
        assert rates[0] == 1e-2 and rates[-1] == 2e-2
        runs[weight_decay] = before, [p.detach().clone() for p in params], rates
    (start, plain, rates), (start_wd, decayed, _) = runs[0.0], runs[decay]
    for p0, p0_wd, p1, p1_wd, lr in zip(start, start_wd, plain, decayed, rates):
        assert torch.equal(p0, p0_wd)
        torch.testing.assert_close(p1_wd - p1, -lr * decay * p0, rtol=1e-4, atol=1e-7)


def test_adaptive_kl_target_steers_the_coefficient(tiny, tmp_path):
    """With ADAPTIVE_KL, each step sets kl_coef to the controller's value at ADAPTIVE_KL_TARGET: a KL above a
    tiny target raises it, where the default 6-nat target would lower it."""
    target = 1e-6
    trainer = ppo.PPOTrainer(**tiny_settings(tiny, tmp_path / "out", ADAPTIVE_KL=True, ADAPTIVE_KL_TARGET=target,
                                             LEARNING_RATE=1e-3, **FAST))
    n, horizon = len(PROMPTS) * trainer.cfg.GROUP_SIZE, DEFAULTS.ADAPTIVE_KL_HORIZON
    for step in (1, 2):                   # step 1's KL is 0 (policy = reference); step 2's is the update's
        before, kl = trainer.state.kl_coef, trainer.train_step(PROMPTS)["objective/kl"]
        expected = ppo.adaptive_kl_coef(before, kl, n, target, horizon)
        assert trainer.state.kl_coef == pytest.approx(expected, rel=1e-12), f"step {step}"
    assert kl > 1.2 * target, f"step 2's KL {kl} must exceed the target for the test to see it"
    assert trainer.state.kl_coef == pytest.approx(before * (1 + 0.2 * n / horizon), rel=1e-12)
    default = ppo.adaptive_kl_coef(before, kl, n, DEFAULTS.ADAPTIVE_KL_TARGET, horizon)
    assert trainer.state.kl_coef != pytest.approx(default, rel=1e-6)


def test_adaptive_kl_horizon_sets_the_step_size(tiny, tmp_path):
    """With ADAPTIVE_KL, a step moves kl_coef by the controller's n / ADAPTIVE_KL_HORIZON share of its clipped
    error: 8 responses over a horizon of 16 move it by 10%, not the default horizon's 0.016%."""
    horizon = 16
    trainer = ppo.PPOTrainer(**tiny_settings(tiny, tmp_path / "out", ADAPTIVE_KL=True, ADAPTIVE_KL_HORIZON=horizon,
                                             **FAST))
    n, beta = len(PROMPTS) * trainer.cfg.GROUP_SIZE, DEFAULTS.KL_COEF
    kl = trainer.train_step(PROMPTS)["objective/kl"]
    target = DEFAULTS.ADAPTIVE_KL_TARGET
    assert trainer.state.kl_coef == pytest.approx(ppo.adaptive_kl_coef(beta, kl, n, target, horizon), rel=1e-12)
    assert trainer.state.kl_coef == pytest.approx(beta * (1 - 0.2 * n / horizon), rel=1e-12)   # KL << target
    assert trainer.state.kl_coef != pytest.approx(
        ppo.adaptive_kl_coef(beta, kl, n, target, DEFAULTS.ADAPTIVE_KL_HORIZON), rel=1e-6)


# -- scores ---------------------------------------------------------------------------------------
def test_reward_clip_bounds_scores_before_the_missing_eos_penalty(tiny, tmp_path):
    """Scores of compute_rewards are clipped to +- REWARD_CLIP, and only then does a response without EOS lose
    MISSING_EOS_PENALTY (so an unfinished response scores below the clip)."""
    raw = [10.0, 10.0, -10.0, -10.0, 1.5, -1.5, 0.5, -3.0]
    has_eos = [True, False] * 4
    trainer = scripted(tiny, tmp_path / "out", scores=raw, has_eos=has_eos, REWARD_CLIP=2.0,
                       MISSING_EOS_PENALTY=1.0)
    experience, _, _, metrics = trainer.make_experience(PROMPTS)
    expected = torch.tensor([2.0, 1.0, -2.0, -3.0, 1.5, -2.5, 0.5, -3.0])
    torch.testing.assert_close(experience.scores, expected, rtol=0, atol=0)
    assert metrics["objective/score"] == pytest.approx(expected.mean().item())
    assert metrics["objective/rm_score"] == pytest.approx(sum(raw) / len(raw))


def test_reference_reward_adds_to_matching_responses(tiny, tmp_path):
    """The score is compute_rewards (here 0) + REFERENCE_REWARD for a response whose answer matches the dataset
    reference of its prompt; a wrong answer, or a prompt without a reference, gets nothing."""
    prompts = PROMPTS[:2]
    responses = ["The answer is 7.", "The answer is 8.", "The answer is 17.", "17"]
    trainer = scripted(tiny, tmp_path / "out", responses=responses, has_eos=[True] * 4,
                       references={prompts[0]: "3+4=7. The answer is 7."}, REFERENCE_REWARD=2.5)
    experience, _, _, metrics = trainer.make_experience(prompts)
    torch.testing.assert_close(experience.scores, torch.tensor([2.5, 0.0, 0.0, 0.0]), rtol=0, atol=0)
    assert metrics["train/accuracy"] == 0.5          # of the two responses that have a reference
    assert metrics["objective/rm_score"] == 0.0


def test_answer_match_picks_the_rule(tiny, tmp_path):
    """The same four scripted responses to one reference are right under ANSWER_MATCH's own rule: "exact" (up to
    spaces), "contains" (the reference inside) or "last_number" (the last numbers agree), in train/accuracy and in
    the reference reward."""
    prompt, reference = PROMPTS[0], "3+4=7. The answer is 7."
    responses = ["3+4=7.  The answer is 7.", "So 3+4=7. The answer is 7. Done.", "7", "3+4=7. The answer is 8."]
    right = {"exact": [1, 0, 0, 0], "contains": [0, 1, 0, 0], "last_number": [1, 1, 1, 0],
             "boxed": [0, 0, 0, 0]}                         # nothing is boxed (test_math checks "boxed" itself)
    assert set(right) == set(ppo.CHOICES["ANSWER_MATCH"])
    for rule, correct in right.items():
        trainer = scripted(tiny, tmp_path / rule, responses=responses, has_eos=[True] * 4,
                           references={prompt: reference}, ANSWER_MATCH=rule, REFERENCE_REWARD=1.0, GROUP_SIZE=4,
                           ADVANTAGE_ESTIMATOR="grpo")
        experience, _, _, metrics = trainer.make_experience([prompt])
        torch.testing.assert_close(experience.scores, torch.tensor(correct, dtype=torch.float32), rtol=0, atol=0,
                                   msg=rule)
        assert metrics["train/accuracy"] == sum(correct) / 4, rule


# -- logging --------------------------------------------------------------------------------------
def test_wandb_project_names_the_run(tiny, tmp_path, monkeypatch):
    """A real wandb run (offline) of a training is in WANDB_PROJECT: the run object and the run record of its
    offline transaction log, which `wandb sync` uploads, both say so."""
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    trainer = ppo.PPOTrainer(**tiny_settings(tiny, out, USE_WANDB=True, WANDB_PROJECT="settings-project", **FAST))
    assert trainer.train() == "max_steps"
    assert trainer.files.wandb_run.project == "settings-project"
    logs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, logs
    runs = [record.run for record in wandb_records(logs[0]) if record.WhichOneof("record_type") == "run"]
    assert runs and {run.project for run in runs} == {"settings-project"}
    assert runs[0].run_id == (out / "wandb_run_id.txt").read_text().strip()


# -- memory and scale -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_checkpoint(tiny, tmp_path_factory):
    """A LoRA trainer (rank 4, alpha 12, dropout 0.25) and the checkpoint it saves at step 0."""
    out = tmp_path_factory.mktemp("lora") / "out"
    trainer = ppo.PPOTrainer(**tiny_settings(tiny, out, USE_LORA=True, LORA_R=4, LORA_ALPHA=12, LORA_DROPOUT=0.25,
                                             ADVANTAGE_ESTIMATOR="grpo", **FAST))
    return trainer, trainer.save_checkpoint()


def lora_layers(policy):
    from peft.tuners.lora import LoraLayer
    layers = [m for m in policy.modules() if isinstance(m, LoraLayer)]
    assert layers, "the policy has no LoRA layer"
    return layers


def test_lora_alpha_scales_the_adapters(lora_checkpoint):
    """LORA_ALPHA is the adapters' alpha: every LoRA layer scales its update by alpha / r = 12 / 4, and the
    checkpoint's adapter_config.json (what a resume and peft load) keeps lora_alpha 12."""
    trainer, path = lora_checkpoint
    assert trainer.policy.peft_config["default"].lora_alpha == 12
    assert {layer.scaling["default"] for layer in lora_layers(trainer.policy)} == {3.0}
    saved = json.loads((path / "policy_adapter" / "adapter_config.json").read_text())
    assert saved["lora_alpha"] == 12 and saved["r"] == 4


def test_lora_dropout_reaches_the_adapters(lora_checkpoint):
    """LORA_DROPOUT is the adapters' dropout: every LoRA layer has a live Dropout(p=0.25) (disable_dropout runs on
    the base model before the adapters exist), and the checkpoint's adapter_config.json keeps lora_dropout 0.25."""
    trainer, path = lora_checkpoint
    assert trainer.policy.peft_config["default"].lora_dropout == 0.25
    dropouts = [layer.lora_dropout["default"] for layer in lora_layers(trainer.policy)]
    assert all(isinstance(d, torch.nn.Dropout) and d.p == 0.25 for d in dropouts), dropouts[:2]
    saved = json.loads((path / "policy_adapter" / "adapter_config.json").read_text())
    assert saved["lora_dropout"] == 0.25


def test_gradient_checkpointing_recomputes_with_the_same_gradients(tiny, tmp_path):
    """GRADIENT_CHECKPOINTING turns checkpointing on in policy and critic only when set; with it, the layers of
    both run again in backward (a decoder layer's MLP starts twice per minibatch update, not once: the critic
    too is in training mode), and the update's gradients are those without it."""
    runs = {}
    for on in (False, True):
        trainer = ppo.PPOTrainer(**tiny_settings(tiny, tmp_path / f"gc_{on}", GRADIENT_CHECKPOINTING=on, **FAST))
        assert checkpointing(trainer.policy) is on and checkpointing(trainer.critic) is on
        experience, _, _, _ = trainer.make_experience(PROMPTS)
        calls = {"policy": [], "critic": []}
        hooks = [model.base_model.layers[0].mlp.register_forward_pre_hook(lambda *_, seen=seen: seen.append(1))
                 for model, seen in ((trainer.policy, calls["policy"]), (trainer.critic, calls["critic"]))]
        trainer.optimizer.zero_grad(set_to_none=True)
        try:
            trainer.minibatch_update(experience, [torch.arange(len(experience))])
        finally:
            for hook in hooks:
                hook.remove()
        grads = {n: p.grad.clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()
                 if p.grad is not None}
        runs[on] = experience, {k: len(v) for k, v in calls.items()}, grads
    (plain, plain_calls, plain_grads), (saved, saved_calls, saved_grads) = runs[False], runs[True]
    assert torch.equal(plain.response_ids, saved.response_ids) and torch.equal(plain.advantages, saved.advantages)
    assert plain_calls == {"policy": 1, "critic": 1} and saved_calls == {"policy": 2, "critic": 2}
    assert plain_grads.keys() == saved_grads.keys() and any(n.startswith("critic.") for n in plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(saved_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
