"""`hf-kd demo --fast`: runs offline, reports every objective, and its numbers are reproducible from what it saves."""

import json
import math
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_kd.cli import main
from hf_kd.demo import OBJECTIVES


def test_fast_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--output_dir", str(out)]) == 0
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
    probs = torch.tensor(json.loads((out / "data" / "process.json").read_text())["next_symbol_probs"], dtype=torch.float64)
    symbols = torch.tensor([[int(w[1:]) for w in row] for row in words])
    floor = -probs[symbols[:, :-2], symbols[:, 1:-1], symbols[:, 2:]].log().mean().item()
    assert math.isclose(math.exp(floor), results["rows"][0]["ppl"], rel_tol=1e-9)
    assert math.isclose(floor, results["entropy_nats"], rel_tol=1e-9)
    assert os.path.exists(out / "tokenizer" / "tokenizer.json")
