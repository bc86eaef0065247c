"""Does the choice of KD loss matter, and does on-policy distillation help? A small-scale repeat of Kim et al. (2021),
"Comparing Kullback-Leibler Divergence and Mean Squared Error Loss in Knowledge Distillation", and of the on-policy
comparisons of Agarwal et al. (2024, GKD), on the demo's synthetic task (hf_kd/cli/demo.py).

    python benchmarks/quality.py            # the demo's Settings, 3 seeds, ~13 minutes (8 CPU-minutes) on 2 cores
    python benchmarks/quality.py --quick    # the demo's FAST settings, 1 seed, seconds
    python benchmarks/quality.py --seeds 5 --steps 600

The data come from a known order-2 Markov chain, so the best achievable held-out perplexity (the true process'
"floor") is known exactly, and so is the probability of any sequence a model writes. One teacher is trained with CE on
plenty of data (seed 0). Every student then gets the same budget -- the same transfer set, optimizer steps, batch size,
learning rate and schedule -- and differs only in the objective and in whose completions it trains on:

* CE only (alpha = 0: the sampled tokens, no teacher);
* forward KL(teacher || student) at T in {1, 2, 4} (T**2-scaled, Hinton);
* reverse KL(student || teacher) at T = 1;
* logit MSE (the T -> inf limit of T**2 * forward KL, Kim et al.'s recommendation);
* on-policy reverse KL (lmbda 1: every batch's completions are the student's own samples, scored by the teacher);
* GKD (lmbda 0.5: half the batches on-policy, half the dataset's; JSD with beta 0.5);
* sequence-level KD (seq_kd: the teacher's own samples as completions; forward KL).

Generated completions are as long as the data's (46 tokens) and never stop at <eos> (the data have none), so every
batch has the same number of target tokens whoever wrote it; generating costs extra time, reported per run.

A seed sets the student's initialization and the order of its batches; within a seed every objective starts from the
same weights and sees the same batches of prompts, generating or not (checked: sampling completions does not move the
Trainer's data order), a paired comparison. The table reports, mean and sample standard deviation over seeds:

* test ppl: the held-out teacher-forced perplexity at T = 1, and its excess over the floor in nats per token;
* sample NLL: the true process's NLL per token of the student's own samples (the test prompts completed at T = 1,
  seeded; hf_kd.cli.demo.sample_quality), with tokens the process cannot emit (specials, impossible transitions) charged
  hf_kd.cli.demo.IMPOSSIBLE_NATS each and their share reported. Its floor for a faithful sampler is the entropy, but a
  sharper sampler can go below it (greedy samples of the process itself score 0.84 against an entropy of 1.39), so
  it is read beside
* sample KL: the sample NLL minus the student's own NLL of its samples, an estimate of KL(student || process) per token
  (0 only for the process), and the teacher's NLL of the student's samples and KL(student || teacher) likewise (what
  on-policy reverse KL minimizes).
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
METHODS = {  # name -> DistillationConfig settings; alpha = 0 leaves only the CE on the sampled tokens
    "CE only": {"loss_type": "forward_kl", "alpha": 0.0},
    "forward KL, T=1": {"loss_type": "forward_kl"},
    "forward KL, T=2": {"loss_type": "forward_kl", "temperature": 2.0},
    "forward KL, T=4": {"loss_type": "forward_kl", "temperature": 4.0},
    "reverse KL, T=1": {"loss_type": "reverse_kl"},
    "logit MSE": {"loss_type": "mse"},  # mse ignores the temperature
    "on-policy reverse KL (lmbda 1)": {"loss_type": "reverse_kl", "lmbda": 1.0},
    "GKD (lmbda 0.5, JSD beta 0.5)": {"loss_type": "jsd", "jsd_beta": 0.5, "lmbda": 0.5},
    "seq_kd (teacher samples), forward KL": {"loss_type": "forward_kl", "seq_kd": True},
}
DEFAULTS = {"temperature": 1.0, "alpha": 1.0}
SAMPLE_FIELDS = ("nll", "impossible_share", "kl", "self_nll", "teacher_nll", "teacher_kl")


def tokenized(seqs, tokenizer, folder: str, name: str):
    """Symbol sequences ``[n, L]`` -> the demo's dataset: its jsonl (prompt = the first two symbols, which have no
    order-2 context), read and tokenized by hf_kd.data as ``hf-kd demo`` does (completion-only labels, no EOS)."""
    from hf_kd.cli.demo import write_jsonl
    from hf_kd.data import load_raw_dataset, tokenize_dataset
    from hf_kd.recipe.recipe import DataSection

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
    from hf_kd.cli.demo import (
        IMPOSSIBLE_NATS,
        _args,
        _train,
        build_model,
        build_tokenizer,
        evaluate,
        generation_args,
        make_chain,
        sample,
        sample_quality,
        true_process_metrics,
    )

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    started = time.time()
    rng = np.random.default_rng(0)  # the process, the data and the teacher are fixed; seeds vary the students
    chain = make_chain(s, rng)
    splits = {
        name: sample(chain, n, s.seq_len, rng)
        for name, n in (("teacher", s.teacher_seqs), ("student", s.student_seqs), ("test", s.test_seqs))
    }
    tokenizer = build_tokenizer(s.symbols)
    floor_ppl, _ = true_process_metrics(chain, splits["test"])
    entropy = math.log(floor_ppl)
    prompts = splits["test"][:, :2]  # every model completes the test set's prompts

    def quality(model, seed, teacher=None) -> dict:
        q = sample_quality(model, chain, prompts, s.seq_len, seed=seed, teacher=teacher)
        q["impossible_share"] = q["impossible"] / q["tokens"]
        if teacher is not None:
            q["teacher_kl"] = q["teacher_nll"] - q["self_nll"]
        return q

    with tempfile.TemporaryDirectory() as tmp:
        data = {name: tokenized(seqs, tokenizer, tmp, name) for name, seqs in splits.items()}
        teacher = build_model(len(tokenizer), s.teacher_size, s.seq_len, seed=0)
        _train(
            Trainer,
            "teacher (CE)",
            s.teacher_steps,
            model=teacher,
            args=_args(tmp, s, s.teacher_steps, 0),
            train_dataset=data["teacher"],
            data_collator=DistillationCollator(),
        )
        teacher_ppl = evaluate(teacher, data["test"])[0]
        teacher_samples = [quality(teacher, seed) for seed in seeds]
        runs: dict[str, list[dict]] = {name: [] for name in METHODS}
        for seed in seeds:
            for name, settings in METHODS.items():
                # the same init for every method of a seed, and the same batch order (see the module docstring)
                student = build_model(len(tokenizer), s.student_size, s.seq_len, seed=1000 + seed)
                generates = settings.get("lmbda", 0) > 0 or settings.get("seq_kd", False)
                settings = {**DEFAULTS, **settings, **(generation_args(s) if generates else {})}
                clock, cpu = time.time(), time.process_time()
                trainer = _train(
                    DistillationTrainer,
                    f"seed {seed}, {name}",
                    s.student_steps,
                    model=student,
                    teacher_model=teacher,
                    args=_args(tmp, s, s.student_steps, seed, **settings),
                    train_dataset=data["student"],
                )
                shares = [e["generation_time_share"] for e in trainer.state.log_history if "generation_time_share" in e]
                runs[name].append(
                    {
                        "ppl": evaluate(student, data["test"])[0],
                        "sample": quality(student, seed, teacher),
                        "train_s": time.time() - clock,
                        "train_cpu_s": time.process_time() - cpu,
                        "generation_time_share": statistics.fmean(shares) if shares else None,
                    }
                )

    results = {
        "settings": asdict(s),
        "seeds": seeds,
        "floor_ppl": floor_ppl,
        "entropy_nats": entropy,
        "impossible_nats": IMPOSSIBLE_NATS,
        "threads": torch.get_num_threads(),
        "teacher_ppl": teacher_ppl,
        "teacher_samples": summarize_samples(teacher_samples),
        "methods": {
            name: {
                **summarize([r["ppl"] for r in values], entropy),
                **summarize_samples([r["sample"] for r in values]),
                "runs": values,
            }
            for name, values in runs.items()
        },
        "seconds": round(time.time() - started, 1),
    }
    text = markdown(results)
    print(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    (out_dir / f"{stem}.md").write_text(text + "\n", encoding="utf-8")
    return results


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize_samples(samples: list[dict]) -> dict:
    """Per-seed sample_quality dicts -> ``{"sample_<field>": (mean, std)}`` for the fields present."""
    return {f"sample_{field}": mean_std([q[field] for q in samples]) for field in SAMPLE_FIELDS if field in samples[0]}


def summarize(values: list[float], entropy: float) -> dict:
    """Per-seed perplexities -> mean, sample std (0 for one seed) and mean excess nats over the floor."""
    return {
        "ppl": values,
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "excess_nats": statistics.fmean(math.log(v) - entropy for v in values),
    }


def _cell(pair, digits: int = 3, scale: float = 1.0) -> str:
    return "-" if pair is None else f"{pair[0] * scale:.{digits}f} ± {pair[1] * scale:.{digits}f}"


def markdown(results: dict) -> str:
    s, seeds = results["settings"], results["seeds"]
    runs = [r for m in results["methods"].values() for r in m["runs"]]
    plain = [r["train_s"] for r in runs if r["generation_time_share"] is None]
    lines = [
        (
            f"Synthetic order-2 Markov chain ({s['symbols']} symbols, {s['successors']} successors per context), test set "
            f"{s['test_seqs']} x {s['seq_len'] - 2} target tokens. Teacher h={s['teacher_size'][0]} "
            f"L={s['teacher_size'][1]} ({s['teacher_seqs']} sequences, {s['teacher_steps']} steps); students "
            f"h={s['student_size'][0]} L={s['student_size'][1]}, {s['student_seqs']} transfer sequences, "
            f"{s['student_steps']} steps x batch {s['batch_size']}, lr {s['learning_rate']:g} cosine; generated "
            f"completions {s['seq_len'] - 2} tokens, no EOS stop; seeds {seeds}; {results.get('threads', 1)} torch "
            f"thread(s); {results['seconds']:.0f} s."
        ),
        "",
        (
            f"Sample columns: the test prompts completed by each model at temperature 1. NLL: the true process's NLL per "
            f"token (each token the process cannot emit charged {results['impossible_nats']:.2f} nats); impossible: the "
            f"share of such tokens; KL(·‖process) = NLL minus the model's own NLL of its samples; teacher NLL and "
            f"KL(·‖teacher) likewise under the teacher. s/run: wall (CPU) seconds of one student's training, mean over "
            f"seeds, the share spent generating in brackets; off-policy runs took {min(plain, default=0):.0f}-"
            f"{max(plain, default=0):.0f} s."
        ),
        "",
        (
            "| model | test ppl | excess nats | sample NLL | impossible % | KL(·‖process) | teacher NLL | KL(·‖teacher) "
            "| s/run |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
        (
            f"| true process (floor) | {results['floor_ppl']:.4f} | 0 | {results['entropy_nats']:.3f} | 0 | 0 | - | - "
            "| - |"
        ),
    ]
    t = results["teacher_samples"]
    lines.append(
        f"| teacher (CE) | {results['teacher_ppl']:.4f} | "
        f"{math.log(results['teacher_ppl']) - results['entropy_nats']:.4f} | {_cell(t['sample_nll'])} | "
        f"{_cell(t['sample_impossible_share'], 1, 100)} | {_cell(t['sample_kl'])} | - | - | - |"
    )
    for name, m in results["methods"].items():
        seconds = statistics.fmean(r["train_s"] for r in m["runs"])
        cpu = statistics.fmean(r["train_cpu_s"] for r in m["runs"])
        shares = [r["generation_time_share"] for r in m["runs"] if r["generation_time_share"] is not None]
        timing = f"{seconds:.0f} ({cpu:.0f})" + (f" [{100 * statistics.fmean(shares):.0f}% gen]" if shares else "")
        lines.append(
            f"| student: {name} | {m['mean']:.4f} ± {m['std']:.4f} | {m['excess_nats']:.4f} | "
            f"{_cell(m['sample_nll'])} | {_cell(m['sample_impossible_share'], 1, 100)} | "
            f"{_cell(m['sample_kl'])} | {_cell(m.get('sample_teacher_nll'))} | "
            f"{_cell(m.get('sample_teacher_kl'))} | {timing} |"
        )
    return "\n".join(lines)


def main() -> None:
    from hf_kd.cli.demo import FAST, Settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the demo's FAST settings and one seed: seconds")
    parser.add_argument("--seeds", type=int, default=3, help="student seeds per method")
    parser.add_argument("--steps", type=int, help="student steps (default: the demo's)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON and markdown go")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: tiny models gain nothing from more, "
        "and on a shared CPU extra threads spin against other processes and run 10x slower)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s = FAST if args.quick else Settings()
    if args.steps:
        s = replace(s, student_steps=args.steps)
    seeds = list(range(1 if args.quick else args.seeds))
    run(s, seeds, args.out, "quality_quick" if args.quick else "quality")


if __name__ == "__main__":
    main()
