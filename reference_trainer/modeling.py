"""The policy's tokenizer and model: built locally or loaded from a folder, saved the HF way.

The embedded demo needs no model hub: ``igpo_rewards.testing.tiny.train_tokenizer`` trains a
byte-level BPE chat tokenizer on the world's text and ``igpo_rewards.testing.tiny.build_model``
builds a small ``LlamaForCausalLM`` for it (the library's builders, also used by its tests).

``save_pretrained`` writes both with ``save_pretrained`` (safetensors weights) and
``load_pretrained`` reads them back with ``AutoTokenizer`` / ``AutoModelForCausalLM``; the
same loader reads a real pretrained chat model given with ``--model PATH``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from igpo_rewards.testing.tiny import ATTENTION_IMPLEMENTATIONS

__all__ = [
    "count_parameters",
    "load_pretrained",
    "save_pretrained",
]


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def save_pretrained(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | os.PathLike[str]
) -> Path:
    """Write ``model`` (safetensors) and ``tokenizer`` to ``directory`` with ``save_pretrained``.

    The directory is created if needed; ``load_pretrained`` (or plain
    ``AutoTokenizer.from_pretrained`` / ``AutoModelForCausalLM.from_pretrained``) reads it back.
    Returns the directory as a ``Path``.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def load_pretrained(
    path: str | os.PathLike[str],
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory written by ``save_pretrained``.

    Works for the tiny models of ``igpo_rewards.testing.tiny`` and for real HF chat models (Qwen2.5-Instruct,
    Llama-3-Instruct, ...). Loads safetensors only (never pickles). When the tokenizer has no
    pad token its eos token is used as pad (common for Llama tokenizers).

    Args:
        path: a local directory with config.json, safetensors weights and tokenizer files.
        attn_implementation: ``"sdpa"`` or ``"eager"`` (both take the packed probe masks).
        dtype: the model's parameter dtype (``torch.bfloat16`` for 7B models on a GPU).
        device: where to put the model; ``None`` leaves it on the CPU.

    Raises:
        FileNotFoundError: ``path`` is not a directory or lacks config.json.
        ValueError: unsupported ``attn_implementation``; a tokenizer without a chat template
            or without both pad and eos tokens.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"model path {str(directory)!r} is not a directory")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"model path {str(directory)!r} has no config.json (not a save_pretrained directory)")
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {attn_implementation!r}"
        )
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer in {str(directory)!r} has no chat template; use a chat (Instruct) model")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer in {str(directory)!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation=attn_implementation, dtype=dtype, use_safetensors=True
    )
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer
