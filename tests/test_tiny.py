"""The tiny chat tokenizer and causal LM builders of igpo_rewards.testing.tiny."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from igpo_rewards.agent.protocol import TAGS
from igpo_rewards.testing.tiny import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, build_model, make_tiny_pretrained, train_tokenizer


def count_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


TEXTS = [
    "Paris is the capital of France. The Seine flows through Paris.",
    "Question: where was Ada Lovelace born? <search> Ada Lovelace birthplace </search>",
    "<information> Doc 1(Title: \"Ada\") Ada was born in London. </information>",
    "<think> London is in England. </think> <answer> London </answer>",
] * 5

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=400)


@pytest.mark.parametrize(
    "text",
    [
        "<search> capital of Frànce </search>\n\n<information>  two  spaces\ttab </information>",
        "unseen words: zyxwv Ωmega 日本語 emoji 🙂 and digits 1234567",
        "<answer>London</answer><|im_end|>",
    ],
)
def test_encode_decode_round_trip(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text


def test_tags_are_single_non_special_tokens(tokenizer):
    for tag in TAGS:
        ids = tokenizer(tag).input_ids
        assert len(ids) == 1, tag
        assert tag not in tokenizer.all_special_tokens
    text = "<think> a </think><search> b </search><information> c </information><answer> d </answer>"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    with_specials = BOS_TOKEN + text + EOS_TOKEN + PAD_TOKEN
    assert tokenizer.decode(tokenizer(with_specials).input_ids, skip_special_tokens=True) == text


def test_special_tokens_and_no_automatic_specials(tokenizer):
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    ids = tokenizer("Paris").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == tokenizer.tokenize("Paris")
    assert not set(ids) & set(tokenizer.all_special_ids)


def test_tags_do_not_spend_merges(tokenizer):
    # Tag fragments are cut out before training, so no learned token contains "answer>".
    assert not [token for token in tokenizer.get_vocab() if "answer>" in token and token not in TAGS]


def test_chat_template_is_chatml(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|startoftext|><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert no_prompt == text.removesuffix("<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert list(ids) == tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(ids[:2]) == [BOS_TOKEN, "<|im_start|>"]


def test_offsets_cover_the_text(tokenizer):
    text = "Now there's enough information to answer\n<answer> Paris </answer>"
    encoding = tokenizer(text, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]
    assert len(offsets) == len(encoding.input_ids)
    assert "".join(text[start:end] for start, end in offsets) == text
    for token_id, (start, end) in zip(encoding.input_ids, offsets):
        assert tokenizer.decode([token_id]) == text[start:end]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(vocab_size=100), "vocab_size"),
        (dict(min_frequency=0), "min_frequency"),
    ],
)
def test_train_tokenizer_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train_tokenizer(TEXTS, **kwargs)


def test_train_tokenizer_rejects_empty_and_non_text():
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer([])
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer(["<answer></answer>"])
    with pytest.raises(TypeError, match="index 1"):
        train_tokenizer(["ok", 3])


def test_train_tokenizer_saves(tmp_path):
    tokenizer = train_tokenizer(TEXTS, vocab_size=300, save_dir=tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = TEXTS[1] + TEXTS[3]
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded.chat_template == tokenizer.chat_template


def _expected_parameters(vocab, hidden, layers, heads, kv_heads, intermediate):
    head_dim = hidden // heads
    attention = hidden * hidden * 2 + 2 * hidden * kv_heads * head_dim  # q, o, k, v (no bias)
    mlp = 3 * hidden * intermediate
    return vocab * hidden + layers * (attention + mlp + 2 * hidden) + hidden  # tied head, norms


def test_build_model_size_and_config(tokenizer):
    model = build_model(tokenizer, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=96)
    assert count_parameters(model) == _expected_parameters(len(tokenizer), 64, 3, 4, 2, 96)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.config._attn_implementation == "sdpa"
    assert (model.config.pad_token_id, model.config.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    # The defaults are meant to train on 2 CPU cores: about 1M parameters with a 2048 vocabulary.
    assert 0.5e6 < _expected_parameters(2048, 128, 4, 4, 4, 384) < 5e6


def test_build_model_is_seeded_and_leaves_global_rng_alone(tokenizer):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = build_model(tokenizer, seed=7, **TINY)
    after = torch.rand(3)
    second = build_model(tokenizer, seed=7, **TINY)
    third = build_model(tokenizer, seed=8, **TINY)
    assert torch.equal(before, after)
    for (name, a), (_, b), (_, c) in zip(
        first.state_dict().items(), second.state_dict().items(), third.state_dict().items()
    ):
        assert torch.equal(a, b), name
    assert not torch.equal(first.get_input_embeddings().weight, third.get_input_embeddings().weight)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(hidden_size=30, num_heads=4), "divisible"),
        (dict(hidden_size=12, num_heads=4), "even head dim"),
        (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (dict(num_layers=0), "num_layers"),
        (dict(attn_implementation="flash_attention_2"), "attn_implementation"),
    ],
)
def test_build_model_rejects_bad_sizes(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(tokenizer, **{**TINY, **kwargs})


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_custom_4d_float_mask_is_applied(tokenizer, attn_implementation):
    model = build_model(tokenizer, attn_implementation=attn_implementation, **TINY).eval()
    ids = torch.tensor([tokenizer(TEXTS[0]).input_ids[:12]])
    n = ids.shape[1]
    causal = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)[None, None]
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        masked = model(input_ids=ids, attention_mask=causal).logits
        # Hiding token 0 from every later query must change their outputs: the mask is used.
        hidden_first = causal.clone()
        hidden_first[..., 1:, 0] = torch.finfo(torch.float32).min
        changed = model(input_ids=ids, attention_mask=hidden_first).logits
    torch.testing.assert_close(masked, plain, atol=1e-5, rtol=1e-5)
    assert (changed[0, 1:] - plain[0, 1:]).abs().max() > 1e-3


def test_make_tiny_pretrained_loads_like_a_hub_chat_model(tmp_path):
    directory = make_tiny_pretrained(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert count_parameters(model) < 100_000
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who wrote it?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] == inputs.input_ids.shape[1] + 4 or tokenizer.eos_token_id in output[0].tolist()
    again = make_tiny_pretrained(tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (directory / "model.safetensors").read_bytes()
