"""Properties over the space of settings, drawn by hypothesis: the minibatch schedule, the reuse of the first
pass and the data tail policy as pure functions (hundreds of cases); the whole PPO step on a random,
high-entropy model (a few dozen); two processes over gloo (a handful), each with a timeout so a hang fails."""
import json
import subprocess

import pytest
import torch
from conftest import ROOT, TORCHRUN, high_entropy_policy, llama_config, save_model, tiny_settings, word_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ppo

SIZES = dict(BATCH_SIZE=st.integers(1, 3), GRADIENT_ACCUMULATION_STEPS=st.integers(1, 3),
             NUM_MINI_BATCHES=st.integers(1, 3), GROUP_SIZE=st.integers(1, 3), GROUP_EPOCHES=st.integers(1, 2))


def schedule_settings(**drawn):
    return ppo.make_config({"SEED": 7, **drawn})


# -- 1. pure functions: hundreds of cases --------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 40), step=st.integers(0, 1000), **{k: v for k, v in SIZES.items() if k != "BATCH_SIZE"})
def test_schedule_partitions_every_epoch_and_reuse_means_one_micro_batch(n, step, **drawn):
    cfg = schedule_settings(**drawn)
    schedule = ppo.minibatch_schedule(n, step, cfg)
    as_lists = [[[idx.tolist() for idx in mb] for mb in epoch] for epoch in schedule]
    assert as_lists == [[[idx.tolist() for idx in mb] for mb in epoch]
                        for epoch in ppo.minibatch_schedule(n, step, cfg)]      # the same on every process
    assert len(schedule) == cfg.GROUP_EPOCHES
    for epoch in schedule:
        rows = torch.cat([idx for minibatch in epoch for idx in minibatch])
        assert sorted(rows.tolist()) == list(range(n))                      # every row once per epoch
        assert len(epoch) == min(cfg.NUM_MINI_BATCHES, n)
        assert all(len(mb) == min(cfg.GRADIENT_ACCUMULATION_STEPS, sum(map(len, mb))) for mb in epoch)
        assert all(len(idx) > 0 for mb in epoch for idx in mb)
    assert ppo.optimizer_steps_per_update(schedule) == cfg.GROUP_EPOCHES * min(cfg.NUM_MINI_BATCHES, n)
    reuse = ppo.reuses_first_pass(schedule, n)
    assert reuse == (len(schedule[0][0]) == 1 and len(schedule[0]) == 1)   # one micro-batch = the rollout
    assert reuse == (n == 1 or (cfg.GRADIENT_ACCUMULATION_STEPS == 1 and cfg.NUM_MINI_BATCHES == 1))


@settings(max_examples=300, deadline=None)
@given(n_prompts=st.integers(1, 60), world=st.integers(1, 4), data=st.data(), **SIZES)
def test_every_step_and_every_process_gets_the_same_number_of_prompts(n_prompts, world, data, **drawn):
    """The tail policy: each step takes per_step prompts (the last one wraps around the epoch order), so
    every process gets BATCH_SIZE x GAS x NUM_MINI_BATCHES prompts and the same schedule every step."""
    per_step = drawn["BATCH_SIZE"] * drawn["GRADIENT_ACCUMULATION_STEPS"] * drawn["NUM_MINI_BATCHES"] * world
    order = ppo.epoch_order(n_prompts, data.draw(st.integers(0, 99)), 0)
    seen, position, steps = [], 0, 0
    while position < n_prompts:
        batch = ppo.step_prompt_indices(order, position, per_step)
        assert len(batch) == per_step and all(0 <= i < n_prompts for i in batch)
        shares = [batch[rank::world] for rank in range(world)]
        assert {len(s) for s in shares} == {per_step // world} and per_step // world > 0
        seen += batch[:min(per_step, n_prompts - position)]
        position = min(position + per_step, n_prompts)
        steps += 1
    assert sorted(seen) == list(range(n_prompts))                           # each prompt once per epoch is new
    assert steps == -(-n_prompts // per_step)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 30), world=st.integers(1, 5))
def test_evaluation_shards_are_equal_and_count_each_prompt_once(n, world):
    shares = [ppo.shard(list(range(n)), rank, world) for rank in range(world)]
    assert len({len(items) for items, _ in shares}) == 1
    assert all(len(items) > 0 for items, _ in shares) or n == 0
    real = sorted(i for items, count in shares for i in items[:count])
    assert real == list(range(n))


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.floats(-3, 3), min_size=1, max_size=12), patience=st.integers(0, 3),
       plateau=st.booleans(), min_delta=st.sampled_from([0.0, 0.1]))
def test_track_eval_follows_the_best_value(values, patience, plateau, min_delta):
    cfg = ppo.make_config(dict(EARLY_STOPPING_PATIENCE=patience, USE_LR_SCHEDULER=plateau,
                               LR_SCHEDULER_TYPE="plateau", PLATEAU_PATIENCE=2, EARLY_STOPPING_MIN_DELTA=min_delta))
    state, best, stale, stopped_at = ppo.TrainState(), None, 0, None
    for step, value in enumerate(values):
        state.global_step = step
        state, improved, stop = ppo.track_eval(state, value, cfg)
        assert improved == (best is None or value > best + min_delta)
        best, stale = (value, 0) if improved else (best, stale + 1)
        assert state.best_metric == best and state.evals_without_improvement == stale
        assert stop == (patience > 0 and stale >= patience)
        if stop and stopped_at is None:
            stopped_at = step
    assert plateau or state.lr_scale == 1.0


# -- 2. the whole step on a random, high-entropy model -----------------------------------------------
@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    """A high-entropy policy (a zero in place of log pi_old shows) and a random reward model."""
    from transformers import LlamaForSequenceClassification
    root = tmp_path_factory.mktemp("random")
    policy = high_entropy_policy(root / "policy", seed=1)
    reward = LlamaForSequenceClassification(llama_config(len(word_tokenizer()), num_labels=1))
    return {"policy": policy,
            "reward": save_model(reward, word_tokenizer("right", append_eos=True), root / "reward")}


STEP_CASES = dict(BATCH_SIZE=st.integers(1, 2), GRADIENT_ACCUMULATION_STEPS=st.integers(1, 3),
                  NUM_MINI_BATCHES=st.integers(1, 2), GROUP_SIZE=st.integers(1, 3), GROUP_EPOCHES=st.integers(1, 2),
                  ADVANTAGE_ESTIMATOR=st.sampled_from(["gae", "grpo", "dr_grpo", "rloo", "reinforce++"]),
                  USE_LORA=st.booleans(), tail=st.integers(0, 11), nan_step=st.booleans(),
                  LOSS_AGGREGATION=st.sampled_from(ppo.CHOICES["LOSS_AGGREGATION"]),
                  POLICY_LOSS=st.sampled_from(ppo.CHOICES["POLICY_LOSS"]), CLIP_RANGE_HIGH=st.sampled_from([None, 0.28]),
                  DUAL_CLIP=st.sampled_from([0.0, 3.0]), KL_IN_LOSS=st.booleans(),
                  KL_ESTIMATOR=st.sampled_from(ppo.CHOICES["KL_ESTIMATOR"]), DYNAMIC_SAMPLING=st.booleans(),
                  OVERLONG_BUFFER=st.sampled_from([0, 2]), SHARED_BASE=st.booleans(),
                  LAM_VALUE=st.sampled_from([None, 1.0]), LENGTH_ADAPTIVE_LAM=st.sampled_from([0.0, 0.5]),
                  VALUE_WARMUP_STEPS=st.sampled_from([0, 1]), POSITIVE_LM_COEF=st.sampled_from([0.0, 0.3]))


def valid_variant(drawn):
    """The drawn policy-gradient variant made valid the way the error messages say (validate_config)."""
    if drawn["POLICY_LOSS"] == "gspo":
        if drawn["ADVANTAGE_ESTIMATOR"] not in ppo.GROUP_ESTIMATORS:
            drawn["ADVANTAGE_ESTIMATOR"] = "grpo"
        drawn["LOSS_AGGREGATION"] = "seq-mean-token-mean"
    if drawn["POLICY_LOSS"] == "cispo":
        drawn["DUAL_CLIP"] = 0.0
    if drawn["ADVANTAGE_ESTIMATOR"] not in ppo.GROUP_ESTIMATORS:
        drawn["DYNAMIC_SAMPLING"] = False
    if drawn["DYNAMIC_SAMPLING"] and not drawn["KL_IN_LOSS"]:
        drawn["KL_COEF"] = 0.0
    if drawn["ADVANTAGE_ESTIMATOR"] in ppo.GROUP_ESTIMATORS and drawn["GROUP_SIZE"] < 2:
        drawn["GROUP_SIZE"] = 2
    if drawn["ADVANTAGE_ESTIMATOR"] != "gae":
        drawn.update(LAM_VALUE=None, LENGTH_ADAPTIVE_LAM=0.0, VALUE_WARMUP_STEPS=0)
    return drawn


class Recorder(ppo.PPOTrainer):
    """Records what each minibatch_update returned, and can poison one step's scores with a NaN."""
    poison = False

    def minibatch_update(self, experience, micro_batches, first_pass=None):
        sums = super().minibatch_update(experience, micro_batches, first_pass)
        self.updates.append(None if sums is None else {k: float(v) for k, v in sums.items()})
        return sums

    def compute_rewards(self, prompts, responses):
        scores = super().compute_rewards(prompts, responses)
        return torch.where(torch.arange(len(scores)) == 0, torch.nan, scores) if self.poison else scores


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(**STEP_CASES)
def test_each_step_is_right_whatever_the_settings(random_models, tiny, tmp_path_factory, tail, nan_step, **drawn):
    """On every drawn case, through train_step on this process's prompts for a whole epoch:
    - log pi_old and V_old equal a fresh no-grad pass over the same sequences, for every row;
    - the ratio is 1 and the approximate KL 0 on the first minibatch of every step;
    - the accumulated gradient of a minibatch equals its gradient in one piece;
    - every step logs the same keys; a skipped step counts exactly the optimizer steps it did not take.
    The draws cover every estimator, aggregation mode and policy loss, clip-higher, dual clip, the KL in
    the loss with each estimator, dynamic sampling, the overlong penalty, a shared base and the critic's
    options (decoupled and length-adaptive GAE, the value warm-up, the positive-example NLL)."""
    drawn = valid_variant(drawn)
    per_step = drawn["BATCH_SIZE"] * drawn["GRADIENT_ACCUMULATION_STEPS"] * drawn["NUM_MINI_BATCHES"]
    n_prompts = 1 + tail % (2 * per_step)                   # fewer than a step, a ragged tail, or whole steps
    out = tmp_path_factory.mktemp("step")
    critic = None if drawn["SHARED_BASE"] else random_models["reward"]     # SHARED_BASE: an adapter
    trainer = Recorder(**tiny_settings(tiny, out, ACTOR_MODEL=random_models["policy"],
                                       REWARD_MODEL=random_models["reward"], CRITIC_MODEL=critic,
                                       MAX_NEW_TOKENS=5, STOP_TOKENS=["1", "2"], LORA_R=2,
                                       POSITIVE_LM_THRESHOLD=0.0, **drawn))
    prompts, _, references = ppo.load_data(trainer.cfg)
    trainer.references.update(references)
    prompts = prompts[:n_prompts]
    trainer.plan = ppo.make_plan(len(prompts), trainer.cfg, trainer.backend.world)
    order = ppo.epoch_order(len(prompts), 0, 0)
    keys, position, step = None, 0, 0
    while position < len(prompts):
        batch = [prompts[i] for i in ppo.step_prompt_indices(order, position, trainer.plan.prompts_per_step)]
        trainer.updates, trainer.poison = [], nan_step and step == 1
        schedule = ppo.minibatch_schedule(len(batch) * trainer.cfg.GROUP_SIZE, trainer.state.global_step,
                                          trainer.cfg)
        check_old_pass(trainer, batch, schedule)
        before = trainer.state.optimizer_steps
        metrics = trainer.train_step(batch)
        steps_taken = trainer.state.optimizer_steps - before
        expected_steps = ppo.optimizer_steps_per_update(schedule)
        assert metrics["ppo/skipped_optimizer_steps"] == expected_steps - steps_taken
        nothing_to_learn = metrics.get("ppo/trained_fraction") == 0
        if trainer.poison or nothing_to_learn:
            assert steps_taken == 0 and trainer.updates == []
            assert metrics.get("ppo/empty_minibatches", 0) == (expected_steps if nothing_to_learn else 0)
        else:
            # a minibatch whose rows dynamic sampling dropped everywhere takes no optimizer step
            first = next(u for u in trainer.updates if u is not None)
            assert first["tokens"] > 0 and abs(first["ratio"] / first["tokens"] - 1) < 1e-5
            assert abs(first["approx_kl"]) < 1e-6
            assert first["pg_clipped"] == 0
            assert len(trainer.updates) == expected_steps
            assert steps_taken == expected_steps - trainer.updates.count(None)
            assert metrics.get("ppo/empty_minibatches", 0) == trainer.updates.count(None)
        assert keys is None or set(metrics) == keys, set(metrics) ^ keys
        keys = set(metrics)
        position, step = position + trainer.plan.prompts_per_step, step + 1
        trainer.state.global_step += 1
    trainer.poison = False
    check_accumulation(trainer, prompts[:per_step])


def check_old_pass(trainer, batch, schedule):
    """The experience train_step would build (reusing the update's first forward where the schedule allows)
    against a fresh no-grad pass; the RNG is put back so train_step samples the same rollout afterwards."""
    rng = ppo.rng_state()
    experience, first_pass, _, _ = trainer.make_experience(batch, schedule)
    ppo.set_rng_state(rng)
    assert (first_pass is not None) == ppo.reuses_first_pass(schedule, len(experience))
    fresh = trainer.old_pass(experience)
    mask = experience.response_mask
    torch.testing.assert_close(experience.old_logprobs[mask], fresh.logprobs[mask], atol=1e-5, rtol=1e-5)
    if experience.values is not None:
        torch.testing.assert_close(experience.values[mask], fresh.values[mask], atol=1e-5, rtol=1e-5)
    assert experience.old_logprobs[mask].mean() < -0.3, "the model must not be near-deterministic"
    trainer.optimizer.zero_grad(set_to_none=True)


def check_accumulation(trainer, prompts):
    experience, _, _, _ = trainer.make_experience(prompts)
    schedule = ppo.minibatch_schedule(len(experience), 0, trainer.cfg)
    micro_batches = schedule[0][0]

    def gradients(pieces):
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.minibatch_update(experience, pieces)
        return [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]

    split, whole = gradients(micro_batches), gradients([torch.cat(micro_batches)])
    if not experience.trained[torch.cat(micro_batches)].any():      # dynamic sampling dropped every row
        assert split == whole == []
        return
    assert len(split) == len(whole) > 0
    for a, b in zip(split, whole):           # float32 sums in another order: tolerance on each tensor's scale
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()) + 1e-8, rtol=1e-4)
    trainer.optimizer.zero_grad(set_to_none=True)


# -- 3. two processes over gloo ------------------------------------------------------------------------
TWO_PROCESS_DRIVER = """
import json, sys
sys.path.insert(0, {root!r})
import ppo
settings = json.load(open(sys.argv[1]))
trainer = ppo.PPOTrainer(**settings)
trainer.train()
rows = [json.loads(line) for line in open(trainer.output_dir / "logs" / "metrics.jsonl")] if trainer.is_main else []
print("RESULT", json.dumps({{"rank": trainer.backend.rank, "optimizer_steps": trainer.state.optimizer_steps,
                            "steps": trainer.state.global_step, "rows": rows}}), flush=True)
trainer.accelerator.end_training()
"""


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(tail=st.integers(1, 7), gas=st.integers(1, 2), minibatches=st.integers(1, 2), n_eval=st.integers(1, 3),
       estimator=st.sampled_from(["gae", "grpo"]), mixed_references=st.booleans())
def test_two_processes_agree_on_every_tail(random_models, tiny, tmp_path_factory, tail, gas, minibatches, n_eval,
                                           estimator, mixed_references):
    """2 gloo processes over a whole epoch whose last step is ragged (fewer prompts than a step, fewer than
    the processes, or straddling BATCH_SIZE), fewer eval prompts than processes or not, and training data
    mixing prompts with and without references: the run ends (no hang, no collective mismatch), both
    processes take the same optimizer steps, and every step row has the same keys."""
    out = tmp_path_factory.mktemp("two")
    # with mixed_references only every other prompt has a reference: some ranks' steps have none
    train = [{"problem": f"What is {i} + 1?", **({"solution": f"{i + 1}"} if i % 2 or not mixed_references else {})}
             for i in range(30)]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    per_step = 2 * gas * minibatches * 2
    n_train = per_step + tail
    data = [{"path": str(out / "train.jsonl"), "type": "jsonl", "input": "problem", "output": "solution"}]
    config = tiny_settings(tiny, out / "run", ACTOR_MODEL=random_models["policy"], REWARD_MODEL=random_models["reward"],
                           CRITIC_MODEL=random_models["reward"], TRAIN_DATASETS=data, MAX_TRAIN_SAMPLES=n_train,
                           BATCH_SIZE=2, GRADIENT_ACCUMULATION_STEPS=gas, NUM_MINI_BATCHES=minibatches, GROUP_SIZE=2,
                           GROUP_EPOCHES=1, MAX_STEPS=0, MAX_EVAL_SAMPLES=n_eval, EVAL_EVERY_N_STEPS=1,
                           ADVANTAGE_ESTIMATOR=estimator, MAX_NEW_TOKENS=4, SAVE_EVERY_N_STEPS=0)
    (out / "run.json").write_text(json.dumps(config))
    driver = out / "driver.py"
    driver.write_text(TWO_PROCESS_DRIVER.format(root=str(ROOT)))
    port = 29700 + sum(map(ord, out.name)) % 200
    try:
        result = subprocess.run(TORCHRUN + [str(port), str(driver), str(out / "run.json")], cwd=out,
                                env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"2-process run hung (tail {tail}, GAS {gas}, minibatches {minibatches}, eval {n_eval})")
    assert result.returncode == 0, result.stderr[-4000:]
    results = [json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines() if line.startswith("RESULT")]
    assert len(results) == 2
    assert results[0]["optimizer_steps"] == results[1]["optimizer_steps"] > 0
    steps = -(-n_train // per_step)
    assert results[0]["steps"] == results[1]["steps"] == steps
    rows = next(r["rows"] for r in results if r["rank"] == 0)
    step_rows = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in step_rows] == list(range(1, steps + 1))
    assert len({frozenset(r) for r in step_rows}) == 1
    assert all("eval/reward" in r for r in rows)
