"""Cross-tokenizer KD on real models: SmolLM2-135M-Instruct teaches a student that reads text with the Qwen3 tokenizer,
measured per byte of text (the tokenizers differ, so per-token numbers do not compare), on a CPU.

    python benchmarks/real_cross_tokenizer.py             # 30 steps x batch 4, depth 8, 1 seed
    python benchmarks/real_cross_tokenizer.py --quick     # 2 steps, 4 held-out windows: the script runs (tests)

Both students keep the same ``depth`` decoder layers of the teacher (the most important by drop-one KL,
hf_kd.models.pruning). The same-tokenizer student keeps SmolLM2's embeddings; the cross-tokenizer student gets new
input embeddings and a tied head for Qwen3's ~151k tokens, transplanted from SmolLM2's (``transplant_embeddings``).
Four students train on the same text (Python reference topics cut into windows of characters, so both tokenizers
see the same strings) with the same budget: each tokenizer CE only and KD (forward KL; across tokenizers hf_kd's
default exact term). Scored on held-out windows: the NLL of the completion text per UTF-8 byte.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing hf_kd
sys.path.insert(0, str(ROOT / "scripts"))
RESULTS = Path(__file__).resolve().parent / "results"

# name: (tokenizer, objective); CE only is alpha 0 (the teacher is still held, its signal unused)
RUNS = {
    "Qwen3 tok, CE only": ("qwen3", {"alpha": 0.0}),
    "Qwen3 tok, cross-tokenizer KD": ("qwen3", {"alpha": 1.0}),
    "SmolLM2 tok, CE only": ("smollm2", {"alpha": 0.0}),
    "SmolLM2 tok, same-tokenizer KD": ("smollm2", {"alpha": 1.0}),
}
PROMPT_CHARS, COMPLETION_CHARS = 128, 128  # ~32 SmolLM2 tokens each on this text


def char_windows(held_out_every: int = 5) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)`` prompt/completion windows cut from the reference topics in characters, not tokens, so
    every tokenizer reads the same strings (topics split as in hf_kd/cli/real_text.py)."""
    from hf_kd.cli.real_text import topic_texts

    size, train, held_out = PROMPT_CHARS + COMPLETION_CHARS, [], []
    for index, text in enumerate(topic_texts().values()):
        part = held_out if index % held_out_every == 0 else train
        for start in range(0, len(text) - size + 1, size):
            prompt, completion = text[start : start + PROMPT_CHARS], text[start + PROMPT_CHARS : start + size]
            if prompt.strip() and completion.strip():
                part.append({"prompt": prompt, "completion": completion})
    return train, held_out


def transplant_embeddings(embedding: torch.Tensor, source_tok, target_tok) -> torch.Tensor:
    """Rows for ``target_tok``'s vocabulary from ``embedding`` (``[source vocab, hidden]``, ``source_tok``'s rows):
    each target token starts as the mean of the source embeddings of the source tokens that spell the same bytes.

    Both tokenizers here are byte-level BPE with GPT-2's byte-to-character alphabet, so a target token's vocabulary
    string (e.g. ``"Ġdef"``) is run through the source BPE model as it is: that covers tokens that are pieces of a
    UTF-8 character too, which ``decode`` would turn into U+FFFD. Special (added) tokens take the source's token of
    the same name where it has one (``<|im_start|>``, ``<|endoftext|>``), else, like anything that finds no source
    token, the mean of all source rows. Returns ``[len(target_tok), hidden]``.
    """
    source_model, mean = source_tok.backend_tokenizer.model, embedding.mean(0)
    source_vocab, added = source_tok.get_vocab(), {t.content for t in target_tok.added_tokens_decoder.values()}
    rows = torch.empty(len(target_tok), embedding.shape[1], dtype=embedding.dtype)
    for token, index in target_tok.get_vocab().items():
        if token in added:
            ids = [source_vocab[token]] if token in source_vocab else []
        else:
            ids = [piece.id for piece in source_model.tokenize(token)]
        rows[index] = embedding[ids].mean(0) if ids else mean
    return rows


def cross_student(pruned, source_tok, target_tok):
    """``pruned`` re-made for ``target_tok``: transplanted input embeddings and a head tied to them (as SmolLM2's)."""
    rows = transplant_embeddings(pruned.get_input_embeddings().weight.detach(), source_tok, target_tok)
    pruned.set_input_embeddings(torch.nn.Embedding.from_pretrained(rows, freeze=False))
    pruned.lm_head = torch.nn.Linear(rows.shape[1], rows.shape[0], bias=False)
    pruned.config.vocab_size = rows.shape[0]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(pruned.config, name, getattr(target_tok, name))
    assert pruned.config.tie_word_embeddings
    pruned.tie_weights()
    assert pruned.lm_head.weight is pruned.get_input_embeddings().weight
    return pruned


@torch.no_grad()
def nll_per_byte(model, dataset, texts: list[str], batch_size: int = 4) -> float:
    """Nats per UTF-8 byte of ``texts`` (the completions of ``dataset``, tokenized with labels -100 on the prompt):
    the summed NLL of every completion token over the completions' bytes."""
    from hf_kd.data import DistillationCollator

    model.eval()
    collate, total = DistillationCollator(), 0.0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        # logits at position i predict the token at i + 1
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].double().flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum"
        )
        total += nll.item()
    return total / sum(len(t.encode("utf-8")) for t in texts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "real_cross_tokenizer"), help="results stem (.json, .md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started, cpu_started = time.perf_counter(), time.process_time()

    import datasets
    import real_models
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from benchmarks.machine import machine
    from hf_kd.cli.real_demo import FAST, RealSettings
    from hf_kd.data import DistillationCollator, tokenize_dataset
    from hf_kd.models.pruning import drop_one_divergence, most_important, prune_layers
    from hf_kd.recipe.schema import DataSection

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    s = FAST if args.quick else RealSettings(steps=args.steps, eval_windows=args.eval_windows)
    dirs = {"smollm2": str(real_models.asset_dir(real_models.MODEL)), "qwen3": str(real_models.asset_dir("qwen3"))}
    toks = {name: AutoTokenizer.from_pretrained(path) for name, path in dirs.items()}
    teacher = AutoModelForCausalLM.from_pretrained(dirs["smollm2"], dtype=torch.float32).eval()

    train, held_out = char_windows()
    test_rows = held_out[1::2][: s.eval_windows]
    completions = [r["completion"] for r in test_rows]
    spec = DataSection(dataset="", format="prompt_completion", add_eos=False)
    data = {
        (name, split): tokenize_dataset(datasets.Dataset.from_list(rows), tok, spec, desc=f"{split} {name}")
        for name, tok in toks.items()
        for split, rows in (("train", train), ("test", test_rows))
    }
    windows = DistillationCollator()([data["smollm2", "train"][i] for i in range(s.importance_windows)])
    keep = most_important(drop_one_divergence(teacher, windows["input_ids"], windows["attention_mask"]), args.depth)
    clock = time.perf_counter()
    starts = {"smollm2": lambda: prune_layers(teacher, keep)}
    starts["qwen3"] = lambda: cross_student(prune_layers(teacher, keep), toks["smollm2"], toks["qwen3"])
    starts["qwen3"]()  # timed once: the transplant
    transplant_s = time.perf_counter() - clock
    tokens_per_byte = {
        name: sum(sum(1 for x in data[name, "test"][i]["labels"] if x != -100) for i in range(len(test_rows)))
        / sum(len(t.encode("utf-8")) for t in completions)
        for name in toks
    }

    rows = [
        {
            "student": "teacher (SmolLM2-135M, 30 layers)",
            "after": nll_per_byte(teacher, data["smollm2", "test"], completions),
        }
    ]
    before = {name: nll_per_byte(start(), data[name, "test"], completions) for name, start in starts.items()}
    for run, (name, objective) in RUNS.items():
        row = _run(run, name, objective, starts[name], teacher, toks, dirs, data, s, args.seed)
        row.update(
            student=run, before=before[name], after=nll_per_byte(row.pop("model"), data[name, "test"], completions)
        )
        rows.append(row)
        print(json.dumps(row), flush=True)

    nll = {r["student"]: r["after"] for r in rows}
    ce_x, kd_x = nll["Qwen3 tok, CE only"], nll["Qwen3 tok, cross-tokenizer KD"]
    ce_same, kd_same = nll["SmolLM2 tok, CE only"], nll["SmolLM2 tok, same-tokenizer KD"]
    result = {
        "machine": machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "settings": {
            **vars(s),
            "depth": args.depth,
            "prompt_chars": PROMPT_CHARS,
            "completion_chars": COMPLETION_CHARS,
        },
        "seed": args.seed,
        "layers_kept": keep,
        "vocab": {name: len(tok) for name, tok in toks.items()},
        "tokens_per_byte": tokens_per_byte,
        "transplant_s": round(transplant_s, 1),
        "rows": rows,
        "gain_kept": (ce_x - kd_x) / (ce_same - kd_same) if ce_same != kd_same else None,
        "command": " ".join(
            ["python benchmarks/real_cross_tokenizer.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "wall_s": round(time.perf_counter() - started, 1),
        "cpu_s": round(time.process_time() - cpu_started, 1),
    }
    text = report(result)
    print(text)
    if not args.quick:
        Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        Path(args.out).with_suffix(".md").write_text(text)
    return 0


def _run(run, name, objective, start, teacher, toks, dirs, data, s, seed) -> dict:
    from hf_kd.cli.demo import _args
    from hf_kd.training.trainer import DistillationTrainer

    torch.manual_seed(seed)
    student = start()
    cross = {"teacher_tokenizer_name_or_path": dirs["smollm2"]} if name == "qwen3" else {}
    with tempfile.TemporaryDirectory() as out:
        args = _args(out, s, s.steps, seed, loss_type="forward_kl", logging_first_step=True, **objective, **cross)
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=data[name, "train"],
            processing_class=toks[name],
        )
        assert (type(trainer.teacher).__name__ == "CrossTokenizerTeacher") == (name == "qwen3"), run
        clock, cpu = time.perf_counter(), time.process_time()
        trainer.train()
        seconds, cpu = time.perf_counter() - clock, time.process_time() - cpu
    logs = [e for e in trainer.state.log_history if "aligned_fraction" in e]
    return {
        "model": student,
        "train_s": round(seconds, 1),
        "train_cpu_s": round(cpu, 1),
        "aligned_fraction": logs[0]["aligned_fraction"] if logs else None,
    }


def report(result: dict) -> str:
    s, nats_to_bits = result["settings"], 1 / 0.6931471805599453
    kept = result["gain_kept"]
    lines = [
        "# Cross-tokenizer KD on real models: SmolLM2-135M-Instruct into a Qwen3-tokenizer student",
        "",
        f"Machine: {result['machine']} (shared), {result['threads']} thread(s), torch {result['torch']}. Students: the "
        f"teacher's {s['depth']} most important layers (drop-one KL) {result['layers_kept']}; the Qwen3 one with its "
        f"{result['vocab']['qwen3']:,}-token embeddings and tied head transplanted from SmolLM2's "
        f"({result['vocab']['smollm2']:,}; each token the mean of the SmolLM2 tokens spelling it, "
        f"{result['transplant_s']} s). {s['steps']} steps x batch {s['batch_size']} windows of "
        f"{s['prompt_chars']}+{s['completion_chars']} characters, AdamW lr {s['learning_rate']}, cosine; seed "
        f"{result['seed']}. Held-out: NLL of the completions of {s['eval_windows']} windows of topics never trained on, "
        f"per UTF-8 byte (tokens per byte: SmolLM2 {result['tokens_per_byte']['smollm2']:.3f}, Qwen3 "
        f"{result['tokens_per_byte']['qwen3']:.3f}). Written by `{result['command']}` in {result['wall_s']:.0f} s "
        f"({result['cpu_s']:.0f} CPU s).",
        "",
        "| student | nats/byte before | nats/byte after | bits/byte after | gain (nats/byte) | train s (CPU s) |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        before = row.get("before")
        cells = [
            f"{before:.4f}" if before is not None else "",
            f"{row['after']:.4f}",
            f"{row['after'] * nats_to_bits:.4f}",
        ]
        cells.append(f"{before - row['after']:.4f}" if before is not None else "")
        cells.append(f"{row['train_s']:.0f} ({row['train_cpu_s']:.0f})" if "train_s" in row else "")
        lines.append(f"| {row['student']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Share of the same-tokenizer KD gain over CE that cross-tokenizer KD keeps, per byte, "
        "(CE_Qwen3 - KD_Qwen3) / (CE_SmolLM2 - KD_SmolLM2): "
        + (f"**{kept:.2f}**" if kept is not None else "undefined (no same-tokenizer gain)")
        + ". The two students start from different places (the Qwen3 one's embeddings are a transplant), so the "
        "share compares the gains of KD over CE from different starts.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
