"""Peak memory per process of training steps under FSDP2 and DeepSpeed ZeRO-3 (2 gloo processes on CPU) at a vocabulary
of 131072: the fused loss on gathered heads (``loss_chunk_size`` 256) against full logits (``loss_chunk_size`` 0, what
the trainer fell back to under FSDP / ZeRO-3 before the heads were gathered).

    python benchmarks/sharded_memory.py            # 2 engines x 2 losses, 1024 tokens per process (minutes on CPU)
    python benchmarks/sharded_memory.py --quick    # 256 tokens per process, a smaller vocabulary

What is measured, per process: the peak resident set size during ``trainer.train()`` (``ru_maxrss``) minus the
resident size when training starts (both models loaded and sharded), i.e. all the memory the steps added at their
worst: activations, logits or chunk buffers, gathered weights, gradients. tracemalloc does not see torch's allocator;
RSS does, on CPU. A tiny pair (Llama student, hidden 64; Qwen2-style teacher, hidden 96, tied embeddings; 2 layers
each) makes the logits dominate, as they do for real models at this vocabulary. Each configuration runs in fresh
processes (``torchrun``), so peaks never leak between runs. CPU FSDP needs the test-only patch of
``tests/ddp_worker.py`` (``allow_fsdp_on_cpu``), and ZeRO-3 on CPU its ``zero3_on_cpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing hf_kd
MB = 1024**2
ENGINES = ("fsdp", "zero3")
LOSSES = {"fused, chunk 256": 256, "full logits": 0}


def _worker(args) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from datasets import Dataset
    from ddp_worker import FSDP2, ZERO3, allow_fsdp_on_cpu, leave, zero3_on_cpu
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, TrainerCallback

    from hf_kd import DistillationConfig, DistillationTrainer

    settings = dict(FSDP2, use_cpu=True) if args.engine == "fsdp" else dict(ZERO3)
    if args.engine == "fsdp":
        allow_fsdp_on_cpu()
    else:
        settings.update(zero3_on_cpu())
    config = DistillationConfig(
        output_dir=args.out,
        per_device_train_batch_size=args.batch,
        max_steps=2,
        optim="sgd",  # no optimizer state: the steps' own memory only
        learning_rate=1e-3,
        loss_chunk_size=args.chunk,
        alpha=0.5,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        **settings,
    )
    shape = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)  # after the config: under ZeRO-3 from_config builds each model already partitioned
    student = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=128, **shape)
    )
    teacher = AutoModelForCausalLM.from_config(
        Qwen2Config(vocab_size=args.vocab, hidden_size=96, intermediate_size=192, tie_word_embeddings=True, **shape)
    )
    g = torch.Generator().manual_seed(1)
    rows = [
        {"input_ids": ids, "labels": [-100] * 16 + ids[16:]}
        for ids in torch.randint(3, args.vocab, (4 * args.batch, args.length), generator=g).tolist()
    ]
    clock = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            clock["start_rss"] = _current_rss()

        def on_step_begin(self, *_, **__):
            clock["step_start"] = time.perf_counter()

        def on_step_end(self, *_, **__):
            clock["step_s"] = time.perf_counter() - clock["step_start"]  # the last step's: warm

    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=Dataset.from_list(rows), callbacks=[Clock()]
    )
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    mine = {"added_mb": (peak - clock["start_rss"]) / MB, "step_s": clock["step_s"], "fused": trainer.use_fused_loss}
    everyone = [None] * trainer.accelerator.num_processes
    torch.distributed.all_gather_object(everyone, mine)
    if trainer.accelerator.is_main_process:
        Path(args.result).write_text(json.dumps(everyone))
    accelerator = trainer.accelerator
    del trainer, student, teacher
    leave(accelerator)


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _run(engine: str, chunk: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        result = Path(out) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{ROOT / 'tests'}{os.pathsep}{env.get('PYTHONPATH', '')}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
        cmd += ["--worker", "--engine", engine, "--chunk", str(chunk), "--out", out, "--result", str(result)]
        cmd += ["--vocab", str(args.vocab), "--length", str(args.length), "--batch", str(args.batch)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2, help="examples per process and step")
    parser.add_argument("--output", help="write the markdown table here as well")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("engine", "out", "result"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)
    if args.quick:
        args.vocab, args.length = 32768, 128
    from benchmarks.machine import machine

    tokens = args.batch * args.length
    lines = [
        f"{machine()}; 2 gloo processes; V={args.vocab}, {tokens} tokens per process and step "
        f"({args.batch} x {args.length}), student hidden 64, teacher hidden 96, float32, SGD; peak RSS added by "
        "2 training steps, per process",
        "| engine | loss | rank 0 (MB) | rank 1 (MB) | x full logits | step (s) |",
        "|---|---|---|---|---|---|",
    ]
    for engine in ENGINES:
        results = {name: _run(engine, chunk, args) for name, chunk in LOSSES.items()}
        full = max(r["added_mb"] for r in results["full logits"])
        for name, ranks in results.items():
            assert all(r["fused"] == bool(LOSSES[name]) for r in ranks), (name, ranks)  # the path asked for ran
            worst = max(r["added_mb"] for r in ranks)
            cells = " | ".join(f"{r['added_mb']:.0f}" for r in ranks)
            lines.append(f"| {engine} | {name} | {cells} | {worst / full:.2f} | {ranks[0]['step_s']:.2f} |")
        print("\n".join(lines[-2:]), flush=True)
    lines.append(f"Command: `python benchmarks/sharded_memory.py{' --quick' if args.quick else ''}`")
    text = "\n".join(lines)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
