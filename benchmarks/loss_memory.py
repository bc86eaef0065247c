"""Peak memory and time of one forward+backward of the distillation loss: full logits vs the fused chunked path.

    python benchmarks/loss_memory.py            # N in {4096, 16384} x V in {32000, 128256}, H = 256 (minutes on CPU)
    python benchmarks/loss_memory.py --quick    # a small grid, seconds
    python benchmarks/loss_memory.py --device cuda

Every (configuration, method) runs in a fresh subprocess so that peaks do not leak between runs. Memory is the peak
above a baseline taken after the inputs (hidden states, lm_head weights, labels) are allocated: ``ru_maxrss`` on CPU,
``torch.cuda.max_memory_allocated`` on GPU. "naive" is what a user writes: ``hidden @ W.T`` for both models, then
``distillation_loss`` on the full logits; "fused" is ``hf_kd.objective.fused.fused_distillation_loss``.
A naive cell whose projected peak exceeds ``--max-gb`` is skipped; its ratio is then taken against that projection
(bytes per logit element measured on the largest naive run that fit) and marked ``~``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing hf_kd
GB = 1024**3
TARGETS = "fused extra memory <= 0.15x naive at V=128256; fused N=16384 vs 4096 <= 1.25x; fused time <= 0.8x naive"


def _worker(args) -> None:
    import torch

    from hf_kd.objective.fused import fused_distillation_loss
    from hf_kd.objective.losses import distillation_loss

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    n, v, h = args.n, args.v, args.hidden
    student_hidden = torch.randn(n, h, generator=g).to(device).requires_grad_()
    teacher_hidden = torch.randn(n, h, generator=g).to(device)
    student_weight = (torch.randn(v, h, generator=g) / h**0.5).to(device).requires_grad_()
    teacher_weight = (torch.randn(v, h, generator=g) / h**0.5).to(device)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.arange(n) % 10 == 0] = -100  # some prompt/padding positions, as in real batches
    labels = labels.to(device)

    def step():
        if args.method == "naive":
            student_logits = student_hidden @ student_weight.T
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight.T
            loss = distillation_loss(student_logits, teacher_logits, labels, alpha=0.5)
        else:
            loss = fused_distillation_loss(
                student_hidden,
                student_weight,
                teacher_hidden,
                teacher_weight,
                labels,
                alpha=0.5,
                chunk_size=args.chunk_size,
            )
        loss.backward()
        student_hidden.grad = student_weight.grad = None
        return loss.item()

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    print(json.dumps({"peak": peak, "time": min(times), "loss": loss}))


def _run(args, method: str, n: int, v: int, chunk_size: int = 0) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--method",
        method,
        "--n",
        str(n),
        "--v",
        str(v),
        "--hidden",
        str(args.hidden),
        "--chunk-size",
        str(chunk_size),
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{method} N={n} V={v} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small grid: N in {512, 2048}, V in {4096, 16384}")
    parser.add_argument("--hidden", type=int, default=256, help="H of both models")
    parser.add_argument(
        "--chunk-sizes",
        default="256,1024",
        help="fused chunk_size values to compare (256: the "
        "default of fused_distillation_loss and of the trainer's loss_chunk_size)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="forward+backward runs per cell; the fastest is timed")
    parser.add_argument("--max-gb", type=float, default=18.0, help="skip naive cells projected to need more")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=("naive", "fused"), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--v", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)

    ns, vs = ((512, 2048), (4096, 16384)) if args.quick else ((4096, 16384), (32000, 128256))
    chunk_sizes = [int(c) for c in args.chunk_sizes.split(",")]
    if args.quick:
        args.repeats, chunk_sizes = 1, [c for c in chunk_sizes if c <= ns[0]] or [ns[0] // 2]
    bytes_per_element = None  # naive peak / (N * V), from the largest naive run that fit
    rows, fused_peaks = [], {}
    for n, v in sorted(((n, v) for n in ns for v in vs), key=lambda nv: nv[0] * nv[1]):
        projected = None if bytes_per_element is None else bytes_per_element * n * v
        naive = None
        if projected is not None and projected > args.max_gb * GB:
            rows.append(f"| {n} | {v} | naive | skipped (would need {projected / GB:.1f} GB) | 1 | - | 1 |")
        else:
            naive = _run(args, "naive", n, v)
            bytes_per_element = naive["peak"] / (n * v)
            rows.append(f"| {n} | {v} | naive | {naive['peak'] / GB:.2f} | 1 | {naive['time']:.2f} | 1 |")
        for chunk_size in chunk_sizes:
            fused = _run(args, "fused", n, v, chunk_size)
            fused_peaks[n, v, chunk_size] = fused["peak"]
            if naive is None:  # against the projection, marked ~
                mem_ratio, time_ratio = f"~{fused['peak'] / projected:.3f}", "-"
            else:
                mem_ratio, time_ratio = f"{fused['peak'] / naive['peak']:.3f}", f"{fused['time'] / naive['time']:.2f}"
                if abs(naive["loss"] - fused["loss"]) > 1e-4 * abs(naive["loss"]):
                    raise RuntimeError(f"N={n} V={v}: naive loss {naive['loss']} != fused loss {fused['loss']}")
            rows.append(
                f"| {n} | {v} | fused, chunk {chunk_size} | {fused['peak'] / GB:.3f} | {mem_ratio} | "
                f"{fused['time']:.2f} | {time_ratio} |"
            )
        print(f"done N={n} V={v}", file=sys.stderr, flush=True)

    print(
        f"device={args.device} H={args.hidden} float32, forward_kl alpha=0.5, 10% of positions masked, "
        f"time = fastest of {args.repeats} forward+backward"
    )
    print("| N | V | method | extra peak (GB) | x naive | time (s) | x naive |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    for chunk_size in chunk_sizes:
        for v in vs:
            small, large = fused_peaks[ns[0], v, chunk_size], fused_peaks[ns[-1], v, chunk_size]
            print(f"fused chunk {chunk_size}, V={v}: peak at N={ns[-1]} / N={ns[0]} = {large / small:.2f}x")
    print(f"targets: {TARGETS}")


if __name__ == "__main__":
    main()
