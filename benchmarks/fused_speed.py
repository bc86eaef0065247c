"""Speed of the fused forward-KL loss against the naive full-logits loss and the physical floor, side by side.

    python benchmarks/fused_speed.py                      # V in {32000, 128256} x H in {256, 1024}, N = 1024, 1 thread
    python benchmarks/fused_speed.py --quick              # V = 32000, H = 256, N = 512: seconds
    python benchmarks/fused_speed.py --compare-with DIR   # + another checkout's hf_kd package (DIR/hf_kd), same inputs
    python benchmarks/fused_speed.py --compile            # + the per-chunk math under torch.compile (an experiment)
    python benchmarks/fused_speed.py --device cuda        # bf16, Liger's shape: N = 8192, H = 4096, V = 128256

Each cell is one forward + backward of forward KL + CE (alpha = 0.5, T = 1, 10% of positions masked) on random
hidden states and lm_head weights, student and teacher of the same H:

* ``floor``: what no implementation can skip, chunk by chunk into reused buffers: the four matmuls (student logits,
  teacher logits, d(hidden), d(weight)) and one ``exp`` pass over each model's logits;
* ``fused``: ``hf_kd.fused_distillation_loss`` (chunk 256 unless ``--chunk-sizes``);
* ``naive``: what a user writes: ``hidden @ W.T`` for both models, ``distillation_loss`` on the full logits, autograd;
* ``before``: ``fused`` from ``--compare-with``'s package (e.g. a ``git worktree`` of an older commit);
* ``compiled``: ``fused`` with its per-chunk softmax/KL/gradient math compiled by ``torch.compile`` (``--compile``);
* ``fused, bf16 autocast`` (CPU): ``fused`` under ``torch.autocast("cpu", torch.bfloat16)`` over the same float32
  weights, as the Trainer's ``bf16=True`` runs it: the head GEMMs in bf16, the math in float32. Only where the CPU
  has bf16 matrix units (``amx_bf16`` or ``avx512_bf16`` in ``/proc/cpuinfo``); elsewhere its row says so, since a
  bf16 GEMM emulated in float32 is slower than float32 and no measure of the path.

The methods take turns, repeat after repeat, in one process (a shared machine's load hits them alike), after one
untimed warm-up call each (compilation, allocator). On CPU every cell reports the fastest wall time and the fastest
process CPU time (one torch thread: CPU time is the work, wall time adds waits for the other jobs); ratios are taken
against the floor of the same cell. On CUDA times are synchronized wall times. Both report the peak memory above the
inputs: on CUDA the allocator's peak, on CPU the process's peak resident memory (``VmHWM``, reset through
``/proc/self/clear_refs``; glibc's mmap threshold fixed so that freed buffers leave) above its resident memory before
one more call of each method. Results go to ``benchmarks/results/fused_speed[_cuda].{md,json}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing hf_kd

from benchmarks.machine import machine  # noqa: E402 (after the path insert)

RESULTS = Path(__file__).resolve().parent / "results"
GB = 1024**3
AUTOCAST = "fused, bf16 autocast"


def bf16_units() -> list[str]:
    """The CPU's bf16 matrix-unit flags among ``amx_bf16`` (Intel Xeon 4th gen+) and ``avx512_bf16`` (also AMD Zen 4+),
    read off ``/proc/cpuinfo`` (empty: none, or not Linux)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags.split()]


def peak_rss_above(step) -> int | None:
    """Bytes of the process's peak resident memory during ``step()`` above its resident memory before it (Linux)."""
    import ctypes

    def status(key: str) -> int:
        text = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in text.splitlines() if line.startswith(key + ":"))) * 1024

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 2**17)  # M_MMAP_THRESHOLD fixed at 128 KB: every buffer mmapped, unmapped when freed
        libc.malloc_trim(0)  # hand freed heap pages back: the baseline is what is live
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = status("VmRSS")
    except (OSError, StopIteration):
        return None
    step()
    return status("VmHWM") - base


def inputs(n: int, h: int, v: int, device, dtype, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.arange(n) % 10 == 0] = -100  # some prompt/padding positions, as in real batches
    return {
        "student_hidden": rand(n, h).requires_grad_(),
        "student_weight": rand(v, h, scale=h**-0.5).requires_grad_(),
        "teacher_hidden": rand(n, h),
        "teacher_weight": rand(v, h, scale=h**-0.5),
        "labels": labels.to(device),
    }


def load_package(directory: str, name: str):
    """The ``hf_kd`` package under ``directory`` imported as ``name`` (its relative imports resolve inside it)."""
    path = Path(directory).resolve()
    path = path / "hf_kd" if (path / "hf_kd" / "__init__.py").exists() else path
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py", submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ---- the methods: each a function of the inputs that runs one forward + backward -------------------------------


def floor_step(x: dict, chunk_size: int):
    """The four matmuls and one exp pass per model, chunk by chunk, into buffers allocated once (as the fused loss
    does); on CUDA bf16 matmuls with float32 output, as the fused loss uses them."""
    import torch

    from hf_kd.models.heads import as_projection_weight

    s_w = as_projection_weight(x["student_weight"].detach(), torch.float32)  # bf16 kept where CUDA emits float32
    t_w = as_projection_weight(x["teacher_weight"], torch.float32)
    keep = x["labels"] != -100  # masked rows are dropped before any matmul, as in the fused loss
    s_hidden, t_hidden = x["student_hidden"].detach()[keep].to(s_w.dtype), x["teacher_hidden"][keep].to(t_w.dtype)
    low = s_w.dtype if s_w.dtype != torch.float32 else None
    n, v = s_hidden.shape[0], s_w.shape[0]
    rows = min(chunk_size, n)
    student, teacher = (torch.empty(rows, v, device=s_w.device) for _ in range(2))
    rounded = torch.empty(rows, v, device=s_w.device, dtype=low) if low else None
    d_hidden = torch.empty(n, s_w.shape[1], device=s_w.device)
    d_weight = torch.zeros(s_w.shape, device=s_w.device)

    def mm(a, b, out):
        return torch.mm(a, b, out=out) if low is None else torch.mm(a, b, out_dtype=torch.float32, out=out)

    for start in range(0, n, chunk_size):
        h, th = s_hidden[start : start + chunk_size], t_hidden[start : start + chunk_size]
        c = h.shape[0]
        mm(h, s_w.T, student[:c])
        mm(th, t_w.T, teacher[:c])
        student[:c].exp_()
        teacher[:c].exp_()
        grad = student[:c] if low is None else rounded[:c].copy_(student[:c])
        mm(grad, s_w, d_hidden[start : start + c])
        if low is None:
            d_weight.addmm_(grad.T, h)
        else:
            try:  # float32 accumulation straight from the bf16 matmul where torch has it
                torch.addmm(d_weight, grad.T, h, out_dtype=torch.float32, out=d_weight)
            except (RuntimeError, TypeError):
                d_weight.add_(torch.mm(grad.T, h, out_dtype=torch.float32))
    return d_hidden, d_weight


def fused_step(package, x: dict, chunk_size: int, autocast: bool = False):
    import torch

    with torch.autocast(x["labels"].device.type, torch.bfloat16, enabled=autocast):
        loss = package.fused_distillation_loss(
            x["student_hidden"],
            x["student_weight"],
            x["teacher_hidden"],
            x["teacher_weight"],
            x["labels"],
            alpha=0.5,
            chunk_size=chunk_size,
        )
    loss.backward()
    x["student_hidden"].grad = x["student_weight"].grad = None
    return loss.item()


def naive_step(x: dict):
    import torch

    from hf_kd.objective.losses import distillation_loss

    student_logits = (x["student_hidden"] @ x["student_weight"].T).float()
    with torch.no_grad():
        teacher_logits = (x["teacher_hidden"] @ x["teacher_weight"].T).float()
    loss = distillation_loss(student_logits, teacher_logits, x["labels"], alpha=0.5)
    loss.backward()
    x["student_hidden"].grad = x["student_weight"].grad = None
    return loss.item()


def compiled_divergence():
    """A drop-in for ``hf_kd.objective.fused._forward_kl_closed_form`` whose per-chunk math (T = 1) is one ``torch.compile``d
    function writing the gradient into a reused buffer; anything else goes to the eager closed form."""
    import torch

    from hf_kd import fused

    eager = fused._forward_kl_closed_form

    @torch.compile(dynamic=False, fullgraph=True)
    def math(s, t, labels, a: float, c: float, grad):
        log_s, log_t = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
        p_s, p_t = log_s.exp(), log_t.exp()
        cross = torch.where(p_t > 0, p_t * (log_t - log_s), 0.0).sum()
        grad.copy_((a + c) * p_s - a * p_t)
        return cross, -log_s.gather(-1, labels.unsqueeze(-1)).sum()

    def divergence(student, teacher, labels, plan, want_grad, scratch):
        objective = plan.objective
        if objective.temperature != 1 or not (plan.need_divergence and plan.need_ce and want_grad):
            return eager(student, teacher, labels, plan, want_grad, scratch)
        scale, alpha = objective.weights["forward_kl"] * objective.temperature_scale, objective.alpha
        grad = scratch("compiled_grad", student.shape[0])
        cross, ce = math(student, teacher.values, labels, alpha * scale, 1 - alpha, grad)
        grad.scatter_add_(-1, labels.unsqueeze(-1), grad.new_full((labels.shape[0], 1), alpha - 1))
        return scale * cross, ce, grad

    return divergence


# ---- measuring --------------------------------------------------------------------------------------------------


def cell(args, v: int, h: int, packages: dict) -> dict:
    import torch

    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    x = inputs(args.tokens, h, v, args.device, dtype)
    methods = {"floor": lambda: floor_step(x, args.chunk_sizes[0])}
    for chunk in args.chunk_sizes:
        methods[f"fused (chunk {chunk})"] = lambda chunk=chunk: fused_step(packages["fused"], x, chunk)
    if "before" in packages:
        methods["before"] = lambda: fused_step(packages["before"], x, args.chunk_sizes[0])
    if args.compile:
        from hf_kd import fused

        divergence, eager = compiled_divergence(), fused._forward_kl_closed_form

        def compiled():
            fused._forward_kl_closed_form = divergence
            try:
                return fused_step(packages["fused"], x, args.chunk_sizes[0])
            finally:
                fused._forward_kl_closed_form = eager

        methods["compiled"] = compiled
    if not cuda and args.units:
        methods[AUTOCAST] = lambda: fused_step(packages["fused"], x, args.chunk_sizes[0], autocast=True)
    if not args.no_naive:
        methods["naive"] = lambda: naive_step(x)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    results = {name: {"wall": [], "cpu": [], "peak": 0} for name in methods}
    for name, step in methods.items():  # warm-up: compilation, allocator, lazy initialization
        sync()
        start = time.perf_counter()
        results[name]["loss"] = step() if name != "floor" else None
        sync()
        results[name]["first_call_s"] = time.perf_counter() - start
    for _ in range(args.repeats):
        for name, step in methods.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            sync()
            results[name]["wall"].append(time.perf_counter() - wall)
            results[name]["cpu"].append(time.process_time() - cpu)
            if cuda:
                results[name]["peak"] = max(results[name]["peak"], torch.cuda.max_memory_allocated() - base)
    if not cuda:  # one more call each, alone: the peak resident memory above what was resident before it
        for name, step in methods.items():
            results[name]["peak"] = peak_rss_above(step)
    losses = [r["loss"] for n, r in results.items() if r["loss"] is not None and n != AUTOCAST]
    if max(losses) - min(losses) > (1e-2 if cuda else 1e-4) * abs(losses[0]):  # cuda: naive has bf16 logits
        raise RuntimeError(f"V={v} H={h}: the methods disagree on the loss: {losses}")
    if AUTOCAST in results and abs(results[AUTOCAST]["loss"] - losses[0]) > 1e-3 * abs(losses[0]):  # bf16 inputs
        raise RuntimeError(f"V={v} H={h}: bf16 autocast is off the float32 loss: {results[AUTOCAST]['loss']}")
    return {"vocab": v, "hidden": h, "tokens": args.tokens, "methods": results}


def markdown(cells: list, args, header: str) -> str:
    cuda = args.device.startswith("cuda")
    lines = [header, ""]
    if cuda:
        lines += [
            "| V | H | method | time (ms) | x floor | x naive | peak above inputs (GB) |",
            "|---|---|---|---|---|---|---|",
        ]
    else:
        columns = "wall (s) | CPU (s) | x floor (wall) | x floor (CPU) | x naive (CPU) | peak above inputs (MB)"
        lines += [f"| V | H | method | {columns} |", "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        m = c["methods"]
        floor_wall, floor_cpu = min(m["floor"]["wall"]), min(m["floor"]["cpu"])
        naive = m.get("naive")
        for name, r in m.items():
            wall, cpu = min(r["wall"]), min(r["cpu"])
            if cuda:
                vs_naive = f"{wall / min(naive['wall']):.2f}x" if naive else "-"
                lines.append(
                    f"| {c['vocab']} | {c['hidden']} | {name} | {wall * 1e3:.1f} | {wall / floor_wall:.2f}x | "
                    f"{vs_naive} | {r['peak'] / GB:.2f} |"
                )
            else:
                vs_naive = f"{cpu / min(naive['cpu']):.2f}x" if naive else "-"
                peak = "-" if r["peak"] is None else f"{r['peak'] / 2**20:.0f}"
                lines.append(
                    f"| {c['vocab']} | {c['hidden']} | {name} | {wall:.3f} | {cpu:.3f} | "
                    f"{wall / floor_wall:.2f}x | {cpu / floor_cpu:.2f}x | {vs_naive} | {peak} |"
                )
        if not cuda and not args.units:
            lines.append(
                f"| {c['vocab']} | {c['hidden']} | {AUTOCAST} | not measured: this CPU has no bf16 matrix "
                "units (neither amx_bf16 nor avx512_bf16 in /proc/cpuinfo) | | | | | |"
            )
    compiled = [r["first_call_s"] for c in cells for n, r in c["methods"].items() if n == "compiled"]
    if compiled:
        lines += ["", f"compiled: first call (compilation) {max(compiled):.0f} s at most per cell"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="V=32000, H=256, N=512, 2 repeats")
    parser.add_argument("--vocabs", default=None, help="comma-separated (default 32000,128256; cuda: 128256)")
    parser.add_argument("--hiddens", default=None, help="comma-separated H (default 256,1024; cuda: 4096)")
    parser.add_argument("--tokens", type=int, default=None, help="N positions (default 1024; cuda: 8192)")
    parser.add_argument(
        "--chunk-sizes",
        default="256",
        help="fused chunk sizes, comma-separated; the first is the floor's and before's/compiled's",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method (the fastest is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--compare-with", help="directory of another hf_kd package (or a checkout holding one)")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile variant (minutes to compile)")
    parser.add_argument("--no-naive", action="store_true", help="skip the full-logits cell (~5 x N x V floats)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    import hf_kd

    cuda = args.device.startswith("cuda")
    torch.set_num_threads(args.threads)
    args.units = [] if cuda else bf16_units()
    vocabs = args.vocabs or ("128256" if cuda else "32000,128256")
    hiddens = args.hiddens or ("4096" if cuda else "256,1024")
    args.tokens = args.tokens or (8192 if cuda else 1024)
    if args.quick:
        vocabs, hiddens, args.tokens, args.repeats = "32000", "256", 512, 2
    args.chunk_sizes = [int(c) for c in args.chunk_sizes.split(",")]
    packages = {"fused": hf_kd}
    if args.compare_with:
        packages["before"] = load_package(args.compare_with, "hf_kd_before")
    started, cells = time.time(), []
    for v in (int(v) for v in vocabs.split(",")):
        for h in (int(h) for h in hiddens.split(",")):
            cells.append(cell(args, v, h, packages))
            print(f"done V={v} H={h}", file=sys.stderr, flush=True)
    where = machine(args.device) + ("" if cuda else f", {args.threads} torch thread(s)")
    if not cuda:
        where += f", bf16 matrix units: {', '.join(args.units) or 'none'}"
    load = os.getloadavg()
    header = (
        f"{where}; torch {torch.__version__}; {'bf16' if cuda else 'float32 weights'}, N={args.tokens} "
        f"positions (10% masked), forward KL + CE, alpha=0.5, T=1; fastest of {args.repeats} forward+backward; "
        f"load average {load[0]:.1f} on {os.cpu_count()} CPUs; {time.time() - started:.0f} s"
    )
    text = markdown(cells, args, header)
    print(text)
    stem = "fused_speed" + ("_cuda" if cuda else "") + ("_quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(text + "\n", encoding="utf-8")
    record = {"header": header, "cells": cells, "args": {k: str(v) for k, v in vars(args).items()}}
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
