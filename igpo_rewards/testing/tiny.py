"""Tiny causal LMs and their tokenizers, built locally for tests and doctests (no model hub).

``train_tokenizer`` trains a byte-level BPE tokenizer with HF ``tokenizers`` on the given texts
(so every string round-trips through encode/decode), adds the Search-R1 tags
(``igpo_rewards.agent.protocol.TAGS``) as ordinary (non-special, so they decode) tokens, and
gives it a ChatML chat template so ``tokenizer.apply_chat_template`` works exactly as it does for
Qwen2.5-Instruct, and renders Search-R1 tool calls for TRL's tool loop (``CHAT_TEMPLATE``).
``build_model`` builds a small ``LlamaForCausalLM`` from a config with
``attn_implementation="sdpa"`` (or ``"eager"``), both of which take the custom 4D additive
attention masks that ``igpo_rewards.agent.probes`` uses to pack all probes of a trajectory into
one forward. (Llama rather than Qwen2: transformers 5 loads the tokenizer of any ``qwen2``
checkpoint as ``Qwen2Tokenizer``, which rebuilds the normalizer and pre-tokenizer; next to a
``llama`` config ``AutoTokenizer`` keeps the tokenizer exactly as trained.)
``make_tiny_pretrained`` writes a tiny random model and its tokenizer to a folder that loads
with ``AutoModelForCausalLM`` / ``AutoTokenizer`` like a hub chat model.

The reference trainer builds its from-scratch policy with the same two functions.
Needs torch, transformers and tokenizers (the ``hf`` extra,
``pip install "igpo-rewards[hf] @ git+$IGPO_GIT"``); importing
``igpo_rewards.testing`` does not import this module.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from igpo_rewards.agent.protocol import TAGS
from igpo_rewards.agent.tool_calls import SEARCH_R1_CHAT_TEMPLATE

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "IM_START_TOKEN",
    "PAD_TOKEN",
    "build_model",
    "make_tiny_pretrained",
    "train_tokenizer",
]


BOS_TOKEN = "<|startoftext|>"
#: End of a chat message; the tokenizer's eos token (as in Qwen2.5-Instruct).
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
_SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, IM_START_TOKEN, EOS_TOKEN)

#: ChatML (the Qwen2.5-Instruct layout) preceded by the bos token, with Search-R1 tool calls:
#: ``<|startoftext|><|im_start|>system\n...<|im_end|>\n<|im_start|>user\n...<|im_end|>\n``
#: and, with ``add_generation_prompt=True``, ``<|im_start|>assistant\n``. A ``search`` tool call
#: renders as ``<search> query </search>`` and a tool result as the observation block, so TRL's
#: tool loop (``tools=`` / ``environment_factory=``) accepts these tokenizers and writes the
#: Search-R1 token layout: ``igpo_rewards.agent.tool_calls.SEARCH_R1_CHAT_TEMPLATE`` (its docstring
#: says what differs from plain ChatML: after a final assistant message there is no newline).
CHAT_TEMPLATE = SEARCH_R1_CHAT_TEMPLATE

#: Attention implementations that apply a custom 4D additive float mask as given
#: (transformers passes a 4D mask through unchanged; both add it to the attention scores).
ATTENTION_IMPLEMENTATIONS: tuple[str, ...] = ("sdpa", "eager")

_TAG_SPLIT = re.compile("|".join(re.escape(t) for t in (*TAGS, *_SPECIAL_TOKENS)))


def _pieces_between_tags(texts: Iterable[str]) -> Iterator[str]:
    """Yield the text between tags and special tokens, which the tokenizer never merges across.

    Added tokens split the text before BPE at encode time, so training on the raw text would
    spend merges on fragments of tags ("answer>") that can never occur.
    """
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts must hold str, got {type(text).__name__} at index {index}")
        for piece in _TAG_SPLIT.split(text):
            if piece:
                yield piece


def train_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 2048,
    min_frequency: int = 2,
    save_dir: str | os.PathLike[str] | None = None,
    model_max_length: int = 4096,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with a ChatML chat template on ``texts``.

    Byte-level BPE starts from the 256 byte symbols, so any text (any language, any
    character) encodes and decodes back to itself. Special tokens: ``<|startoftext|>`` (bos),
    ``<|im_end|>`` (eos), ``<|endoftext|>`` (pad), ``<|im_start|>``. The tags in ``TAGS`` are
    added tokens that are NOT special (they decode with ``skip_special_tokens=True``). No
    token is added automatically by ``tokenizer(text)``: the chat template writes the bos.
    Offsets (``return_offsets_mapping=True``) are character offsets into the input string,
    a token's span includes its leading space.

    Args:
        texts: training text (the world's corpus, questions, prompts, demonstrations...).
            Tags and special tokens inside it are cut out before training.
        vocab_size: target vocabulary size including the 256 bytes, the special tokens
            and merges; the tags are added on top. Must be > 256 + 4.
        min_frequency: a pair must occur this often to be merged.
        save_dir: if given, the tokenizer is also written there with ``save_pretrained``.
        model_max_length: recorded in the tokenizer config.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``chat_template`` set and ``padding_side="left"``
        (batched generation pads on the left).

    Raises:
        ValueError: ``vocab_size`` too small, ``min_frequency`` < 1, or no text at all.
        TypeError: a non-str in ``texts``.

    Example:
        >>> tok = train_tokenizer(["the capital of France is Paris"] * 4, vocab_size=300)
        >>> text = "<search> capital of Frànce </search>"
        >>> tok.decode(tok(text).input_ids) == text
        True
        >>> tok.convert_ids_to_tokens(tok("<answer>").input_ids)
        ['<answer>']
    """
    minimum = 256 + len(_SPECIAL_TOKENS) + 1
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(f"vocab_size must be an int >= {minimum} (256 bytes + special tokens), got {vocab_size!r}")
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
    pieces = list(_pieces_between_tags(texts))
    if not pieces:
        raise ValueError("texts is empty (or holds only tags): nothing to train the tokenizer on")

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(pieces, trainer=trainer)
    backend.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in TAGS])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN],
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if save_dir is not None:
        tokenizer.save_pretrained(os.fspath(save_dir))
    return tokenizer


def build_model(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int = 384,
    max_position_embeddings: int = 4096,
    rope_theta: float = 10000.0,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> LlamaForCausalLM:
    """Build a small randomly initialised ``LlamaForCausalLM`` for ``tokenizer``.

    The vocabulary is ``len(tokenizer)`` (trained tokens plus the added tags), the input and
    output embeddings are tied, dropout is 0, float32. The defaults give about 1M parameters
    for a 2048-token vocabulary: trainable on 2 CPU cores. Initialisation draws from a
    private RNG seeded with ``seed`` (the global torch RNG is left untouched), so the same
    arguments give the same weights.

    Args:
        tokenizer: supplies the vocabulary size and the bos/eos/pad ids.
        hidden_size, num_layers, num_heads, intermediate_size: transformer size.
            ``hidden_size`` must be divisible by ``num_heads``; the head dim must be even (RoPE).
        num_kv_heads: key/value heads (grouped-query attention); ``None`` = ``num_heads``.
        max_position_embeddings: longest sequence (prompt + turns + observations + probes).
        rope_theta: RoPE base.
        attn_implementation: ``"sdpa"`` (default) or ``"eager"``; both apply the 4D additive
            float masks of the packed probe forward.
        seed: initialisation seed.

    Raises:
        ValueError: a size that is not a positive int, ``hidden_size`` not divisible by
            ``num_heads``, ``num_heads`` not divisible by ``num_kv_heads``, odd head dim,
            an unsupported ``attn_implementation``, or a tokenizer without a pad token.

    Example:
        >>> tok = train_tokenizer(["a b c d e f"] * 4, vocab_size=270)
        >>> model = build_model(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
        >>> model.config.vocab_size == len(tok), model.config.tie_word_embeddings
        (True, True)
    """
    sizes = {
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
    }
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if not isinstance(kv_heads, int) or kv_heads < 1 or num_heads % kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads!r})")
    if hidden_size % num_heads or (hidden_size // num_heads) % 2:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}) with an even head dim"
        )
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {attn_implementation!r}"
        )
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; set tokenizer.pad_token before building the model")

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        tie_word_embeddings=True,
        attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


#: Text for ``make_tiny_pretrained``'s tokenizer: enough to learn a few merges.
_TINY_TEXTS = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first.",
    "If you lack knowledge, call a search engine by <search> query </search> and it will return"
    " the top searched results between <information> and </information>.",
    "Provide the answer inside <answer> and </answer>, without detailed illustrations."
    " For example, <answer> Beijing </answer>.",
    "Now there's enough information to answer",
    "Question: who was the director of the film? Doc 1(Title: \"The film\") The film was directed by a person.",
    "Question: where was the author born? Doc 2(Title: \"The author\") The author was born in a city.",
    "Question: what is the capital of the country? The capital of the country is a city on the river.",
)


def make_tiny_pretrained(
    directory: str | os.PathLike[str],
    *,
    texts: Iterable[str] | None = None,
    vocab_size: int = 400,
    seed: int = 0,
) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` and a chat tokenizer to ``directory``.

    For tests of the ``--model PATH`` code path: the result loads with
    ``AutoModelForCausalLM`` / ``AutoTokenizer`` like a real pretrained chat model (about 40k
    parameters: hidden 32, 2 layers, 4 heads of which 2 key/value heads). ``texts`` defaults
    to a few Search-R1-style instruction sentences. Returns the directory.
    """
    tokenizer = train_tokenizer(_TINY_TEXTS if texts is None else texts, vocab_size=vocab_size, min_frequency=1)
    model = build_model(
        tokenizer,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=2048,
        seed=seed,
    )
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
