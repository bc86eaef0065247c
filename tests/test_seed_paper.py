"""benchmarks/seed_paper.py: its data split, label noise, logit distance and statistics
checked by hand, and its --fast run end to end (a smoke test: its numbers mean nothing)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hf_kd import distillation_loss

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "seed_paper.py"
spec = importlib.util.spec_from_file_location("bench_seed_paper", PATH)
seed_paper = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = seed_paper  # dataclasses resolve their module by name
spec.loader.exec_module(seed_paper)


def test_split_is_fixed_stratified_and_a_partition_of_the_digits():
    from sklearn.datasets import load_digits

    split = seed_paper.digits_split()
    again = seed_paper.digits_split()
    for name, (x, y) in split.items():
        assert torch.equal(x, again[name][0]) and torch.equal(y, again[name][1])
        assert x.shape[1:] == (1, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert {k: len(v[1]) for k, v in split.items()} == {
        "train": 1078,
        "valid": 359,
        "test": 360,
    }

    def key(image, label):  # an example as the benchmark sees it
        return (tuple(image.flatten().tolist()), int(label))

    images, labels = load_digits(return_X_y=True)
    x_all = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 8.0 - 1.0
    everything = Counter(key(i, label) for i, label in zip(x_all, labels))
    parts = Counter(key(i, label) for x, y in split.values() for i, label in zip(x, y))
    assert parts == everything  # every example in exactly one part: disjoint and complete
    for _, y in split.values():  # stratified: each class's share within one example
        for c, n in Counter(labels.tolist()).items():
            assert abs(int((y == c).sum()) - n * len(y) / len(labels)) <= 1


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.4, 1.0])
def test_noise_flips_exactly_the_fraction_each_to_another_class(fraction):
    labels = torch.arange(10).repeat(103)  # 1030 labels: 20% is 206 exactly
    noisy = seed_paper.symmetric_noise(labels, fraction, classes=10, seed=3)
    flipped = noisy != labels
    assert int(flipped.sum()) == round(fraction * len(labels))
    assert noisy.min() >= 0 and noisy.max() <= 9 and torch.equal(labels, torch.arange(10).repeat(103))
    assert torch.equal(noisy, seed_paper.symmetric_noise(labels, fraction, classes=10, seed=3))
    if fraction == 1.0:  # symmetric: every other class receives flips (1030 draws of 9)
        assert all(len(set(noisy[labels == c].tolist())) == 9 for c in range(10))


def test_logit_distance_by_hand_and_against_the_losses():
    student = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    # raw: (1 + 4 + 9 + 3 * 25) / 6; centered: row 1 differs by [-1, 0, 1] around its mean, row 2 by a shift only
    assert seed_paper.logit_distance(student, teacher, centered=False) == pytest.approx(89 / 6)
    assert seed_paper.logit_distance(student, teacher) == pytest.approx(2 / 6)
    g = torch.Generator().manual_seed(0)
    s, t = (
        torch.randn(7, 10, generator=g, dtype=torch.float64),
        torch.randn(7, 10, generator=g, dtype=torch.float64),
    )
    # the raw distance is hf_kd's mse loss; the centered one is twice T^2 * KL in the T -> inf limit (claim 1)
    mse = distillation_loss(s, t, loss_type="mse").item()
    assert seed_paper.logit_distance(s, t, centered=False) == pytest.approx(mse, rel=1e-12)
    kl = distillation_loss(s, t, loss_type="forward_kl", temperature=1000.0).item()
    assert seed_paper.logit_distance(s, t) == pytest.approx(2 * kl, rel=1e-3)


def test_a_seed_fixes_the_init_and_the_batch_order(tmp_path):
    """What makes the comparisons paired: with alpha 0 (CE only) the temperature is
    irrelevant, so two students of one seed end bit-identical; another seed differs."""
    x, y = seed_paper.digits_split()["train"]
    data = seed_paper.rows(x[:256], y[:256])
    teacher = seed_paper.vit(seed_paper.TEACHER, 0)
    s = replace(seed_paper.FAST, batch_size=32)

    def student(seed: int, temperature: float):
        model = seed_paper.vit(seed_paper.STUDENT, 1000)  # the same init each time
        kd = {"alpha": 0.0, "temperature": temperature}
        seed_paper.train(model, data, s, 6, seed, str(tmp_path), teacher, **kd)
        return model.state_dict()

    a, b, other = student(0, 1.0), student(0, 4.0), student(1, 1.0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], other[k]) for k in a)  # batches of another order


def test_paired_differences_and_verdicts():
    stat = seed_paper.paired([3.0, 4.0, 5.0], [1.0, 1.0, 1.0])  # differences 2, 3, 4
    t = 3.0 / (1.0 / math.sqrt(3))  # mean / (sd / sqrt(n))
    assert stat["mean"] == 3.0 and stat["sd"] == 1.0 and stat["n"] == 3
    assert stat["p"] == pytest.approx(1 - t / math.sqrt(t * t + 2))  # two-sided p of Student's t, df 2
    assert seed_paper.paired([1.0, 2.0], [0.0, 1.0])["p"] is None  # no spread: no test
    yes, no, unsure = (
        {"mean": 1, "p": 0.01},
        {"mean": -1, "p": 0.01},
        {"mean": 1, "p": 0.2},
    )
    verdict = seed_paper.verdict
    assert verdict([yes, yes]) == "yes" and verdict([yes, unsure]) == "partly"
    assert verdict([yes, no]) == "mixed" and verdict([no, no]) == "no, the opposite"
    assert verdict([no, unsure]) == "no" and verdict([unsure, {"mean": 0, "p": None}]) == "not resolved"


def test_fast_run_writes_a_verdict_per_claim(tmp_path):
    s = seed_paper.FAST
    results = seed_paper.run(s, tmp_path, command="pytest")
    assert json.loads((tmp_path / "seed_paper.json").read_text())["claims"] == results["claims"]
    text = (tmp_path / "seed_paper.md").read_text()
    assert text.startswith("## README table\n")
    table = text.split("\n\n")[1].splitlines()  # the README table, the first block
    rows = [line.split(" | ") for line in table[2:]]
    assert [row[0] for row in rows] == ["| 1a", "| 1b", "| 2", "| 3", "| 4a", "| 4b"]
    verdicts = {"yes", "partly", "mixed", "no", "no, the opposite", "not resolved"}
    assert all(len(row) == 4 and row[3].removesuffix(" |") in verdicts for row in rows)
    assert results["teachers"]["clean"]["test_acc"] > 0.5  # chance is 0.1
    assert set(results["students"]) == {"clean", "40% noise"}
    for condition, runs in results["students"].items():
        expected = set(seed_paper.methods(s, noisy=condition != "clean"))
        assert expected <= set(runs) and all(len(r) == s.seeds for r in runs.values())
        for r in (r for rs in runs.values() for r in rs):
            assert 0 <= r["test_acc"] <= 1 and 0 <= r["valid_acc"] <= 1
            assert 0 <= r["distance"] <= r["raw_distance"]  # centering never adds
    clean = set(results["students"]["clean"]) - set(seed_paper.methods(s, noisy=False))
    assert clean == set(seed_paper.ASSISTED)  # the sequential pair, clean labels only
