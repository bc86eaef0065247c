"""Tiny models and tokenizers built from configs, saved and reloaded through from_pretrained (no network)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest
import torch

torch.set_num_threads(1)  # tiny models: thread start-up costs more than it saves, and CI machines are shared
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402 (after the environment and thread settings above)
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast  # noqa: E402 (after the environment and thread settings above)

SPECIALS = ["<pad>", "<eos>", "<unk>"]
WORDS = [f"w{i}" for i in range(37)]  # 40 tokens in all


def save_tiny_llama(path, vocab_size: int, seed: int, hidden: int = 32, layers: int = 2) -> str:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


def save_tokenizer(path) -> str:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(path)
    return str(path)


def load_model(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tokenizer (40 tokens), a teacher and a student with matching vocab 40, and padded-vocab variants."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "tokenizer": save_tokenizer(root / "tokenizer"),
        "teacher": save_tiny_llama(root / "teacher", vocab_size=40, seed=1, hidden=48),
        "student": save_tiny_llama(root / "student", vocab_size=40, seed=2, hidden=32),
        "teacher_padded": save_tiny_llama(root / "teacher_padded", vocab_size=48, seed=3, hidden=48),
        "student_padded": save_tiny_llama(root / "student_padded", vocab_size=44, seed=4, hidden=32),
        "teacher_small": save_tiny_llama(root / "teacher_small", vocab_size=32, seed=5, hidden=48),
    }


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir["tokenizer"])


def variable_length_examples(n: int, vocab: int = 40, seed: int = 0, min_len: int = 3, max_len: int = 12):
    """Pre-tokenized examples of different lengths; the first two tokens of each are a 'prompt' (labels -100)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return rows
