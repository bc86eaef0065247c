"""What on-policy distillation costs: an on-policy optimizer step (lmbda 1) against an off-policy one, and generation
time against completion length.

    python benchmarks/onpolicy_speed.py            # the demo's sizes and a larger student, one thread (~3 min on CPU)
    python benchmarks/onpolicy_speed.py --quick    # one student, fewer steps, seconds
    python benchmarks/onpolicy_speed.py --device cuda

The models are the demo's Llamas built from configs (hf_kd/cli/demo.py: its 19-token vocabulary, teacher h=128 L=2, student
h=48 L=2) and a larger student (h=256 L=4), randomly initialized: speed does not depend on what they learned. Every
student is distilled from the demo's teacher (reverse KL, T = 1) on the demo's kind of data (two prompt symbols, then
``--new_tokens`` completion tokens). Generated completions never stop at <eos> (``generation_kwargs={"eos_token_id":
[]}``; a None would be refilled with the model's <eos> by transformers' generate), so an on-policy batch has exactly
the targets of an off-policy one and the two steps differ only by generation (and the batch's rebuild around it).

(a) step: wall seconds per optimizer step, the median of ``--steps`` steps after one warm-up, the faster of
    ``--repeats`` interleaved runs per mode; CPU seconds (process time) per step and their ratio beside them (less
    disturbed by other processes on a shared machine).
(b) generation share: the time spent in ``prepare_batch`` (prompt cut, ``model.generate``, rebuild) over the on-policy
    step's time, from the same steps.
(c) generation alone: ``hf_kd.training.generation.complete`` (the trainer's own path, KV cache on) on ``--batch_size`` prompts
    for 32 / 64 / 128 new tokens: milliseconds per new token should stay about flat
    (linear total time), and a cache-off call at the largest length shows what quadratic looks like. The fastest of
    ``--repeats`` calls after a warm-up: on a shared machine other processes only ever add time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing hf_kd

from benchmarks.machine import machine  # noqa: E402 (after the path insert)

RESULTS = Path(__file__).resolve().parent / "results"
TEACHER = (128, 2)  # the demo's teacher (hidden, layers)
STUDENTS = {"demo student h=48 L=2": (48, 2), "larger student h=256 L=4": (256, 4)}
LENGTHS = (32, 64, 128)


def dataset(new_tokens: int, n: int, tmp: str):
    """The demo's data layout: two prompt symbols (labels -100), then ``new_tokens`` completion symbols, no EOS."""
    import numpy as np

    from hf_kd.cli.demo import Settings, build_tokenizer, make_chain, sample, write_jsonl
    from hf_kd.data import load_raw_dataset, tokenize_dataset
    from hf_kd.recipe.recipe import DataSection

    s = Settings()
    rng = np.random.default_rng(0)
    path = os.path.join(tmp, f"data_{new_tokens}.jsonl")
    write_jsonl(path, sample(make_chain(s, rng), n, new_tokens + 2, rng))
    tokenizer = build_tokenizer(s.symbols)
    spec = DataSection(dataset=path, format="prompt_completion", add_eos=False, max_length=new_tokens + 2)
    return tokenize_dataset(load_raw_dataset(path), tokenizer, spec, desc="tokenizing"), tokenizer


def time_steps(student_size, teacher, data, tokenizer, lmbda: float, args, tmp: str) -> dict:
    """One short training run; per-step wall and CPU seconds (median after the warm-up) and the prepare_batch share."""
    from transformers import TrainerCallback

    from hf_kd import DistillationConfig, DistillationTrainer
    from hf_kd.cli.demo import build_model

    marks: list[tuple[float, float]] = []
    prepare: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            marks.append((time.perf_counter(), time.process_time()))

    class Timed(DistillationTrainer):
        def prepare_batch(self, inputs, index):
            started = time.perf_counter()
            out = super().prepare_batch(inputs, index)
            prepare.append(time.perf_counter() - started)
            return out

    student = build_model(len(tokenizer), student_size, args.new_tokens + 2, seed=1)
    config = DistillationConfig(
        output_dir=tmp,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps + 1,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        loss_type="reverse_kl",
        temperature=1.0,
        alpha=1.0,
        lmbda=lmbda,
        max_new_tokens=args.new_tokens,
        generation_kwargs={"eos_token_id": []},
        dataloader_drop_last=True,
        seed=0,
    )
    trainer = Timed(
        model=student.to(args.device),
        teacher_model=teacher,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.train()
    walls = [b[0] - a[0] for a, b in itertools.pairwise(marks)]  # steps 2..N: the first one warms up
    cpus = [b[1] - a[1] for a, b in itertools.pairwise(marks)]
    shares = [p / w for p, w in zip(prepare[1:], walls)]  # step k + 1's prepare_batch runs between marks k and k + 1
    return {
        "step_s": statistics.median(walls),
        "step_cpu_s": statistics.median(cpus),
        "prepare_share": statistics.median(shares) if lmbda > 0 else 0.0,
    }


def time_generation(model, vocab: int, new_tokens: int, args, use_cache: bool = True, calls: int = 0) -> dict:
    """Wall and CPU seconds of ``complete`` on a batch of two-token prompts, ``new_tokens`` tokens each: the fastest of
    ``calls`` (default ``--repeats``) calls (other processes only ever add time), after a warm-up call when cached (the
    cache-off call follows the cached ones on the same model)."""
    from hf_kd.training.generation import complete, generation_config

    settings = {"max_new_tokens": new_tokens, "do_sample": True, "top_k": 0, "eos_token_id": []}
    config = generation_config(model, settings, pad_token_id=0)
    prompts = torch.randint(3, vocab, (args.batch_size, 2), generator=torch.Generator().manual_seed(0)).tolist()
    walls, cpus = [], []
    warmup = 1 if use_cache else 0
    for _ in range(warmup + (calls or args.repeats)):
        wall, cpu = time.perf_counter(), time.process_time()
        if use_cache:
            out = complete(model, prompts, config, args.device)
        else:  # complete() always asks for the cache; the reference path calls generate itself
            ids = torch.tensor(prompts, device=args.device)
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, use_cache=False
                )[:, 2:].tolist()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    assert all(len(c) == new_tokens for c in out), "a completion stopped early"
    wall, cpu = min(walls[warmup:]), min(cpus[warmup:])
    return {
        "s": wall,
        "cpu_s": cpu,
        "ms_per_token": 1e3 * wall / new_tokens,
        "cpu_ms_per_token": 1e3 * cpu / new_tokens,
    }


def run(args) -> dict:
    import datasets
    from transformers.utils import logging as hf_logging

    from hf_kd.cli.demo import build_model

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    students = dict(list(STUDENTS.items())[:1]) if args.quick else STUDENTS
    results = {
        "machine": machine(),
        "threads": args.threads,
        "device": args.device,
        "batch_size": args.batch_size,
        "new_tokens": args.new_tokens,
        "steps": args.steps,
        "repeats": args.repeats,
        "step": {},
        "generation": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        data, tokenizer = dataset(args.new_tokens, args.batch_size * (args.steps + 1), tmp)
        vocab = len(tokenizer)
        teacher = build_model(vocab, TEACHER, args.new_tokens + 2, seed=0).to(args.device).eval()
        for name, size in students.items():  # (a), (b): off- and on-policy runs interleaved, the faster of each kept
            runs = {"off-policy": [], "on-policy": []}
            for _ in range(args.repeats):
                for mode, lmbda in (("off-policy", 0.0), ("on-policy", 1.0)):
                    runs[mode].append(time_steps(size, teacher, data, tokenizer, lmbda, args, tmp))
                    print(f"{name}, {mode}: {runs[mode][-1]}", flush=True)
            results["step"][name] = {mode: min(r, key=lambda x: x["step_s"]) for mode, r in runs.items()}
        models = {f"teacher h={TEACHER[0]} L={TEACHER[1]}": TEACHER, **students}
        for name, size in models.items():  # (c)
            model = build_model(vocab, size, max(LENGTHS) + 2, seed=2).to(args.device).eval()
            cells = {str(n): time_generation(model, vocab, n, args) for n in LENGTHS}
            # without the cache each new token re-reads the whole sequence: one call (the largest student's: ~40 s)
            cells[f"{max(LENGTHS)}, no KV cache"] = time_generation(model, vocab, max(LENGTHS), args, False, calls=1)
            results["generation"][name] = cells
            print(f"{name}: {cells}", flush=True)
    return results


def markdown(r: dict, command: str) -> str:
    lines = [
        (
            f"Machine: {r['machine']}, {r['threads']} torch thread(s), {r['device']}. Command: `{command}`. Reverse KL, "
            f"T = 1, batch {r['batch_size']}, completions of {r['new_tokens']} tokens (no EOS stop), teacher "
            f"h={TEACHER[0]} L={TEACHER[1]}, the demo's 19-token vocabulary; step: median of {r['steps']} steps after a "
            f"warm-up, the faster of {r['repeats']} interleaved runs; CPU = process time."
        ),
        "",
        "(a, b) an on-policy step (lmbda 1) vs an off-policy step:",
        "",
        "| student | off-policy step s (CPU s) | on-policy step s (CPU s) | on / off (CPU) | on-policy: generating |",
        "|---|---|---|---|---|",
    ]
    for name, cell in r["step"].items():
        off, on = cell["off-policy"], cell["on-policy"]
        ratio, cpu_ratio = on["step_s"] / off["step_s"], on["step_cpu_s"] / off["step_cpu_s"]
        lines.append(
            f"| {name} | {off['step_s']:.3f} ({off['step_cpu_s']:.3f}) | {on['step_s']:.3f} "
            f"({on['step_cpu_s']:.3f}) | {ratio:.2f}x ({cpu_ratio:.2f}x) | "
            f"{100 * on['prepare_share']:.0f}% |"
        )
    big = str(max(LENGTHS))
    lines += [
        "",
        (
            f"(c) generation alone (`hf_kd.training.generation.complete`, batch {r['batch_size']}, KV cache on): seconds (CPU s) "
            f"and wall (CPU) ms per new token, the fastest of {r['repeats']} calls; x{LENGTHS[0]}: time relative to "
            f"{LENGTHS[0]} tokens (linear: {', '.join(f'{n / LENGTHS[0]:g}' for n in LENGTHS)}); no KV cache: one call."
        ),
        "",
        (
            f"| model | {' | '.join(f'{n} tokens s (CPU s)' for n in LENGTHS)} | ms/token at "
            f"{' / '.join(map(str, LENGTHS))} | x{LENGTHS[0]} at {big} (CPU) | {big} tokens, no KV cache |"
        ),
        "|---|" + "---|" * (len(LENGTHS) + 3),
    ]
    for name, cells in r["generation"].items():
        timed = [cells[str(n)] for n in LENGTHS]
        nocache = cells[f"{big}, no KV cache"]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{c['s']:.3f} ({c['cpu_s']:.3f})" for c in timed)
            + " | "
            + " / ".join(f"{c['ms_per_token']:.2f} ({c['cpu_ms_per_token']:.2f})" for c in timed)
            + f" | {timed[-1]['s'] / timed[0]['s']:.2f}x ({timed[-1]['cpu_s'] / timed[0]['cpu_s']:.2f}x) | "
            f"{nocache['s']:.2f} s ({nocache['s'] / timed[-1]['s']:.0f}x cached) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the demo's student only, 3 steps, 1 repeat")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=32, help="the demo's")
    parser.add_argument("--new_tokens", type=int, default=46, help="completion length in (a, b): the demo's")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per mode; generation calls per length")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (on a shared CPU, more spin and slow)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where onpolicy_speed.md / .json go")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 3, 1
    results = run(args)
    command = "python benchmarks/onpolicy_speed.py" + " ".join(["", *sys.argv[1:]])
    text = markdown(results, command)
    print(text)
    stem = "onpolicy_speed_quick" if args.quick else "onpolicy_speed"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(text + "\n", encoding="utf-8")
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
