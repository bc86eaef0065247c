"""Does the choice of KD loss matter? A small-scale repeat of Kim et al. (2021), "Comparing Kullback-Leibler Divergence
and Mean Squared Error Loss in Knowledge Distillation", on the demo's synthetic task (hf_kd/demo.py).

    python benchmarks/quality.py            # the demo's Settings, 3 seeds, about 5 minutes on a 2-core CPU
    python benchmarks/quality.py --quick    # the demo's FAST settings, 1 seed, seconds
    python benchmarks/quality.py --seeds 5 --steps 600

The data come from a known order-2 Markov chain, so the best achievable held-out perplexity (the true process'
"floor") is known exactly. One teacher is trained with CE on plenty of data (seed 0). Every student then gets the same
budget -- the same transfer set, steps, batch size, learning rate and schedule -- and differs only in the objective:

* CE only (alpha = 0: the sampled tokens, no teacher);
* forward KL(teacher || student) at T in {1, 2, 4} (T**2-scaled, Hinton);
* reverse KL(student || teacher) at T = 1;
* logit MSE (the T -> inf limit of T**2 * forward KL, Kim et al.'s recommendation).

A seed sets the student's initialization and the order of its batches; within a seed every objective starts from the
same weights and sees the same batches (a paired comparison). The table reports the held-out test perplexity at T = 1
(mean and sample standard deviation over seeds) and the excess over the floor in nats per token.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing hf_kd

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = {  # name -> (loss_type, temperature, alpha); alpha = 0 leaves only the CE on the sampled tokens
    "CE only": ("forward_kl", 1.0, 0.0),
    "forward KL, T=1": ("forward_kl", 1.0, 1.0),
    "forward KL, T=2": ("forward_kl", 2.0, 1.0),
    "forward KL, T=4": ("forward_kl", 4.0, 1.0),
    "reverse KL, T=1": ("reverse_kl", 1.0, 1.0),
    "logit MSE": ("mse", 1.0, 1.0),  # mse ignores the temperature
}


def tokenized(seqs, tokenizer, folder: str, name: str):
    """Symbol sequences ``[n, L]`` -> the demo's dataset: its jsonl (prompt = the first two symbols, which have no
    order-2 context), read and tokenized by hf_kd.data as ``hf-kd demo`` does (completion-only labels, no EOS)."""
    from hf_kd.data import load_raw_dataset, tokenize_dataset
    from hf_kd.demo import write_jsonl
    from hf_kd.recipe import DataSection

    path = os.path.join(folder, f"{name}.jsonl")
    write_jsonl(path, seqs)
    spec = DataSection(dataset=path, format="prompt_completion", add_eos=False, max_length=seqs.shape[1])
    return tokenize_dataset(load_raw_dataset(path), tokenizer, spec, desc=f"Tokenizing {name}")


def run(s, seeds: list[int], out_dir: Path, stem: str) -> dict:
    """Train one teacher, then every method x seed; write ``<stem>.json`` and ``<stem>.md``; return the JSON."""
    import datasets
    from transformers import Trainer
    from transformers.utils import logging as hf_logging

    from hf_kd import DistillationCollator, DistillationTrainer
    from hf_kd.demo import (
        _args,
        _train,
        build_model,
        build_tokenizer,
        evaluate,
        make_chain,
        sample,
        true_process_metrics,
    )

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    started = time.time()
    rng = np.random.default_rng(0)  # the process, the data and the teacher are fixed; seeds vary the students
    chain = make_chain(s, rng)
    splits = {name: sample(chain, n, s.seq_len, rng)
              for name, n in (("teacher", s.teacher_seqs), ("student", s.student_seqs), ("test", s.test_seqs))}  # fmt: skip
    tokenizer = build_tokenizer(s.symbols)
    floor_ppl, _ = true_process_metrics(chain, splits["test"])
    entropy = math.log(floor_ppl)

    with tempfile.TemporaryDirectory() as tmp:
        data = {name: tokenized(seqs, tokenizer, tmp, name) for name, seqs in splits.items()}
        teacher = build_model(len(tokenizer), s.teacher_size, s.seq_len, seed=0)
        _train(Trainer, "teacher (CE)", s.teacher_steps, model=teacher, args=_args(tmp, s, s.teacher_steps, 0),
               train_dataset=data["teacher"], data_collator=DistillationCollator())  # fmt: skip
        teacher_ppl = evaluate(teacher, data["test"])[0]
        ppl: dict[str, list[float]] = {name: [] for name in METHODS}
        for seed in seeds:
            for name, (loss_type, temperature, alpha) in METHODS.items():
                # the same init and batch order for every method of a seed (the Trainer's data order follows seed)
                student = build_model(len(tokenizer), s.student_size, s.seq_len, seed=1000 + seed)
                args = _args(tmp, s, s.student_steps, seed, loss_type=loss_type, temperature=temperature, alpha=alpha)
                _train(DistillationTrainer, f"seed {seed}, {name}", s.student_steps, model=student,
                       teacher_model=teacher, args=args, train_dataset=data["student"])  # fmt: skip
                ppl[name].append(evaluate(student, data["test"])[0])

    results = {
        "settings": asdict(s), "seeds": seeds, "floor_ppl": floor_ppl, "entropy_nats": entropy,
        "teacher_ppl": teacher_ppl, "methods": {name: summarize(values, entropy) for name, values in ppl.items()},
        "seconds": round(time.time() - started, 1),
    }  # fmt: skip
    text = markdown(results)
    print(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    (out_dir / f"{stem}.md").write_text(text + "\n", encoding="utf-8")
    return results


def summarize(values: list[float], entropy: float) -> dict:
    """Per-seed perplexities -> mean, sample std (0 for one seed) and mean excess nats over the floor."""
    return {
        "ppl": values, "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "excess_nats": statistics.fmean(math.log(v) - entropy for v in values),
    }  # fmt: skip


def markdown(results: dict) -> str:
    s, seeds = results["settings"], results["seeds"]
    lines = [
        (f"Synthetic order-2 Markov chain ({s['symbols']} symbols, {s['successors']} successors per context), test set "
        f"{s['test_seqs']} x {s['seq_len'] - 2} target tokens. Teacher h={s['teacher_size'][0]} L={s['teacher_size'][1]} "
        f"({s['teacher_seqs']} sequences, {s['teacher_steps']} steps); students h={s['student_size'][0]} "
        f"L={s['student_size'][1]}, {s['student_seqs']} transfer sequences, {s['student_steps']} steps x batch "
        f"{s['batch_size']}, lr {s['learning_rate']:g} cosine; seeds {seeds}; {results['seconds']:.0f} s."),
        "",
        "| model | test ppl (mean ± std) | excess nats/token over floor |",
        "|---|---|---|",
        f"| true process (floor) | {results['floor_ppl']:.4f} | 0 |",
        f"| teacher (CE) | {results['teacher_ppl']:.4f} | {math.log(results['teacher_ppl']) - results['entropy_nats']:.4f} |",
    ]  # fmt: skip
    for name, m in results["methods"].items():
        lines.append(f"| student: {name} | {m['mean']:.4f} ± {m['std']:.4f} | {m['excess_nats']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    from hf_kd.demo import FAST, Settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the demo's FAST settings and one seed: seconds")
    parser.add_argument("--seeds", type=int, default=3, help="student seeds per method")
    parser.add_argument("--steps", type=int, help="student steps (default: the demo's)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON and markdown go")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models gain nothing from more, "
                        "and on a shared CPU extra threads spin against other processes and run 10x slower)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s = FAST if args.quick else Settings()
    if args.steps:
        s = replace(s, student_steps=args.steps)
    seeds = list(range(1 if args.quick else args.seeds))
    run(s, seeds, args.out, "quality_quick" if args.quick else "quality")


if __name__ == "__main__":
    main()
