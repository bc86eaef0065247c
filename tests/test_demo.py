"""`hf-kd demo --synthetic --fast`: runs offline, reports every objective, and its numbers are reproducible from what it saves;
the sample-quality score against hand-computed values."""

import json
import math
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_kd.cli import main
from hf_kd.cli.demo import (
    IMPOSSIBLE_NATS,
    OBJECTIVES,
    SPECIALS,
    Settings,
    make_chain,
    plot,
    process_nll,
    sample,
    sample_quality,
)


def test_fast_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--synthetic", "--fast", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())

    names = ["true process (floor)", "teacher (CE, 600 seqs)", *(f"student: {name}" for name in OBJECTIVES)]
    assert [row["model"] for row in results["rows"]] == names
    for name in names:  # the table has a row per model
        assert any(line.startswith(name) for line in printed.splitlines()), printed
    assert (out / "valid_ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in results["rows"][1:]:
        assert len(results["valid_curves"].get(row["model"].removeprefix("student: "), [0])) >= 1
        assert row["ppl"] >= results["rows"][0]["ppl"] * 0.97  # nothing beats the true process (beyond sampling noise)

    # the saved best student loads with plain transformers and reproduces its reported test perplexity
    best = results["best_student"]
    assert best in OBJECTIVES
    reported = next(row for row in results["rows"] if row["model"] == f"student: {best}")
    model = AutoModelForCausalLM.from_pretrained(out / "best_student").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "best_student")
    assert sum(p.numel() for p in model.parameters()) == reported["params"]
    rows = [json.loads(line) for line in (out / "data" / "test.jsonl").read_text().splitlines()]
    words = [(r["prompt"] + r["completion"]).split() for r in rows]
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(w) for w in words])  # [n, L]: every sequence has length L
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.double(), dim=-1)
    # the prompt is the first two symbols: targets are positions 2.., predicted by the logits one position earlier
    nll = -logp[:, 1:-1].gather(-1, ids[:, 2:].unsqueeze(-1)).mean().item()
    assert math.isclose(math.exp(nll), reported["ppl"], rel_tol=1e-6)

    # the floor is the process's own perplexity on the same sequences
    probs = torch.tensor(
        json.loads((out / "data" / "process.json").read_text())["next_symbol_probs"], dtype=torch.float64
    )
    symbols = torch.tensor([[int(w[1:]) for w in row] for row in words])
    floor = -probs[symbols[:, :-2], symbols[:, 1:-1], symbols[:, 2:]].log().mean().item()
    assert math.isclose(math.exp(floor), results["rows"][0]["ppl"], rel_tol=1e-9)
    assert math.isclose(floor, results["entropy_nats"], rel_tol=1e-9)
    assert os.path.exists(out / "tokenizer" / "tokenizer.json")

    # the sample-quality columns: every row has them, finite; the process's own samples (the test set) score exactly the
    # floor. "> entropy" would not be a sound check of a model's samples: a sampler sharper than the process scores
    # below the entropy (test_sample_nll_can_beat_the_entropy); what holds for every sample is NLL >= its mode bound
    header = next(line for line in printed.splitlines() if line.startswith("model"))
    assert "sample NLL" in header and "sample KL" in header
    assert math.isclose(results["rows"][0]["sample_nll"], results["entropy_nats"], rel_tol=1e-9)
    for row in results["rows"]:
        q = row["sample"]
        assert math.isfinite(row["sample_nll"]) and math.isfinite(row["sample_kl"]), row
        assert row["sample_nll"] >= q["mode_bound"] - 1e-9 and q["tokens"] == len(words) * (len(words[0]) - 2)
        assert 0 <= q["specials"] <= q["impossible"] <= q["tokens"]
        assert q["nll"] <= IMPOSSIBLE_NATS
    # ... and reproduce from the saved student and process: the same prompts and sampling seed give the same samples
    again = sample_quality(model, probs, symbols[:, :2], symbols.shape[1], seed=0)
    assert math.isclose(again["nll"], reported["sample_nll"], rel_tol=1e-9)
    assert math.isclose(again["kl"], reported["sample_kl"], rel_tol=1e-9)
    on_policy = next(row for row in results["rows"] if row["model"] == "student: on-policy reverse KL")
    assert 0 < on_policy["generation_time_share"] < 1  # it did generate; the off-policy students did not
    assert all(row["generation_time_share"] is None for row in results["rows"] if "on-policy" not in row["model"])


def test_process_nll_by_hand():
    """Two symbols, a hand-written chain; tokens are symbols + 3 (the specials come first)."""
    # chain[a][b] = P(next | a, b); (0, 1) -> 1 is impossible
    chain = torch.tensor([[[0.25, 0.75], [1.0, 0.0]], [[0.5, 0.5], [0.1, 0.9]]], dtype=torch.float64)
    s = len(SPECIALS)
    tokens = torch.tensor([[0, 0, 1, 0, 0], [0, 1, 1, 1 - s, 0]]) + s  # row 2: impossible 1, then <eos> (id 1), then 0
    q = process_nll(chain, tokens)
    cap = IMPOSSIBLE_NATS
    # row 1: (0,0)->1 0.75, (0,1)->0 1.0, (1,0)->0 0.5
    # row 2: (0,1)->1 impossible, then <eos> (a special), then 0 after a context holding <eos>
    expected = [-math.log(0.75), 0.0, -math.log(0.5), cap, cap, cap]
    assert q["nll"] == pytest.approx(sum(expected) / 6, rel=1e-12)
    assert (q["impossible"], q["specials"], q["tokens"]) == (3, 1, 6)
    best = [-math.log(0.75), 0.0, -math.log(0.5), 0.0, -math.log(0.9), cap]  # least NLL possible at each position
    assert q["mode_bound"] == pytest.approx(sum(best) / 6, rel=1e-12)


def test_sample_nll_can_beat_the_entropy():
    """Why the demo does not assert "sample NLL >= entropy": the process's own samples score the entropy (within
    sampling noise), its greedy continuations score far below it, and only KL(model || process) is >= 0 for all."""
    rng = np.random.default_rng(0)
    s = Settings()
    chain = make_chain(s, rng)
    seqs = sample(chain, 400, s.seq_len, rng)
    entropy = -(chain * chain.clamp_min(1e-300).log()).sum(-1)  # [K, K]: H(next | context)
    own = process_nll(chain, seqs + len(SPECIALS))
    greedy = seqs.clone()
    for t in range(2, s.seq_len):  # the process's most likely continuation at every step
        greedy[:, t] = chain[greedy[:, t - 2], greedy[:, t - 1]].argmax(-1)
    sharp = process_nll(chain, greedy + len(SPECIALS))
    assert own["impossible"] == sharp["impossible"] == 0
    assert own["nll"] == pytest.approx(entropy[seqs[:, :-2], seqs[:, 1:-1]].mean().item(), abs=0.03)  # ~ its entropy
    assert sharp["nll"] == pytest.approx(sharp["mode_bound"]) and sharp["nll"] < own["nll"] - 0.3


def test_the_plot_shows_the_range_where_the_students_differ(tmp_path, monkeypatch):
    """The first evaluations sit near 16 while the students end between 4.5 and 6: the axis runs from the floor to a
    bit above the worst final value, and the floor and teacher lines are labelled on the picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {
        "CE only": [(10, 16.0), (20, 6.4), (30, 5.9)],
        "forward KL": [(10, 15.0), (20, 4.9), (30, 4.6)],
        "reverse KL": [(10, 15.5), (20, 5.0), (30, 4.7)],
    }
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    assert plot(curves, 4.3, 4.5, str(tmp_path / "p.png")) == f"plot: {tmp_path / 'p.png'}"
    ax = figures[0].axes[0]
    low, high = ax.get_ylim()
    assert low == pytest.approx(4.3 - 0.05 * 1.6) and high == pytest.approx(5.9 + 0.25 * 1.6)  # the range is 4.3 - 5.9
    texts = [t.get_text() for t in ax.texts]
    assert "true process (floor) 4.300" in texts and "teacher 4.500" in texts
    assert ax.get_title().endswith("(the first evaluations lie above, up to 16.0)")
    close(figures[0])
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
