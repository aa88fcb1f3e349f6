"""The policy-gradient variants inside the trainer, on a random high-entropy policy: every aggregation mode and
policy loss gives the gradient of one process over two gloo processes with unequal shares; dynamic sampling
trains on exactly the informative groups; the KL in the loss adds exactly its term; the overlong penalty lands
in the score; a bad combination is exit 2 before any model loads."""
import dataclasses
import json

import pytest
import torch
from conftest import ROOT, TORCHRUN, aggregated, high_entropy_policy, launch, tiny_settings

import ppo

PROMPTS = ["What is 3 + 4?", "What is 12 + 5?", "What is 41 + 9?", "What is 7 + 0?"]
# (name, settings): every LOSS_AGGREGATION with clip-higher and dual clip, CISPO, GSPO, the KL in the loss
GRADIENT_VARIANTS = [(f"ppo-{mode}", {"LOSS_AGGREGATION": mode, "CLIP_RANGE_HIGH": 0.28, "DUAL_CLIP": 3.0})
                     for mode in ppo.CHOICES["LOSS_AGGREGATION"]] + [
    ("cispo", {"POLICY_LOSS": "cispo", "CLIP_RANGE_HIGH": 0.28}),
    ("gspo", {"POLICY_LOSS": "gspo", "LOSS_AGGREGATION": "seq-mean-token-mean", "CLIP_RANGE": 3e-4,
              "CLIP_RANGE_HIGH": 4e-4}),
    ("kl-k3-sum-norm", {"KL_IN_LOSS": True, "KL_ESTIMATOR": "k3", "LOSS_AGGREGATION": "seq-mean-token-sum-norm"}),
    ("kl-k2-seq-mean", {"KL_IN_LOSS": True, "KL_ESTIMATOR": "k2", "LOSS_AGGREGATION": "seq-mean-token-mean"}),
    # VAPO's NLL on the positive examples (a score threshold that some rows pass)
    ("positive-lm-seq-mean", {"POSITIVE_LM_COEF": 0.5, "POSITIVE_LM_THRESHOLD": -0.5,
                              "LOSS_AGGREGATION": "seq-mean-token-mean"}),
    ("positive-lm-token-mean", {"POSITIVE_LM_COEF": 0.5, "POSITIVE_LM_THRESHOLD": -0.5})]
TRAINED = [True, False, True, True, False, True, True, True]     # rows kept by dynamic sampling
SPLIT = 3                                                          # rank 0: rows 0-2, rank 1: rows 3-7


@pytest.fixture(scope="module")
def random_policy(tmp_path_factory):
    """A high-entropy policy, so clipped ratios and KL terms are large."""
    return high_entropy_policy(tmp_path_factory.mktemp("random_policy") / "policy", seed=3)


def variant_trainer(tiny, random_policy, out, **settings):
    return ppo.PPOTrainer(**tiny_settings(tiny, out, **{"ACTOR_MODEL": random_policy, "MAX_NEW_TOKENS": 6,
                                                       "STOP_TOKENS": ["1", "2"], **settings}))


def off_policy(experience, trained=TRAINED):
    """The experience with log pi_old and log pi_ref moved by noise (std 0.5 nats), so that ratios reach
    past every clip and the KL terms and their gradients are far from 0; and with some rows dropped."""
    g = torch.Generator().manual_seed(5)
    noise = [torch.randn(experience.old_logprobs.shape, generator=g) * 0.5 for _ in range(2)]
    mask = experience.response_mask
    return dataclasses.replace(experience, old_logprobs=experience.old_logprobs + noise[0] * mask,
                               ref_logprobs=experience.ref_logprobs + noise[1] * mask,
                               trained=torch.tensor(trained))


def gradients(trainer, experience, micro_batches, variant):
    trainer.cfg.update(variant)
    trainer.optimizer.zero_grad(set_to_none=True)
    sums = trainer.minibatch_update(experience, micro_batches)
    grads = {n: p.grad.clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()
             if p.grad is not None}
    trainer.optimizer.zero_grad(set_to_none=True)
    return grads, {k: float(v) for k, v in sums.items()}


DRIVER = """
import json, sys, torch
sys.path.insert(0, {root!r})
import ppo
settings = json.load(open({config!r}))
variants = json.load(open({variants!r}))
trainer = ppo.PPOTrainer(**settings)
experience = ppo.Experience(**torch.load({experience!r}, weights_only=True))
rank = trainer.backend.rank
rows = torch.arange({split}) if rank == 0 else torch.arange({split}, len(experience))
shard = experience.select(rows)
pieces = [rows[:1] - rows[0], torch.arange(1, len(rows))]       # accumulation inside each process too
results = {{}}
for name, variant in variants:
    trainer.cfg.update(variant)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.minibatch_update(shard, pieces)
    results[name] = {{n: p.grad.clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()
                     if p.grad is not None}}
if rank == 0:
    torch.save(results, {grads!r})
trainer.accelerator.wait_for_everyone()
trainer.accelerator.end_training()
"""


def test_every_variant_gives_the_gradient_of_one_process(tiny, random_policy, tmp_path):
    """For every aggregation mode and policy loss, with rows dropped by dynamic sampling: 2 gloo processes
    holding 3 and 5 rows (unequal tokens and sequences), each accumulating 2 micro-batches, give the gradient
    of one process over all 8 rows in one piece; so do 8 micro-batches of one row in one process."""
    settings = tiny_settings(tiny, tmp_path / "out", ACTOR_MODEL=random_policy, MAX_NEW_TOKENS=6,
                             STOP_TOKENS=["1", "2"], ADVANTAGE_ESTIMATOR="grpo", CRITIC_MODEL=tiny["reward"])
    trainer = ppo.PPOTrainer(**settings)
    experience, _, _, _ = trainer.make_experience(PROMPTS)
    experience = off_policy(experience)
    mask = experience.response_mask
    assert mask[:SPLIT].sum() != mask[SPLIT:].sum() and mask.sum(1).unique().numel() > 1
    reference = {}
    for name, variant in GRADIENT_VARIANTS:
        whole, sums = gradients(trainer, experience, [torch.arange(8)], variant)
        rows, _ = gradients(trainer, experience, [torch.tensor([i]) for i in range(8)], variant)
        assert sums["pg_clipped"] > 0, f"{name}: no clipped token, the test would not see the clipped side"
        for n in whole:
            torch.testing.assert_close(rows[n], whole[n], atol=1e-6, rtol=1e-4, msg=f"{name} {n}")
        reference[name] = whole
    torch.save({f.name: getattr(experience, f.name) for f in dataclasses.fields(experience)},
               tmp_path / "experience.pt")
    (tmp_path / "run.json").write_text(json.dumps(settings))
    (tmp_path / "variants.json").write_text(json.dumps(GRADIENT_VARIANTS))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), config=str(tmp_path / "run.json"), split=SPLIT,
                                    variants=str(tmp_path / "variants.json"),
                                    experience=str(tmp_path / "experience.pt"), grads=str(tmp_path / "grads.pt")))
    launch(TORCHRUN, [driver], tmp_path, 29581, timeout=300)
    both = torch.load(tmp_path / "grads.pt", weights_only=True)
    for name, _ in GRADIENT_VARIANTS:
        assert both[name].keys() == reference[name].keys()
        for n in reference[name]:
            torch.testing.assert_close(both[name][n], reference[name][n], atol=1e-6, rtol=1e-4, msg=f"{name} {n}")
    differ = [not torch.allclose(reference[a][n], reference[b][n]) for a, b in
              [("ppo-token-mean", "ppo-seq-mean-token-mean"), ("ppo-token-mean", "cispo")] for n in reference[a]]
    assert any(differ), "the variants must change the gradient, or this test compares nothing"


def test_dynamic_sampling_trains_on_exactly_the_informative_groups(tiny, random_policy, tmp_path):
    """Groups whose responses all scored the same are out of the loss and out of every normaliser: the update's
    gradient equals the gradient over the other groups alone; a step where every group scored the same takes no
    optimizer step and is not counted as a NaN skip, and neither does a minibatch with no row to train."""
    class SameScoreForSomePrompts(ppo.PPOTrainer):
        constant = ()

        def compute_rewards(self, prompts, responses):
            scores = super().compute_rewards(prompts, responses)
            return torch.where(torch.tensor([p in self.constant for p in prompts]), 0.5, scores)

    settings = tiny_settings(tiny, tmp_path / "out", ACTOR_MODEL=random_policy, MAX_NEW_TOKENS=6, STOP_TOKENS=["1"],
                             ADVANTAGE_ESTIMATOR="grpo", GROUP_SIZE=2, DYNAMIC_SAMPLING=True, KL_COEF=0.0,
                             LOSS_AGGREGATION="seq-mean-token-mean", EVAL_DATASETS=[], MISSING_EOS_PENALTY=0.0)
    trainer = SameScoreForSomePrompts(**settings)
    trainer.constant = (PROMPTS[0], PROMPTS[2])
    experience, _, _, metrics = trainer.make_experience(PROMPTS)
    assert experience.trained.tolist() == [False, False, True, True, False, False, True, True]
    assert float(metrics["ppo/trained_fraction"]) == 0.5
    kept = experience.select(torch.tensor([2, 3, 6, 7]))
    for aggregation in ppo.CHOICES["LOSS_AGGREGATION"]:
        variant = {"LOSS_AGGREGATION": aggregation, "ENTROPY_COEF": 0.05}
        full, sums = gradients(trainer, experience, [torch.arange(8)], variant)
        alone, sums_alone = gradients(trainer, kept, [torch.arange(4)], variant)
        for n in full:
            torch.testing.assert_close(full[n], alone[n], atol=1e-7, rtol=1e-5, msg=f"{aggregation} {n}")
        assert sums.keys() == sums_alone.keys()
        for key in sums:
            assert sums[key] == pytest.approx(sums_alone[key], rel=1e-5, abs=1e-6), key
    trainer.optimizer.zero_grad(set_to_none=True)
    assert trainer.minibatch_update(experience, [torch.tensor([0, 1]), torch.tensor([4, 5])]) is None
    assert all(p.grad is None for p in trainer.model.parameters())      # no forward, no backward, no step
    trainer.constant = tuple(PROMPTS)
    before = (trainer.state.optimizer_steps, trainer.state.consecutive_skips)
    step = trainer.train_step(PROMPTS)
    assert step["ppo/trained_fraction"] == 0 and step["ppo/skipped_optimizer_steps"] == 2     # GROUP_EPOCHES 2
    assert step["ppo/empty_minibatches"] == 2
    assert (trainer.state.optimizer_steps, trainer.state.consecutive_skips) == before
    # one minibatch with nothing to train beside one that trains, in a run with no critic (one optimizer group)
    trainer.constant = (PROMPTS[0], PROMPTS[2])
    update = trainer.ppo_update(experience, [[[torch.tensor([0, 1, 4, 5])], [torch.tensor([2, 3, 6, 7])]]])
    assert update["ppo/empty_minibatches"] == 1 and trainer.state.optimizer_steps == before[0] + 1
    assert torch.isfinite(torch.as_tensor(update["grad_norm/policy"]))


def test_kl_in_the_loss_leaves_the_reward_and_adds_exactly_its_term(tiny, random_policy, tmp_path):
    """KL_IN_LOSS: the advantages are those of the score alone (no KL penalty in the reward), and the update's
    gradient is the gradient without the KL term plus KL_LOSS_COEF x the gradient of the aggregated KL of the
    current policy to the reference, for k1, k2 and k3."""
    trainer = variant_trainer(tiny, random_policy, tmp_path / "out", ADVANTAGE_ESTIMATOR="grpo", KL_IN_LOSS=True,
                              KL_COEF=0.5, LOSS_AGGREGATION="seq-mean-token-sum", EVAL_DATASETS=[])
    with torch.no_grad():                                    # a reference that differs from the policy
        for param in trainer.ref.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    experience, _, _, metrics = trainer.make_experience(PROMPTS)
    assert float(metrics["objective/kl_coef"]) == 0 and abs(float(metrics["objective/kl"])) > 0.1
    expected = ppo.group_advantages(experience.scores, 2, "grpo")
    torch.testing.assert_close(experience.advantages, torch.where(experience.response_mask, expected[:, None], 0.0))
    experience = off_policy(experience, trained=[True] * 8)
    for estimator in ppo.CHOICES["KL_ESTIMATOR"]:
        with_kl, sums = gradients(trainer, experience, [torch.arange(4), torch.arange(4, 8)],
                                  {"KL_ESTIMATOR": estimator, "KL_LOSS_COEF": 0.3})
        without, _ = gradients(trainer, experience, [torch.arange(8)], {"KL_LOSS_COEF": 0.0})
        trainer.optimizer.zero_grad(set_to_none=True)
        current = trainer.forward(experience)
        kl = ppo.kl_penalty(current.logprobs, experience.ref_logprobs, estimator)
        (0.3 * aggregated(kl, experience.response_mask, "seq-mean-token-sum", 6)).backward()
        policy = trainer.accelerator.unwrap_model(trainer.model)
        for n, p in policy.named_parameters():
            if n in with_kl:
                torch.testing.assert_close(with_kl[n], without[n] + p.grad, atol=1e-6, rtol=1e-4,
                                           msg=f"{estimator} {n}")
        assert sums["kl_loss"] != 0
        trainer.optimizer.zero_grad(set_to_none=True)


def test_overlong_penalty_lands_in_the_score(tiny, random_policy, tmp_path):
    """OVERLONG_BUFFER: each score drops by DAPO's soft penalty of its response length, logged on its own."""
    trainer = variant_trainer(tiny, random_policy, tmp_path / "out", MAX_NEW_TOKENS=8, STOP_TOKENS=["1", "2", "3", "4"],
                              OVERLONG_BUFFER=4, OVERLONG_PENALTY=0.5, MISSING_EOS_PENALTY=0.0, EVAL_DATASETS=[])
    rollout = trainer.generate_response([p for p in PROMPTS for _ in range(2)])
    lengths = rollout.response_mask.sum(1)
    assert lengths.min() <= 4 < lengths.max(), "want responses inside and beyond the buffer"
    scores, _, metrics = trainer.score_rollout(rollout)
    trainer.cfg["OVERLONG_BUFFER"] = 0
    plain, _, plain_metrics = trainer.score_rollout(rollout)
    penalty = torch.tensor([-0.5 * min(max(n - 4, 0) / 4, 1) for n in lengths.tolist()])
    torch.testing.assert_close(scores - plain, penalty)
    torch.testing.assert_close(metrics["objective/overlong_penalty"], penalty.mean())
    assert "objective/overlong_penalty" not in plain_metrics


def test_a_bad_combination_is_exit_2_before_any_model_loads(tmp_path, capsys):
    code = ppo.train_main([f"--OUTPUT_DIR={tmp_path / 'out'}", "--POLICY_LOSS=gspo", "--ACTOR_MODEL=/nonexistent"])
    err = capsys.readouterr().err
    assert code == 2 and "gspo" in err and "ADVANTAGE_ESTIMATOR" in err and "/nonexistent" not in err
    assert not (tmp_path / "out").exists()
