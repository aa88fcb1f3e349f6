"""PPO invariants on real (tiny, random) transformers models: what a correct rollout and update must satisfy."""
import dataclasses
import json

import pytest
import torch
from conftest import word_tokenizer

import ppo

PROMPTS = ["What is 3 + 4?", "What is 12 + 5?", "What is 41 + 9?", "What is 7 + 0?"]


def first_micro_batch(trainer, rows):
    return ppo.minibatch_schedule(len(rows), trainer.state.global_step, trainer.cfg)[0][0][0]


def experience_of(trainer, prompts):
    """The rollout recipe with its own pass for log pi_old and V_old: (experience, metrics)."""
    experience, first_pass, _, metrics = trainer.make_experience(prompts)
    assert first_pass is None
    return experience, metrics


def test_ratio_is_one_on_first_minibatch(make_trainer):
    """Old logprobs come from the training numeric path (dropout off, same trimming): ratio == 1 to 1e-6."""
    trainer = make_trainer(GRADIENT_ACCUMULATION_STEPS=2, STOP_TOKENS=["1", "2", "3"], MAX_NEW_TOKENS=10)
    rollout, _ = experience_of(trainer, PROMPTS)
    assert rollout.response_mask.sum(1).unique().numel() > 1, "want responses of several lengths"
    mb = rollout.select(first_micro_batch(trainer, rollout))
    logprobs, _, values = trainer.model(*mb.sequences(), mb.response_ids, trainer.cfg.TEMPERATURE)
    ratio = torch.exp(logprobs - mb.old_logprobs)
    assert (ratio - 1).abs()[mb.response_mask].max() < 1e-6
    assert (values - mb.values).abs()[mb.response_mask].max() < 1e-6
    stats = trainer.minibatch_update(rollout, [first_micro_batch(trainer, rollout)])
    assert stats["pg_clipped"] == 0 and abs(stats["ratio"] / stats["tokens"] - 1) < 1e-6


def test_dropout_is_off_but_saved_config_keeps_it(make_trainer, tmp_path):
    trainer = make_trainer()
    assert trainer.policy.config.attention_dropout == 0.1
    assert all(m.attention_dropout == 0.0 for m in trainer.policy.modules() if hasattr(m, "attention_dropout"))
    trainer.save_policy(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["attention_dropout"] == 0.1


def test_score_sits_on_last_real_token(make_trainer):
    """With beta = 0 and gamma = lambda = 1 every real token's return is the sequence's score; a score placed
    after the last real token (TRL's old bug) would leave them all 0."""
    trainer = make_trainer(KL_COEF=0.0, GAMMA=1.0, LAM=1.0, STOP_TOKENS=["1", "2", "3"], MAX_NEW_TOKENS=10,
                           MISSING_EOS_PENALTY=0.5)
    rollout, _ = experience_of(trainer, PROMPTS)
    mask = rollout.response_mask
    expected = rollout.scores[:, None].expand_as(mask)
    torch.testing.assert_close(rollout.returns[mask], expected[mask], atol=1e-5, rtol=1e-5)
    assert (rollout.returns[~mask] == 0).all()
    lengths = mask.sum(1)
    stopped = torch.isin(rollout.response_ids[torch.arange(len(lengths)), lengths - 1], trainer.stop_ids)
    assert torch.equal(stopped, rollout.has_eos)
    assert (rollout.response_ids[~mask] == trainer.tokenizer.pad_token_id).all()


def test_padding_content_changes_nothing(make_trainer):
    """Whatever token ids sit in the padding (prompt left padding, after the EOS), no logprob, value,
    loss, gradient or metric changes."""
    trainer = make_trainer(STOP_TOKENS=["1", "2", "3"], MAX_NEW_TOKENS=10)
    rollout = trainer.generate_response([p for p in PROMPTS for _ in range(trainer.cfg.GROUP_SIZE)])
    scores = trainer.score_rollout(rollout)[0]
    g = torch.Generator().manual_seed(0)
    vocab = len(trainer.tokenizer)
    garbage = dataclasses.replace(
        rollout, query_ids=torch.where(rollout.query_mask, rollout.query_ids,
                                       torch.randint(3, vocab, rollout.query_ids.shape, generator=g)),
        response_ids=torch.where(rollout.response_mask, rollout.response_ids,
                                 torch.randint(3, vocab, rollout.response_ids.shape, generator=g)))
    assert not torch.equal(garbage.response_ids, rollout.response_ids)
    results = []
    for r in (rollout, garbage):
        r, _, metrics = trainer.experience_of(r, scores)
        stats = trainer.minibatch_update(r, [torch.arange(len(r))])
        grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
        trainer.optimizer.zero_grad()
        results.append((r, metrics, stats, grads))
    (a, ma, sa, ga), (b, mb, sb, gb) = results
    mask = a.response_mask
    for field in ("old_logprobs", "ref_logprobs", "values", "advantages", "returns"):
        torch.testing.assert_close(getattr(a, field)[mask], getattr(b, field)[mask], atol=1e-6, rtol=1e-6)
    for key in ma:
        torch.testing.assert_close(ma[key], mb[key], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sa, sb, atol=1e-5, rtol=1e-6)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_gradient_accumulation_matches_one_big_batch(make_trainer):
    """BATCH_SIZE=1 x GRADIENT_ACCUMULATION_STEPS=8 gives the gradient of 8 x 1 (token-level normalisation)."""
    trainer = make_trainer(STOP_TOKENS=["1", "2", "3"], MAX_NEW_TOKENS=10)
    rollout, _ = experience_of(trainer, PROMPTS)
    assert len(rollout) == 8 and rollout.response_mask.sum(1).unique().numel() > 1

    def gradients(micro_batches):
        trainer.optimizer.zero_grad()
        stats = trainer.minibatch_update(rollout, micro_batches)
        return stats, [p.grad.clone() for p in trainer.model.parameters()]

    stats_one, one = gradients([torch.arange(8)])
    stats_eight, eight = gradients([torch.tensor([i]) for i in range(8)])
    torch.testing.assert_close(stats_one, stats_eight, atol=1e-5, rtol=1e-5)
    for x, y in zip(one, eight):
        torch.testing.assert_close(x, y, atol=1e-7, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in one)


def test_greedy_batch_generation_equals_one_by_one(make_trainer):
    """Left padding and position ids: a prompt's greedy response does not depend on its batch-mates."""
    trainer = make_trainer(MAX_NEW_TOKENS=12)
    prompts = ["What is 3 + 4?", "What is 123 + 45 + 6?", "7?", "What is 41 + 9? The answer is"]
    batch = trainer.generate_response(prompts, do_sample=False)
    assert batch.query_mask.sum(1).unique().numel() > 1
    for i, prompt in enumerate(prompts):
        alone = trainer.generate_response([prompt], do_sample=False)
        n = int(alone.response_mask.sum())
        assert batch.response_ids[i, :n].tolist() == alone.response_ids[0, :n].tolist()
        assert int(batch.response_mask[i].sum()) == n


def test_sampling_ignores_the_models_generation_filters(tiny, tmp_path, make_trainer):
    """A generation_config with top-k, top-p, repetition penalty and a minimum length must not leak into
    rollouts: the scores generate() samples from equal logits / TEMPERATURE exactly."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    model = AutoModelForCausalLM.from_pretrained(tiny["policy"])
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=True,
                                               top_k=3, top_p=0.3, repetition_penalty=2.0, no_repeat_ngram_size=2,
                                               min_new_tokens=5, temperature=0.3, typical_p=0.5)
    model.save_pretrained(tmp_path / "hostile")
    word_tokenizer().save_pretrained(tmp_path / "hostile")
    trainer = make_trainer(ACTOR_MODEL=str(tmp_path / "hostile"), TEMPERATURE=0.7)
    config = trainer.generation_config(True, 6)
    config.output_scores = config.output_logits = config.return_dict_in_generate = True
    ids, mask = ppo.pad([trainer.prompt_ids.get(p) or trainer.tokenizer(p)["input_ids"] for p in PROMPTS], 0, "left")
    out = trainer.policy.eval().generate(input_ids=ids, attention_mask=mask.long(), generation_config=config)
    for scores, logits in zip(out.scores, out.logits):
        torch.testing.assert_close(scores, logits / 0.7)


def test_reward_model_with_another_tokenizer(tiny, make_trainer):
    """The reward model reads text with its own tokenizer (here: another vocabulary order and architecture);
    batched, padded scores equal scoring each text alone with that tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    trainer = make_trainer(REWARD_MODEL=tiny["other_reward"])
    responses = [" 3+4=7. The answer is 7.", " 17", " 12+5=17. The answer is 17. What", ""]
    batched = trainer.reward_model_scores(PROMPTS, responses)
    tok = AutoTokenizer.from_pretrained(tiny["other_reward"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny["other_reward"]).eval()
    assert tok("7")["input_ids"] != trainer.tokenizer("7")["input_ids"]
    for score, prompt, response in zip(batched, PROMPTS, responses):
        enc = tok(prompt + response, return_tensors="pt")
        assert enc["input_ids"][0, -1] == tok.eos_token_id
        with torch.no_grad():
            alone = model(**enc).logits[0, 0]
        torch.testing.assert_close(score, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trainer.reward_model_score(PROMPTS[1], responses[1]), batched[1], atol=1e-5, rtol=1e-5)


def test_prompts_go_through_the_chat_template(tiny, make_trainer):
    trainer = make_trainer(ACTOR_MODEL=tiny["chat_policy"])
    trainer.prepare_prompts(PROMPTS)
    text = trainer.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                                 add_generation_prompt=True)
    assert text.endswith("assistant: ")
    assert trainer.prompt_ids[PROMPTS[0]] == trainer.tokenizer(text, add_special_tokens=False)["input_ids"]
    plain = make_trainer(ACTOR_MODEL=tiny["chat_policy"], USE_CHAT_TEMPLATE=False)
    plain.prepare_prompts(PROMPTS)
    assert plain.prompt_ids[PROMPTS[0]] == plain.tokenizer(PROMPTS[0])["input_ids"]


def test_long_prompts_keep_their_end_with_one_warning(make_trainer, caplog):
    trainer = make_trainer(MAX_PROMPT_LENGTH=5)
    caplog.set_level("WARNING", logger="ppo")
    ppo.logger.propagate = True
    trainer.prepare_prompts(PROMPTS + ["7?"])
    warnings = [r for r in caplog.records if "MAX_PROMPT_LENGTH" in r.getMessage()]
    assert len(warnings) == 1 and "4 of 5 prompts" in warnings[0].getMessage()
    full = trainer.tokenizer(PROMPTS[1])["input_ids"]
    assert trainer.prompt_ids[PROMPTS[1]] == full[:1] + full[-4:]          # BOS, then the content's end


def test_reusing_the_first_pass_changes_nothing(make_trainer, tmp_path):
    """When the update's first micro-batch holds every row, log pi_old and V_old come from its forward instead
    of a separate pass: same experience, same updated weights as the separate-pass path."""
    fused = make_trainer(OUTPUT_DIR=str(tmp_path / "a"), STOP_TOKENS=["1", "2", "3"], MAX_NEW_TOKENS=10)
    separate = make_trainer(OUTPUT_DIR=str(tmp_path / "b"), STOP_TOKENS=["1", "2", "3"], MAX_NEW_TOKENS=10)
    rollout = fused.generate_response([p for p in PROMPTS for _ in range(fused.cfg.GROUP_SIZE)])
    scores = fused.score_rollout(rollout)[0]
    schedule = ppo.minibatch_schedule(len(rollout), 0, fused.cfg)
    assert ppo.reuses_first_pass(schedule, len(rollout))
    reused, first_pass, _ = fused.experience_of(rollout, scores, schedule)
    copy, no_pass, _ = separate.experience_of(rollout, scores)
    assert first_pass is not None and no_pass is None
    metrics_fused = fused.ppo_update(reused, schedule, first_pass)
    metrics_separate = separate.ppo_update(copy, schedule)
    for field in ("old_logprobs", "values", "advantages", "returns"):
        torch.testing.assert_close(getattr(reused, field), getattr(copy, field), atol=1e-6, rtol=1e-5)
    assert metrics_fused["ppo/ratio_mean"] == pytest.approx(float(metrics_separate["ppo/ratio_mean"]), abs=1e-6)
    for (name, p), q in zip(fused.model.named_parameters(), separate.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
