"""What distilling across tokenizers costs: the alignment of a batch, and the loss against the same-tokenizer fused loss.

    python benchmarks/cross_tokenizer_speed.py            # tokenizers trained on transformers' sources, 1 thread
    python benchmarks/cross_tokenizer_speed.py --quick    # small tokenizers and sizes: seconds

Two byte-level BPE tokenizers are trained here, offline, on the Python sources of the installed ``transformers``
(real text: identifiers, English comments, whitespace): the *student's* splits words first (GPT-2's regex, vocabulary
16k), the *teacher's* merges across spaces (no regex, vocabulary 24k), so their tokens differ as two families' do.

* **alignment**: ``hf_kd.teachers.cross_tokenizer.alignment.align_batch`` on 16 held-out text windows of 1,024 student tokens each: the
  canonical tokenization (what the student's tokenizer makes of the text: a dataset batch) and a sampled-like one
  (every 7th token re-spelled as its single bytes: what an on-policy sample may be), in thousands of student tokens
  per second of one CPU thread, beside the share of targets aligned one to one.
* **loss**: one forward + backward at N = 1,023 target positions, H = 1024 (``--hidden``), on random hidden states and heads of the
  two vocabularies: ``cross_tokenizer_terms`` (the real alignment of the first window) against
  ``fused_distillation_loss`` with a teacher head of the student's vocabulary (what the same-tokenizer path costs),
  and the matmul floor of the fused path; fastest CPU time of the repeats, methods taking turns.

Results go to ``benchmarks/results/cross_tokenizer_speed.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing hf_kd

from benchmarks.machine import machine  # noqa: E402 (after the path insert)

RESULTS = Path(__file__).resolve().parent / "results"


def corpus(limit_chars: int) -> list[str]:
    """The installed transformers' Python sources, file by file, up to ``limit_chars`` in all."""
    import transformers

    texts, total = [], 0
    for path in sorted(Path(transformers.__file__).parent.rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        texts.append(text)
        total += len(text)
        if total >= limit_chars:
            break
    return texts


def train_tokenizer(texts: list[str], vocab: int, split_words: bool, folder: Path):
    """Byte-level BPE: ``split_words`` splits words first (GPT-2's regex), else only lines (merges cross spaces)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = (
        pre_tokenizers.ByteLevel(add_prefix_space=False)
        if split_words
        else pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex("\n+"), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>").save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def windows(tokenizer, texts: list[str], count: int, length: int) -> list[list[int]]:
    ids = [i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    return [ids[k * length : (k + 1) * length] for k in range(count)]


def resampled(tokenizer, ids: list[int], every: int) -> list[int]:
    """Every ``every``-th token re-spelled as one token per byte: a sequence the tokenizer itself would not make."""
    out = []
    for index, token in enumerate(ids):
        piece = tokenizer.convert_ids_to_tokens(token)
        out.extend(tokenizer.convert_tokens_to_ids(list(piece)) if index % every == 0 and len(piece) > 1 else [token])
    return out


def time_alignment(student, teacher, shared, batches) -> tuple[float, float]:
    """(thousand student tokens per CPU second, share aligned one to one) over the batches."""
    import torch

    from hf_kd.teachers.cross_tokenizer.alignment import align_batch

    tokens = aligned = targets = 0
    started = time.process_time()
    for ids in batches:
        batch = torch.tensor([ids])
        alignment = align_batch(batch, None, batch[:, 1:], student, teacher, shared)
        tokens += len(ids)
        aligned += alignment.pairs.shape[1]
        targets += alignment.targets
    return tokens / 1000 / max(time.process_time() - started, 1e-9), aligned / max(targets, 1)


def time_losses(student, teacher, shared, ids, hidden: int, repeats: int) -> dict[str, float]:
    """Fastest CPU seconds of one forward + backward per method (the methods take turns)."""
    import torch

    from hf_kd.models.heads import LMHeadSpec
    from hf_kd.objective.fused import fused_distillation_loss
    from hf_kd.objective.losses import Objective
    from hf_kd.objective.signals import StudentHidden, TeacherHidden
    from hf_kd.teachers.cross_tokenizer.alignment import align_batch
    from hf_kd.teachers.cross_tokenizer.loss import cross_tokenizer_terms

    batch = torch.tensor([ids])
    alignment = align_batch(batch, None, batch[:, 1:], student, teacher, shared)
    n, n_t = len(ids) - 1, alignment.teacher_inputs["input_ids"].shape[1] - 1
    g = torch.Generator().manual_seed(0)
    s_hidden = torch.randn(1, n, hidden, generator=g).requires_grad_()
    s_weight = (torch.randn(len(student), hidden, generator=g) * hidden**-0.5).requires_grad_()
    t_hidden, same_t_hidden = torch.randn(1, n_t, hidden, generator=g), torch.randn(1, n, hidden, generator=g)
    t_weight = torch.randn(len(teacher), hidden, generator=g) * hidden**-0.5
    same_t_weight = torch.randn(len(student), hidden, generator=g) * hidden**-0.5
    labels = batch[:, 1:]
    objective = Objective("forward_kl", alpha=0.5)

    def cross():
        head = LMHeadSpec(s_weight, None, None, None)
        terms = cross_tokenizer_terms(
            StudentHidden(s_hidden, head),
            TeacherHidden(t_hidden, LMHeadSpec(t_weight, None, None, None)),
            alignment,
            shared,
            labels,
            objective,
        )
        terms["loss"].backward()

    def same():
        fused_distillation_loss(s_hidden[0], s_weight, same_t_hidden[0], same_t_weight, labels[0], alpha=0.5).backward()

    def floor():  # the fused path's four matmuls, a chunk at a time
        for start in range(0, n, 256):
            h, th = s_hidden[0, start : start + 256].detach(), same_t_hidden[0, start : start + 256]
            logits, t_logits = h @ s_weight.detach().T, th @ same_t_weight.T
            logits.exp_()
            t_logits.exp_()
            logits @ s_weight.detach()
            logits.T @ h

    best = {
        "cross-tokenizer loss": float("inf"),
        "same-tokenizer fused loss": float("inf"),
        "matmul floor": float("inf"),
    }
    for _ in range(repeats):
        for name, fn in zip(best, (cross, same, floor)):
            s_hidden.grad = s_weight.grad = None
            started = time.process_time()
            fn()
            best[name] = min(best[name], time.process_time() - started)
    return best, alignment


def main(argv=None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small tokenizers and sizes (seconds)")
    parser.add_argument("--hidden", type=int, default=1024, help="H of both heads in the loss timing")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    from hf_kd.teachers.cross_tokenizer.vocabulary import shared_vocabulary

    hf_logging.set_verbosity_error()
    chars, (v_s, v_t), (count, length), repeats = (
        (3_000_000, (4_000, 6_000), (4, 256), 2) if args.quick else (30_000_000, (16_000, 24_000), (16, 1024), 3)
    )
    started, cpu = time.time(), time.process_time()
    texts = corpus(chars)
    train_texts, held_out = texts[: int(len(texts) * 0.9)], texts[int(len(texts) * 0.9) :]
    import tempfile

    half = len(train_texts) // 2
    with tempfile.TemporaryDirectory() as folder:
        student = train_tokenizer(train_texts[:half], v_s, True, Path(folder) / "student")
        teachers = {  # another family: trained on other text, another size; and one that merges across spaces
            "words split first (like two GPT-style families)": train_tokenizer(
                train_texts[half:], v_t, True, Path(folder) / "teacher_words"
            ),
            "merges across spaces": train_tokenizer(train_texts[half:], v_t, False, Path(folder) / "teacher_lines"),
        }
    canonical = windows(student, held_out, count, length)
    sampled = [resampled(student, ids, 7) for ids in canonical]
    result = {"machine": machine(), "student_vocab": len(student), "teachers": {}}
    lines = [
        f"# Cross-tokenizer cost ({'--quick' if args.quick else 'default'})",
        "",
        f"{result['machine']}, torch {torch.__version__}, 1 thread. Student tokenizer {len(student)} tokens "
        f"(words split first); teachers {v_t} tokens trained on other text. Loss: one forward + backward, "
        f"N = {length - 1} targets, H = {args.hidden}, fastest CPU time of {repeats}, against the fused same-tokenizer loss "
        "and its matmul floor.",
        "",
        "| teacher tokenizer | shared tokens | aligned 1:1 | align, canonical (k tok/s) | align, sampled-like "
        "(k tok/s) | cross loss (ms) | same-tokenizer fused (ms) | floor (ms) | cross / fused |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, teacher in teachers.items():
        shared = shared_vocabulary(student, teacher)
        rates = {
            name: time_alignment(student, teacher, shared, batches)
            for name, batches in (("canonical", canonical), ("sampled", sampled))
        }
        losses, alignment = time_losses(student, teacher, shared, canonical[0], args.hidden, repeats)
        result["teachers"][kind] = {
            "shared": len(shared.student_ids),
            "alignment": rates,
            "loss_cpu_seconds": losses,
            "pairs": alignment.pairs.shape[1],
            "span_groups": alignment.span_starts.shape[1],
        }
        cross, same, floor = losses.values()
        lines.append(
            f"| {kind} | {100 * shared.overlap:.0f}% | {100 * rates['canonical'][1]:.0f}% | "
            f"{rates['canonical'][0]:.0f} | {rates['sampled'][0]:.0f} | {1000 * cross:.0f} | {1000 * same:.0f} | "
            f"{1000 * floor:.0f} | {cross / same:.2f}x |"
        )
    result.update(wall_seconds=time.time() - started, cpu_seconds=time.process_time() - cpu)
    lines += [
        "",
        "Sampled-like: every 7th token re-spelled as its bytes (what an on-policy sample may be), aligned "
        "by counting bytes.",
        "",
        f"Run: {result['wall_seconds']:.0f} s wall, {result['cpu_seconds']:.0f} s CPU.",
    ]
    stem = "cross_tokenizer_speed_quick" if args.quick else "cross_tokenizer_speed"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
