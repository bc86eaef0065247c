"""A teacher in another process: bytes per token on the wire, and the CPU step time with a served teacher vs local.

    python benchmarks/served_teacher.py            # the table of bytes, then 8 steps local and served (about a minute)
    python benchmarks/served_teacher.py --quick    # 3 steps each

Bytes per target position sent by each kind of remote teacher, at the sizes of the shipped recipes' teachers (hidden
size and vocabulary from their config.json): hidden states (hf-kd serve-teacher, bf16 or float32; exact, the head is
sent once), top-k log-probabilities (vLLM, k = 20: ``8k + 4`` bytes as a cache stores them; vLLM's JSON is several
times that), and dense logits (what a logits server would send). Then the same student trained for a few steps with
the teacher in this process and with it behind ``hf-kd serve-teacher`` (an in-process aiohttp server on 127.0.0.1,
sharing the same two cores, which is the worst case for overlap): the median step time, and the share of each
request's round trip that was hidden behind the student's forward (the request is sent when the batch exists).
One torch thread, so that CPU time and wall time stay comparable on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing hf_kd

TEACHERS = {  # the shipped recipes' teachers: (hidden size, vocabulary rows) from their config.json
    "Qwen/Qwen3-8B": (4096, 151936),
    "meta-llama/Llama-3.1-8B-Instruct": (4096, 128256),
    "Qwen/Qwen2.5-7B-Instruct": (3584, 152064),
    "google/gemma-2-9b-it": (3584, 256000),
}


def wire_table(k: int = 20) -> list[str]:
    lines = [
        f"| teacher | hidden bf16 | hidden fp32 | top-{k} (8k + 4) | dense bf16 logits | dense / hidden bf16 |",
        "|---|---|---|---|---|---|",
    ]
    for name, (hidden, vocab) in TEACHERS.items():
        row = (2 * hidden, 4 * hidden, 8 * k + 4, 2 * vocab)
        lines.append(f"| {name} | " + " | ".join(f"{b / 1024:.1f} KB" for b in row) + f" | {row[3] / row[0]:.0f}x |")
    return lines


def _llama(vocab, hidden, layers, seed):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(config)


def _serve(model):
    from aiohttp import web

    from hf_kd.teachers.served.server import HiddenStateServer

    server = HiddenStateServer(model, name="bench-teacher")
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(server.app())
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


def _steps(teacher_kwargs, teacher_model, data, steps, out):
    """Seconds of each optimizer step and (served) the seconds each step waited for its teacher's answer and each
    request's round trip."""
    from transformers import TrainerCallback

    from hf_kd import DistillationConfig, DistillationTrainer
    from hf_kd.teachers.served import teacher as served

    times, waits = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.started)

    real_run, real_ask = served.ServedTeacher.run, served.ServedTeacher._ask
    trips = []

    def timed_ask(self, *args):
        started = time.perf_counter()
        try:
            return real_ask(self, *args)
        finally:
            trips.append(time.perf_counter() - started)

    def timed_run(self, inputs, forward, targets):
        started = time.perf_counter()
        answer = getattr(inputs, "teacher_answers", {}).get(id(self))
        if answer is not None:
            answer.result()
        waits.append(time.perf_counter() - started)
        return real_run(self, inputs, forward, targets)

    served.ServedTeacher.run, served.ServedTeacher._ask = timed_run, timed_ask
    try:
        args = DistillationConfig(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=8,
            learning_rate=1e-4,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            logging_steps=10**6,
            **teacher_kwargs,
        )
        trainer = DistillationTrainer(
            model=_llama(4096, 128, 2, 2),
            teacher_model=teacher_model,
            args=args,
            train_dataset=data,
            callbacks=[Clock()],
        )
        trainer.train()
    finally:
        served.ServedTeacher.run, served.ServedTeacher._ask = real_run, real_ask
    return times[1:], waits[1:], trips[1:]  # the first step warms up


def main() -> None:
    import statistics
    import tempfile

    import torch
    from datasets import Dataset

    from benchmarks.machine import machine

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    steps = 4 if cli.quick else 9
    print(f"# Remote teachers ({machine()}, torch {torch.__version__}, 1 thread)\n")
    print("Bytes per target position on the wire:\n")
    print("\n".join(wire_table()))
    teacher = _llama(4096, 512, 4, 1).eval()
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_list([{"input_ids": torch.randint(1, 4096, (256,), generator=g).tolist()} for _ in range(80)])
    url = _serve(teacher)
    with tempfile.TemporaryDirectory() as out:
        local, _, _ = _steps({}, teacher, data, steps, out)
        remote, waits, trips = _steps(
            {"teacher_kind": "served", "teacher_options": {"url": url}}, None, data, steps, out
        )
    row = {
        "local_step_s": statistics.median(local),
        "served_step_s": statistics.median(remote),
        "served_wait_s": statistics.median(waits),
        "round_trip_s": statistics.median(trips),
    }
    row["hidden_share"] = max(0.0, 1 - row["served_wait_s"] / row["round_trip_s"])
    print("\nStudent 128 x 2 layers, teacher 512 x 4 layers, vocab 4096, batch 8 x 256 tokens (median step):\n")
    print("| teacher | step (s) | ratio | request round trip (s) | waited for it (s) | hidden behind the forward |")
    print("|---|---|---|---|---|---|")
    print(f"| local | {row['local_step_s']:.3f} | 1.00x | - | - | - |")
    print(
        f"| served (same 2 cores) | {row['served_step_s']:.3f} | {row['served_step_s'] / row['local_step_s']:.2f}x "
        f"| {row['round_trip_s']:.3f} | {row['served_wait_s']:.3f} | {100 * row['hidden_share']:.0f}% |"
    )
    out = Path(__file__).resolve().parent / "results" / "served_teacher.json"
    out.write_text(json.dumps({**row, "machine": machine(), "quick": cli.quick}, indent=2) + "\n")


if __name__ == "__main__":
    main()
