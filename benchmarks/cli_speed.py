"""How long the `hf-kd` command line takes before it does anything, and how many torch threads a CPU run should use.

    python benchmarks/cli_speed.py                  # both tables (a few minutes on a 2-core CPU)
    python benchmarks/cli_speed.py --part cli       # the command-line timings only (a minute)
    python benchmarks/cli_speed.py --part threads   # CPU training steps at 1 thread vs all cores

**cli**: wall time of fresh processes, median of ``--repeats`` runs, each against the reference ``python -c "import
torch, transformers"`` measured in the same loop (the target: help and a typo'd recipe <= 0.2x of it). "typo, cold"
runs with an empty name cache (the first typo after installing or upgrading: it imports the real classes once);
"typo" with the cache that run left. The last column lists which of torch / transformers / peft / datasets the
command imported (it should be none for help and typos).

**threads**: median optimizer-step time of DistillationTrainer on random Llamas built from configs (no downloads), in
a fresh process per cell, with ``torch.set_num_threads(n)``: the demo's sizes and a larger pair.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "datasets")
REFERENCE = "import torch, transformers"  # the target: help and a typo'd recipe in <= 0.2x of this
TYPO = """\
teacher: {name_or_path: Qwen/Qwen2.5-7B-Instruct}
student: {name_or_path: Qwen/Qwen2.5-0.5B-Instruct}
data: {dataset: HuggingFaceH4/ultrachat_200k}
training: {output_dir: out, learning_rat: 1.0e-5}
"""
# runs `hf-kd ARGS` in-process and reports which heavy modules it imported (exit code kept)
PROBE = """\
import sys
from hf_kd.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print("HEAVY=" + ",".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
"""


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} CPUs (load average {load:.1f} at the start), Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def _timed(argv: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    heavy = next((line[6:] for line in done.stderr.splitlines() if line.startswith("HEAVY=")), "")
    return seconds, heavy


def cli_table(repeats: int) -> list[str]:
    work = Path(tempfile.mkdtemp(prefix="hf_kd_cli_speed_"))
    recipe = work / "typo.yaml"
    recipe.write_text(TYPO)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_KD_CACHE": str(work / "cache"), "PYTHONPATH": str(ROOT)}
    probe = [sys.executable, "-c", PROBE.format(heavy=HEAVY)]
    cases = {
        "python -c 'import torch, transformers' (reference)": ([sys.executable, "-c", REFERENCE], None),
        "python -c 'import hf_kd.cli'": ([*probe[:2], probe[2].replace("code = main(sys.argv[1:])", "pass")], None),
        "hf-kd --help": ([*probe, "--help"], None),
        "hf-kd train --help": ([*probe, "train", "--help"], None),
        "hf-kd check typo.yaml (cold name cache)": ([*probe, "check", str(recipe)], "cold"),
        "hf-kd check typo.yaml": ([*probe, "check", str(recipe)], None),
        "hf-kd train typo.yaml --max_stepz 10": ([*probe, "train", str(recipe), "--max_stepz", "10"], None),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    heavy: dict[str, str] = {}
    for _ in range(repeats):
        for name, (argv, cache) in cases.items():
            if cache == "cold":
                for old in (work / "cache").glob("*"):
                    old.unlink()
            seconds, imported = _timed(argv, env)
            times[name].append(seconds)
            heavy[name] = imported
    reference = statistics.median(next(iter(times.values())))
    lines = ["| command | wall (s, median) | x reference | imported |", "|---|---|---|---|"]
    for name, values in times.items():
        median = statistics.median(values)
        imported = "-" if "(reference)" in name else heavy[name] or "none"
        lines.append(f"| `{name}` | {median:.2f} | {median / reference:.2f}x | {imported} |")
    return lines


# ---- threads ------------------------------------------------------------------------------------------------------

SIZES = {  # name -> (student (hidden, layers), teacher (hidden, layers), vocab, sequence length, batch)
    "hf-kd demo": ((48, 2), (128, 2), 19, 48, 32),
    "hf-kd demo --fast": ((32, 1), (48, 2), 15, 32, 16),
    "larger": ((256, 4), (512, 6), 8192, 256, 8),
}

STEP = """\
import json, statistics, sys, tempfile, time
import torch
torch.set_num_threads({threads})
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback
from hf_kd import DistillationConfig, DistillationTrainer

def llama(hidden, layers, seed):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size={vocab}, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings={length},
                         pad_token_id=0, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config)

g = torch.Generator().manual_seed(0)
rows = [{{"input_ids": torch.randint(3, {vocab}, ({length},), generator=g).tolist()}} for _ in range({batch} * {steps})]
marks = []
class Clock(TrainerCallback):
    def on_step_end(self, *_, **__):
        marks.append(time.perf_counter())
args = DistillationConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size={batch}, max_steps={steps},
                          report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True, use_cpu=True,
                          dataloader_pin_memory=False)
student, teacher = llama(*{student}, 0), llama(*{teacher}, 1)
params = [sum(p.numel() for p in m.parameters()) for m in (student, teacher)]
DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
                    callbacks=[Clock()]).train()
steps = [b - a for a, b in zip(marks, marks[1:])]
print(json.dumps({{"median": statistics.median(steps), "params": params}}))
"""


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def threads_table(steps: int, thread_counts: list[int]) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    header = " | ".join(f"{n} thread{'s' if n > 1 else ''} (s/step)" for n in thread_counts)
    lines = [
        f"| models | student / teacher params | tokens x batch | {header} | {thread_counts[-1]} vs 1 |",
        "|---|---|---|" + "---|" * (len(thread_counts) + 1),
    ]
    for name, (student, teacher, vocab, length, batch) in SIZES.items():
        medians = []
        for threads in thread_counts:
            code = STEP.format(
                threads=threads, vocab=vocab, length=length, batch=batch, steps=steps, student=student, teacher=teacher
            )
            done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            medians.append(result["median"])
        params = " / ".join(_count(n) for n in result["params"])
        cells = " | ".join(f"{m:.4f}" for m in medians)
        lines.append(f"| {name} | {params} | {length} x {batch} | {cells} | {medians[-1] / medians[0]:.2f}x |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["cli", "threads", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=5, help="cli: runs per command (median)")
    parser.add_argument("--steps", type=int, default=12, help="threads: optimizer steps per run (median after the 1st)")
    parser.add_argument("--threads", type=int, nargs="+", help="threads: counts to compare (default: 1 and all cores)")
    args = parser.parse_args()
    lines = [f"Machine: {_machine()}", ""]
    if args.part in ("cli", "both"):
        lines += cli_table(args.repeats) + [""]
    if args.part in ("threads", "both"):
        counts = args.threads or sorted({1, os.cpu_count() or 1})
        lines += threads_table(args.steps, counts) + [""]
    text = "\n".join(lines)
    print(text)
    out = ROOT / "benchmarks" / "results" / f"cli_speed{'' if args.part == 'both' else '_' + args.part}.md"
    out.write_text(text)
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
