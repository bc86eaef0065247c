"""`hf-kd demo` (the real-model demo) end to end on a tiny model that speaks SmolLM2's real tokenizer and chat
template: the table's numbers are what its saved student scores, computed here by hand; a missing teacher is one line.

The full demo (SmolLM2-135M-Instruct itself, ~5 minutes) is `make demo`, which CI runs."""

import json
import shutil

import pytest
import torch
from assets import real_tokenizer_dir
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from hf_kd.cli import main
from hf_kd.cli.real_demo import OBJECTIVES, PROMPTS


@pytest.fixture(scope="module")
def tiny_smollm(tmp_path_factory):
    """A 4-layer, 32-wide Llama over SmolLM2's real 49152-token vocabulary, with its tokenizer and chat template."""
    path = tmp_path_factory.mktemp("tiny_smollm")
    source = real_tokenizer_dir("smollm2")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(f"{source}/{name}", path / name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def test_real_demo_end_to_end_on_a_tiny_model(tmp_path, tiny_smollm, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--teacher", str(tiny_smollm), "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    names = ["teacher", "pruned student (before)", *(f"student: {name}" for name in OBJECTIVES)]
    assert [row["model"] for row in results["rows"]] == names
    assert all(any(line.startswith(name) for line in printed.splitlines()) for name in names), printed
    assert len(results["kept_layers"]) == 2 and len(results["layer_importance"]) == 4  # half the layers
    assert results["rows"][0]["kl"] == 0 and results["rows"][0]["top1"] == 1
    assert set(results["answers"]) == {"teacher", "pruned student (before)", *OBJECTIVES}
    assert all(len(replies) == len(PROMPTS) for replies in results["answers"].values())
    assert (out / "held_out_kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the saved best student loads with plain transformers, chats through the template, and scores what the table says
    best = results["best_student"]
    model = AutoModelForCausalLM.from_pretrained(out / "best_student").eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_smollm).eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "best_student")
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert model.generate(**chat, max_new_tokens=3, do_sample=False).shape[1] == chat["input_ids"].shape[1] + 3
    reported = next(row for row in results["rows"] if row["model"] == f"student: {best}")
    nll = kl = agree = count = 0.0
    for line in (out / "data" / "test.jsonl").read_text().splitlines():  # by hand, in float64, one window at a time
        row = json.loads(line)
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + tokenizer(row["completion"], add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            s = model(ids).logits[0, len(prompt) - 1 : -1].double().log_softmax(-1)
            t = teacher(ids).logits[0, len(prompt) - 1 : -1].double().log_softmax(-1)
        targets = ids[0, len(prompt) :]
        nll -= s.gather(-1, targets[:, None]).sum().item()
        kl += (t.exp() * (t - s)).sum().item()
        agree += (s.argmax(-1) == t.argmax(-1)).sum().item()
        count += len(targets)
    assert reported["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert reported["kl"] == pytest.approx(kl / count, rel=1e-5)
    assert reported["top1"] == pytest.approx(agree / count)


def test_real_demo_without_a_teacher_is_one_line(tmp_path, capsys):
    assert main(["demo", "--teacher", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scripts/real_models.py" in err[0] and "--synthetic" in err[0]
    assert not (tmp_path / "out").exists()  # nothing written
