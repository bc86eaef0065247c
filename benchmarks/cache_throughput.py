"""Training throughput from a teacher cache vs with a live teacher, and the cache's size on disk.

    python benchmarks/cache_throughput.py             # two teacher sizes x k in {16, 64}, tiny Llamas (a minute on CPU)
    python benchmarks/cache_throughput.py --quick     # one configuration, seconds
    python benchmarks/cache_throughput.py --device cuda

The student and teachers are random Llamas built from configs (no downloads). "live" is DistillationTrainer with the
teacher model in memory (default config: the fused loss); "cache" is the same student trained with teacher_cache
(the sparse top-k loss chunked over the student's lm_head, no teacher model). Throughput is target positions per second of
the median optimizer step after the first (warm-up) one, best of ``--repeats`` interleaved runs. "build" is the
one-time cost of the cache, which every later run and sweep reuses. bytes/pos is the cache's Arrow files on disk over
its stored positions (target: <= 8k + 8).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing hf_kd


def _llama(vocab: int, hidden: int, layers: int, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        num_key_value_heads=max(hidden // 128, 1),
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    return AutoModelForCausalLM.from_config(config)


def _train(student, teacher, cache_path, data, args, out_dir) -> float:
    """Target positions per second of the median optimizer step (after the first) of a short run."""
    from transformers import TrainerCallback

    from hf_kd import DistillationConfig, DistillationTrainer

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            marks.append(time.perf_counter())

    config = DistillationConfig(
        output_dir=out_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=1e-4,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        teacher_cache=cache_path,
        loss_type="forward_kl",
        temperature=1.0,
        alpha=0.9,
        dataloader_drop_last=True,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=data, callbacks=[Clock()]
    )
    trainer.train()
    step_times = sorted(b - a for a, b in zip(marks, marks[1:]))  # steps 2..N: the first one warms up
    return args.batch_size * (args.length - 1) / step_times[len(step_times) // 2]  # the median step: robust to noise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--length", type=int, default=256, help="tokens per example")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per method; the best is reported")
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.length, args.steps, args.repeats = 2048, 128, 4, 1

    import torch
    from datasets import Dataset

    from hf_kd.teachers.cache.build import build_teacher_cache

    logging.disable(logging.WARNING)  # the "fused loss does not apply" notice, once per cache run
    g = torch.Generator().manual_seed(0)
    examples = args.batch_size * args.steps
    rows = [{"input_ids": torch.randint(3, args.vocab, (args.length,), generator=g).tolist()} for _ in range(examples)]
    data = Dataset.from_list(rows)
    teachers = [(256, 4)] if args.quick else [(256, 4), (512, 8)]  # (hidden, layers); the student is (128, 2)
    ks = [16] if args.quick else [16, 64]
    student_size = (128, 2)

    table = []
    with tempfile.TemporaryDirectory() as tmp:
        student_params = sum(p.numel() for p in _llama(args.vocab, *student_size, seed=2).parameters())
        for hidden, layers in teachers:
            teacher = _llama(args.vocab, hidden, layers, seed=1).to(args.device)
            params = sum(p.numel() for p in teacher.parameters())
            label = f"{params / 1e6:.0f}M ({params / student_params:.0f}x student)"
            caches, builds = {}, {}
            for k in ks:
                start = time.perf_counter()
                caches[k] = build_teacher_cache(
                    teacher,
                    data,
                    f"{tmp}/{hidden}-{k}",
                    k=k,
                    batch_size=args.batch_size,
                    device=args.device,
                    progress=False,
                )
                builds[k] = time.perf_counter() - start
            live, cached = [], {k: [] for k in ks}
            for _ in range(args.repeats):  # interleaved, best of: a busy machine only ever slows a run down
                live.append(_train(_llama(args.vocab, *student_size, seed=2), teacher, None, data, args, f"{tmp}/l"))
                for k in ks:
                    student = _llama(args.vocab, *student_size, seed=2)
                    cached[k].append(_train(student, None, caches[k].path, data, args, f"{tmp}/c"))
            for k in ks:
                table.append((label, k, max(live), max(cached[k]), builds[k], caches[k].metadata["bytes_per_position"]))
            del teacher

    lines = [
        f"V={args.vocab}, {args.length} tokens x batch {args.batch_size}, student {student_params / 1e6:.1f}M "
        f"(h={student_size[0]}, {student_size[1]} layers), {_machine(args.device)}; throughput in target positions/s",
        "",
        "| teacher | k | live pos/s | cache pos/s | cache / live | cache build s | bytes/pos | 8k+8 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, k, live, cached, build, size in table:
        lines.append(
            f"| {label} | {k} | {live:,.0f} | {cached:,.0f} | {cached / live:.2f}x | {build:.1f} | "
            f"{size:.1f} | {8 * k + 8} |"
        )
    print("\n" + "\n".join(lines))
    if not args.quick:
        out = Path(__file__).resolve().parent / "results" / "cache_throughput.md"
        out.parent.mkdir(exist_ok=True)
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"\nwritten to {out}")


def _machine(device: str) -> str:
    import os
    import platform

    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores (torch {torch.__version__})"


if __name__ == "__main__":
    main()
