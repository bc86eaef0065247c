"""benchmarks/cross_tokenizer.py: the two tokenizers it builds, its NLL per symbol against a hand computation, and a
--quick run end to end (the cross-tokenizer path taken, the rows of its tables, the headline arithmetic)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    """benchmarks/ is a folder of scripts, not a package: import one by path."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load("cross_tokenizer")


@pytest.fixture(autouse=True)
def _restore_logging():
    """run() quiets the transformers logger for its tables; later tests need it."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    yield
    hf_logging.set_verbosity(verbosity)


@pytest.fixture(scope="module")
def chain_data():
    from hf_kd.cli.demo import FAST, make_chain, sample

    rng = np.random.default_rng(0)
    return sample(make_chain(FAST, rng), 200, FAST.seq_len, rng), FAST.symbols


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, chain_data):
    seqs, symbols = chain_data
    root = tmp_path_factory.mktemp("toks")
    student = bench.save_tokenizer(bench.word_merges(symbols), str(root / "student"))
    merges = bench.word_merges(symbols) + bench.coarse_merges(seqs, symbols, 50)
    coarse = bench.save_tokenizer(merges, str(root / "coarse"), reverse_ids=True)
    return student, coarse


def test_student_one_token_per_symbol_coarse_whole_symbols(chain_data, tokenizers):
    seqs, symbols = chain_data
    student, coarse = tokenizers
    assert len(student) == 2 + len(bench.ALPHABET) + 1 + symbols  # specials, bytes, "Ġs", one token per symbol
    student_tokens = coarse_tokens = 0
    for row in seqs.tolist():
        text = "".join(f" s{k}" for k in row)
        ids = student(text, add_special_tokens=False)["input_ids"]
        assert [student.decode([i]) for i in ids] == [f" s{k}" for k in row]
        pieces = [coarse.decode([i]) for i in coarse(text, add_special_tokens=False)["input_ids"]]
        assert "".join(pieces) == text and all(re.fullmatch(r"( s\d+)+", piece) for piece in pieces)
        student_tokens, coarse_tokens = student_tokens + len(ids), coarse_tokens + len(pieces)
    assert coarse_tokens < 0.8 * student_tokens  # 50 merges learned on these very sequences
    # every student token is in the coarse vocabulary, under another id (not the student's vocabulary extended)
    assert all(coarse.convert_tokens_to_ids(t) is not None for t in student.get_vocab())
    assert any(coarse.convert_tokens_to_ids(t) != i for t, i in student.get_vocab().items())


def test_nll_per_symbol_by_hand(tmp_path, chain_data, tokenizers):
    from hf_kd.cli.demo import build_model

    seqs, _ = chain_data
    seqs = seqs[:6]
    _, coarse = tokenizers
    data = bench.tokenized(seqs, coarse, str(tmp_path), "hand")
    assert len({len(row) for row in data["input_ids"]}) > 1  # rows of different lengths: the batch is padded
    model = build_model(len(coarse), (16, 1), seqs.shape[1], seed=0)
    with torch.no_grad():
        got = bench.nll_per_symbol(model, data, seqs.shape[1] - 2, batch_size=4)
        for row, value in zip(seqs.tolist(), got):
            prompt = coarse("".join(f" s{k}" for k in row[:2]), add_special_tokens=False)["input_ids"]
            completion = coarse("".join(f" s{k}" for k in row[2:]), add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + completion])).logits[0].double(), -1)
            # the token at position p is predicted by the logits at p - 1
            nll = -sum(logp[len(prompt) + i - 1, token].item() for i, token in enumerate(completion))
            assert value == pytest.approx(nll / (len(row) - 2), rel=1e-5)


def test_gain_kept():
    assert bench.gain_kept(2.0, 1.5, 1.75) == pytest.approx(0.5)
    assert bench.gain_kept(2.0, 1.5, 2.25) == pytest.approx(-0.5)  # worse than CE: a negative share


def test_quick_run_end_to_end(tmp_path):
    from hf_kd.cli.demo import FAST

    results = bench.run(FAST, [0], tmp_path, command="pytest")
    saved = json.loads((tmp_path / "cross_tokenizer.json").read_text(encoding="utf-8"))
    text = (tmp_path / "cross_tokenizer.md").read_text(encoding="utf-8")
    assert saved["methods"].keys() == bench.METHODS.keys()

    def numbers(value):
        if isinstance(value, dict):
            return [x for v in value.values() for x in numbers(v)]
        if isinstance(value, list):
            return [x for v in value for x in numbers(v)]
        return [value] if isinstance(value, float) else []

    assert all(math.isfinite(x) for x in numbers(saved))
    tok = results["tokenizers"]
    assert tok["A"]["tokens_per_symbol"] == 1.0 and tok["B"]["tokens_per_symbol"] < 1.0
    assert tok["B"]["vocab"] > tok["A"]["vocab"]
    for name, (teacher, _) in bench.METHODS.items():
        first = results["methods"][name]["runs"][0]["first_step"]
        assert ("aligned_fraction" in first) == (teacher == "B")  # only the cross-tokenizer path logs it
        if teacher == "B":
            assert 0 < first["aligned_fraction"] < 1 and 0 < first["shared_mass"] <= 1
            ce, same, cross = (results["methods"][n]["runs"][0]["nll"] for n in (bench.CE, bench.SAME, name))
            assert results["methods"][name]["gain_kept"]["per_seed"] == [pytest.approx((ce - cross) / (ce - same))]
    assert results["teacher_signal"]["span_gap"] >= 0  # a token's probability never exceeds its text's
    assert text.startswith("## README section\n")
    rows = [line.split(" | ")[0].lstrip("| ") for line in text.splitlines() if line.startswith("| ")]
    for name in (
        "teacher A (student's tokenizer)",
        "teacher B (coarse tokenizer)",
        *(f"student: {name}" for name in bench.METHODS),
        *bench.METHODS,
    ):
        assert name in rows, name
    assert "Command: `pytest`" in text
