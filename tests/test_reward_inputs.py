"""What the reward model reads, the stop tokens a chat template implies, and the numeric path of the
reference, with tokenizer behaviour the word-level fixtures do not have: a SentencePiece-style BPE whose
decode drops a first token's leading space, a whitespace word-level tokenizer, a ChatML template."""
import pytest
import torch
from conftest import llama_config, save_model, tiny_settings, word_tokenizer

import ppo

CORPUS = ["the bird was very quiet .", "What is 3 + 4 ? The answer is 7 .", "the cat sat on the mat .",
          "a quiet bird was singing very loudly", "What is 12 + 5 ? The answer is 17 ."] * 20


def sentencepiece_tokenizer():
    """Llama-2 / Mistral behaviour: Metaspace (prepend_scheme "first"), byte fallback, BOS from the
    post-processor, and a decoder that strips the leading space of what it decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def whitespace_word_tokenizer(append_eos=False):
    """Whole words split on whitespace: decode joins tokens with spaces and so drops the boundary's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = sorted({w for line in CORPUS for w in line.split()})
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    single = "<s> $A </s>" if append_eos else "<s> $A"
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def family(tmp_path, name, tokenizer, reward_tokenizer=None):
    """A random Llama policy and reward model for a tokenizer (pad 0 / bos 1 / eos 2 by construction)."""
    from transformers import GenerationConfig, LlamaForCausalLM, LlamaForSequenceClassification
    torch.manual_seed(0)
    reward_tokenizer = reward_tokenizer or tokenizer
    policy = LlamaForCausalLM(llama_config(len(tokenizer)))
    policy.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    reward = LlamaForSequenceClassification(llama_config(len(reward_tokenizer), num_labels=1))
    return (save_model(policy, tokenizer, tmp_path / f"{name}_policy"),
            save_model(reward, reward_tokenizer, tmp_path / f"{name}_reward"))


def with_extra_token(tokenizer):
    """The same tokenizer plus one token: another vocabulary, so the reward model reads decoded text."""
    import copy
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<extra>"])
    return other


def reward_ids_seen(monkeypatch):
    """The (ids, attention mask) batches the reward model is given from now on."""
    inputs, original = [], ppo.sequence_scores
    monkeypatch.setattr(ppo, "sequence_scores", lambda m, i, a: (inputs.append((i, a)), original(m, i, a))[1])
    return inputs


def reward_texts_seen(trainer, monkeypatch):
    """Texts given to the reward tokenizer's class from now on (the policy's may share the class)."""
    seen = []
    cls = type(trainer.reward_tokenizer)
    original = cls.__call__

    def spy(self, text, *args, **kwargs):
        seen.extend(text if isinstance(text, list) else [text])
        return original(self, text, *args, **kwargs)
    monkeypatch.setattr(cls, "__call__", spy)
    return seen


@pytest.mark.parametrize("kind", ["sentencepiece", "whitespace_words"])
def test_the_reward_model_reads_what_the_policy_conditioned_on_and_wrote(tiny, tmp_path, kind, monkeypatch):
    """A reward model with another tokenizer and no chat template reads the decode of the policy's own
    prompt + response ids, so its tokens are the policy's tokens; "the bird was" + "very quiet ." is not
    glued into "wasvery" (an <unk> for a word-level vocabulary)."""
    tok = sentencepiece_tokenizer() if kind == "sentencepiece" else whitespace_word_tokenizer()
    prompt_ids = tok("the bird was")["input_ids"]
    response_ids = tok("very quiet .", add_special_tokens=False)["input_ids"]
    alone = tok.decode(response_ids, skip_special_tokens=True)
    assert ("the bird was" + alone).split()[2] == "wasvery", "the tokenizer must drop the leading space"
    policy, reward = family(tmp_path, kind, tok, reward_tokenizer=with_extra_token(tok))
    trainer = ppo.PPOTrainer(**tiny_settings(tiny, tmp_path / "out", ACTOR_MODEL=policy, REWARD_MODEL=reward,
                                             CRITIC_MODEL=policy, MAX_NEW_TOKENS=6, USE_CHAT_TEMPLATE=False))
    assert not trainer.reward_reads_policy_ids
    prompts = ["the bird was", "What is 3 + 4 ?"]
    rollout = trainer.generate_response(prompts * 2)
    seen = reward_texts_seen(trainer, monkeypatch)
    trainer.reward_model_scores(rollout.prompts, rollout.responses)
    for text, query, response, mask in zip(seen, rollout.query_ids, rollout.response_ids, rollout.response_mask):
        body = response[mask].tolist()
        body = body[:-1] if body[-1] in trainer.stop_ids else body
        expected = tok.decode(query.tolist() + body, skip_special_tokens=True)
        assert text == expected
        if kind == "whitespace_words" and not set(body) & set(tok.all_special_ids):
            assert tok(text)["input_ids"] == [i for i in query.tolist() if i != tok.pad_token_id] + body
    assert ppo.response_texts(tok, [prompt_ids], [response_ids]) == [" very quiet ."]
    if kind == "whitespace_words":
        scored = trainer.reward_tokenizer("the bird was" + ppo.response_texts(tok, [prompt_ids], [response_ids])[0])
        assert tok.unk_token_id not in scored["input_ids"]


def test_a_chat_policy_and_a_plain_reward_model_keep_the_turns_apart(tiny, tmp_path, monkeypatch):
    """The policy's chat template framed the prompt; a reward model without one reads that framing,
    not "What is 3 + 4?The answer ..." glued."""
    trainer = ppo.PPOTrainer(**tiny_settings(tiny, tmp_path / "out", ACTOR_MODEL=tiny["chat_policy"],
                                             MAX_NEW_TOKENS=6))
    rollout = trainer.generate_response(["What is 3 + 4?"])
    seen = reward_texts_seen(trainer, monkeypatch)
    trainer.reward_model_scores(rollout.prompts, ["The answer is 7."])
    rendered = trainer.tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}],
                                                     tokenize=False, add_generation_prompt=True)
    assert seen == [rendered + "The answer is 7."] and "?The" not in seen[0]


def chatml(tokenizer):
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tokenizer


def test_the_templates_end_of_turn_stops_a_response(tiny, tmp_path):
    """A base checkpoint with a ChatML template and EOS = <eos> (Qwen2.5 base: <|endoftext|>): <|im_end|>
    ends responses too, and the log says so."""
    tok = chatml(word_tokenizer())
    policy, reward = family(tmp_path, "chatml", tok)
    trainer = ppo.PPOTrainer(**tiny_settings(tiny, tmp_path / "out", ACTOR_MODEL=policy, CRITIC_MODEL=reward))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in trainer.stop_ids.tolist() and tok.eos_token_id in trainer.stop_ids.tolist()
    assert "ends a turn with '<|im_end|>': it ends a response too" in trainer.log_path.read_text()
    plain = ppo.PPOTrainer(**tiny_settings(tiny, tmp_path / "plain", ACTOR_MODEL=policy, CRITIC_MODEL=reward,
                                           USE_CHAT_TEMPLATE=False))
    assert im_end not in plain.stop_ids.tolist()


def test_a_template_without_a_generation_prompt_is_an_error(tiny, tmp_path, capsys):
    tok = word_tokenizer(chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    policy, _ = family(tmp_path, "nogen", tok)
    settings = tiny_settings(tiny, tmp_path / "out", ACTOR_MODEL=policy)
    (tmp_path / "run.json").write_text(__import__("json").dumps(settings))
    assert ppo.train_main([str(tmp_path / "run.json")]) == 2
    err = capsys.readouterr().err
    assert "Error:" in err and "opens the assistant's turn" in err and "USE_CHAT_TEMPLATE = False" in err
    assert "Traceback" not in err and not (tmp_path / "out" / "checkpoints").exists()
    llama2 = word_tokenizer(chat_template="{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
                                          "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}{% endif %}"
                                          "{% endfor %}")        # no generation prompt, but [/INST] closes
    policy, _ = family(tmp_path, "inst", llama2)
    trainer = ppo.PPOTrainer(**tiny_settings(tiny, tmp_path / "inst_out", ACTOR_MODEL=policy))
    trainer.prepare_prompts(["What is 3 + 4?"])
    assert trainer.prompt_texts["What is 3 + 4?"] == "[INST] What is 3 + 4? [/INST]"


def test_under_bf16_the_reference_takes_the_policys_numeric_path(make_trainer, fresh_accelerator_state):
    """Same weights at step 0: log pi_ref equals log pi_old exactly under bf16 autocast (the reference used to
    be held in bf16 while the policy keeps fp32 weights: KL ~0.01 nats/token before any update), and the
    update's fused LM head computes its logits in bf16 as the model's own head does under autocast
    (accelerate's fp32 output wrapper is removed)."""
    trainer = make_trainer(MIXED_PRECISION="bf16", KL_ESTIMATOR="k3", MAX_NEW_TOKENS=10, DEVICE="cpu")
    assert trainer.backend.mixed_precision == "bf16"
    experience, _, _, metrics = trainer.make_experience(["What is 3 + 4?", "What is 12 + 5?"])
    mask = experience.response_mask
    assert torch.equal(experience.old_logprobs[mask], experience.ref_logprobs[mask])
    assert metrics["objective/kl"] == 0
    ids, attention = experience.sequences()
    t, temperature = experience.response_ids.shape[1], trainer.cfg.TEMPERATURE
    with trainer.backend.autocast():
        logprobs, _, _ = trainer.model(ids, attention, experience.response_ids, temperature)
        logits = ppo.response_logits(trainer.policy, True, ids, attention, t)
    assert logits.dtype == torch.bfloat16
    expected = ppo.logprobs_and_entropy(logits, experience.response_ids, temperature)[0]
    torch.testing.assert_close(logprobs[mask], expected[mask], atol=1e-6, rtol=1e-6)


def test_offloaded_models_move_once_per_phase(make_trainer, monkeypatch):
    """With OFFLOAD_REF_AND_REWARD the reference crosses to the device once per rollout and the reward model
    once per rollout and once per evaluation, however many micro-batches or chunks they hold."""
    trainer = make_trainer(OFFLOAD_REF_AND_REWARD=True, BATCH_SIZE=1, GROUP_SIZE=2, GRADIENT_ACCUMULATION_STEPS=4)
    moves = []
    for name in ("ref", "reward_model"):
        model = getattr(trainer, name)
        original = model.to
        monkeypatch.setattr(model, "to", lambda *a, _n=name, _o=original, **k: (moves.append(_n), _o(*a, **k))[1])
    trainer.make_experience(["What is 3 + 4?", "What is 12 + 5?", "What is 41 + 9?", "What is 7 + 0?"])
    assert moves == ["reward_model", "reward_model", "ref", "ref"]          # in and out, once each
    moves.clear()
    trainer.evaluate(["What is 3 + 4?", "What is 12 + 5?", "What is 41 + 9?"])     # 2 chunks of 2
    assert moves == ["reward_model", "reward_model"]


def test_the_critic_is_saved_with_the_policys_tokenizer(tiny, make_trainer):
    """The critic reads the policy's token ids; its checkpoint folder carries that tokenizer, not the reward
    model's (here another vocabulary order)."""
    from transformers import AutoTokenizer
    trainer = make_trainer(REWARD_MODEL=tiny["other_reward"], MAX_STEPS=1, EVAL_DATASETS=[])
    trainer.train()
    saved = AutoTokenizer.from_pretrained(trainer.output_dir / "checkpoints" / "step_1" / "critic")
    assert saved.get_vocab() == trainer.tokenizer.get_vocab() != trainer.reward_tokenizer.get_vocab()


def test_an_overlong_reward_input_keeps_its_response(tiny, tmp_path, monkeypatch):
    """A reward model with learned positions up to 32 tokens: a longer prompt + response is cut from the left,
    so scoring works and the response's end (where the score is read) is kept."""
    from transformers import GPT2Config, GPT2ForSequenceClassification
    tok = word_tokenizer("right", append_eos=True)
    torch.manual_seed(0)
    reward = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=1,
                                                      n_head=2, num_labels=1, pad_token_id=0))
    path = save_model(reward, tok, tmp_path / "gpt2_reward")
    trainer = ppo.PPOTrainer(**tiny_settings(tiny, tmp_path / "out", REWARD_MODEL=path))
    inputs, original = [], ppo.sequence_scores
    monkeypatch.setattr(ppo, "sequence_scores", lambda m, ids, mask: (inputs.append((ids, mask)),
                                                                       original(m, ids, mask))[1])
    long_prompt = "What is " + " + ".join(str(i) for i in range(20)) + "?"
    assert len(tok(long_prompt + " 7.")["input_ids"]) > 32
    scores = trainer.reward_model_scores([long_prompt, "What is 3 + 4?"], [" 7.", " 7."])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    ids, mask = inputs[0]
    assert ids.shape[1] == 32 and mask[0].all()
    assert tok.decode(ids[0]).endswith("? 7.<eos>") and ids[0, -1] == tok.eos_token_id


def test_a_long_prompt_keeps_its_chat_header_and_the_reward_model_reads_what_was_kept(tiny, make_trainer,
                                                                                   monkeypatch):
    """MAX_PROMPT_LENGTH cuts the content, not the template: the prompt ids still open with the template's
    header and end with its generation prompt, and the reward model reads the kept text, not the full one."""
    trainer = make_trainer(ACTOR_MODEL=tiny["chat_policy"], MAX_PROMPT_LENGTH=14)
    tok = trainer.tokenizer
    prompt = "What is 123 + 456 + 789?"
    trainer.prepare_prompts([prompt])
    ids = trainer.prompt_ids[prompt]
    header = tok("user: ", add_special_tokens=False)["input_ids"]
    opening = tok("\nassistant: ", add_special_tokens=False)["input_ids"]
    assert len(ids) <= 14 and ids[:len(header)] == header and ids[-len(opening):] == opening
    kept = trainer.prompt_contents[prompt]
    assert kept != prompt and prompt.endswith(kept) and kept.endswith("789?")
    assert trainer.prompt_texts[prompt] == tok.decode(ids)
    seen = reward_texts_seen(trainer, monkeypatch)
    trainer.reward_model_scores([prompt], [" 1368."])
    assert seen == [tok.decode(ids) + " 1368."] and "123" not in seen[0]


@pytest.mark.parametrize("kind", ["sentencepiece", "whitespace_words", "word_level_with_eos"])
def test_a_reward_model_with_the_policys_tokenizer_reads_the_policys_own_ids(tiny, tmp_path, kind, monkeypatch):
    """The same vocabulary and the same ids for the same texts (checked, not taken from a path or a class):
    the reward model reads the ids the policy sampled, inside the reward tokenizer's own BOS / EOS (one BOS,
    not two), with no decode and re-encode: a non-canonical tokenization stays as sampled. A pair that
    generate_response did not write (a changed response) is tokenized from its text."""
    if kind == "word_level_with_eos":            # the shipped default's shape: the reward tokenizer adds EOS
        trainer = ppo.PPOTrainer(**tiny_settings(tiny, tmp_path / "out", MAX_NEW_TOKENS=6))
    else:
        tok = sentencepiece_tokenizer() if kind == "sentencepiece" else whitespace_word_tokenizer()
        reward_tok = tok if kind == "sentencepiece" else whitespace_word_tokenizer(append_eos=True)
        policy, reward = family(tmp_path, kind, tok, reward_tokenizer=reward_tok)
        trainer = ppo.PPOTrainer(**tiny_settings(tiny, tmp_path / "out", ACTOR_MODEL=policy, REWARD_MODEL=reward,
                                                 CRITIC_MODEL=policy, MAX_NEW_TOKENS=6, USE_CHAT_TEMPLATE=False))
    tok, rtok = trainer.tokenizer, trainer.reward_tokenizer
    assert trainer.reward_reads_policy_ids
    assert "reads the policy's own token ids" in trainer.log_path.read_text()
    prefix, suffix = trainer.reward_specials
    assert prefix == [rtok.bos_token_id] and suffix == ([] if kind == "sentencepiece" else [rtok.eos_token_id])
    prompts = ["the bird was", "What is 3 + 4 ?"] if kind != "word_level_with_eos" else ["What is 3 + 4?"] * 2
    rollout = trainer.generate_response(prompts * 2)
    inputs = reward_ids_seen(monkeypatch)
    trainer.reward_model_scores(rollout.prompts, rollout.responses)
    ids, attention = inputs[0]
    for row, mask, query, qmask, response, rmask in zip(ids, attention, rollout.query_ids, rollout.query_mask,
                                                        rollout.response_ids, rollout.response_mask):
        body = response[rmask].tolist()
        body = body[:-1] if body[-1] in trainer.stop_ids else body
        prompt_ids = query[qmask].tolist()
        assert prompt_ids[0] == rtok.bos_token_id and prompt_ids.count(rtok.bos_token_id) == 1
        assert row[mask.bool()].tolist() == prompt_ids + body + suffix
    # SentencePiece: " very" sampled one piece per character, where its tokenizer writes one piece.
    prompt = "What is 3 + 4?" if kind == "word_level_with_eos" else "the bird was"
    word = " 17" if kind == "word_level_with_eos" else " very"
    canonical = tok(word, add_special_tokens=False)["input_ids"]
    pieces = tok.convert_tokens_to_ids(["\u2581", "v", "e", "r", "y"]) if kind == "sentencepiece" else canonical
    text = ppo.response_texts(tok, [trainer.prompt_ids[prompt]], [pieces])[0]
    trainer.generated_ids[(prompt, text)] = pieces
    own, retokenized = trainer.reward_input_ids([prompt, prompt], [text, text + " ."])
    assert own == trainer.prompt_ids[prompt] + pieces + suffix
    if kind == "sentencepiece":
        assert text == word and pieces != canonical and tok.unk_token_id not in pieces
        assert own != rtok(trainer.prompt_texts[prompt].removeprefix(rtok.bos_token) + text)["input_ids"]
    assert retokenized == rtok(trainer.prompt_texts[prompt].removeprefix(rtok.bos_token) + text + " .")["input_ids"]


def test_a_lookalike_tokenizer_is_not_taken_for_the_policys():
    """Same vocabulary, same class, but a lowercasing normalizer: the ids differ for the same text, so the
    reward model must read text; and another vocabulary order is another tokenizer."""
    from tokenizers import normalizers
    from conftest import word_tokenizer as words
    tok = whitespace_word_tokenizer()
    lower = whitespace_word_tokenizer()
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert tok.get_vocab() == lower.get_vocab() and type(tok) is type(lower)
    assert ppo.shares_tokenizer(tok, whitespace_word_tokenizer(append_eos=True))
    assert not ppo.shares_tokenizer(tok, lower)
    assert not ppo.shares_tokenizer(words(), words(reverse_vocab=True))


def test_reward_ids_from_policy_keeps_one_bos_and_cuts_from_the_left():
    bos, eos = 1, 2
    assert ppo.reward_ids_from_policy([bos, 5, 6], [7, 8], [bos], [eos], None) == [bos, 5, 6, 7, 8, eos]
    assert ppo.reward_ids_from_policy([5, 6], [7, 8], [bos], [eos], None) == [bos, 5, 6, 7, 8, eos]
    assert ppo.reward_ids_from_policy([bos, 5, 6], [7, 8], [], [], None) == [bos, 5, 6, 7, 8]
    assert ppo.reward_ids_from_policy([bos, 5, 6], [7, 8], [bos], [eos], 4) == [bos, 7, 8, eos]
    for limit in range(3, 9):
        cut = ppo.reward_ids_from_policy([bos, 3, 4, 5, 6], [7, 8, 9], [bos], [eos], limit)
        assert len(cut) == min(limit, 9) and cut[0] == bos and cut[-2:] == [9, eos]
