"""Save/load round trips and the parameter count of the trainer's models
(igpo_rewards.reference_trainer.modeling); the builders are tested in tests/test_tiny.py."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from igpo_rewards.reference_trainer.modeling import count_parameters, load_pretrained, save_pretrained
from igpo_rewards.testing.tiny import build_model, train_tokenizer

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


def test_count_parameters_counts_tied_embeddings_once(tokenizer):
    model = build_model(tokenizer, **TINY)
    distinct = {id(parameter): parameter.numel() for parameter in model.parameters()}
    assert count_parameters(model) == sum(distinct.values())
    tied = model.get_input_embeddings().weight.numel()
    assert count_parameters(model) == sum(t.numel() for t in model.state_dict().values()) - tied


def test_save_and_load_round_trip(tokenizer, tmp_path):
    model = build_model(tokenizer, seed=3, **TINY).eval()
    directory = save_pretrained(model, tokenizer, tmp_path / "ckpt")
    assert (directory / "model.safetensors").is_file()
    assert not list(directory.glob("*.bin"))
    ids = torch.tensor([tokenizer(TEXTS[2]).input_ids])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    loaded_model, loaded_tokenizer = load_pretrained(directory)
    auto_model = AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded_model(input_ids=ids).logits, expected, atol=0, rtol=0)
        torch.testing.assert_close(auto_model(input_ids=ids).logits, expected, atol=1e-6, rtol=1e-6)
    assert loaded_tokenizer(TEXTS[3]).input_ids == tokenizer(TEXTS[3]).input_ids
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert not loaded_model.training


def test_load_pretrained_errors(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
    directory = save_pretrained(build_model(tokenizer, **TINY), tokenizer, tmp_path / "ok")
    with pytest.raises(ValueError, match="attn_implementation"):
        load_pretrained(directory, attn_implementation="flex_attention")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    config.pop("chat_template", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="chat template"):
        load_pretrained(directory)


