"""hf_kd side by side with its peers: TRL's GKDTrainer (off-policy) and a plain SFT step, on the same models and data.

    python benchmarks/peers.py             # V in {32000, 128256}, sequence 512 (about 5 minutes on a 2-core CPU)
    python benchmarks/peers.py --quick     # V=32000, sequence 256, seconds to a minute
    python benchmarks/peers.py --threads 1 # on a CPU shared with other jobs: one thread, steadier timings (~2x slower)
    python benchmarks/peers.py --device cuda --batch-size 8 --seq-len 2048
    pip install -e ".[bench]"              # trl and matplotlib; without trl the GKD cells are skipped

The pair is a random Llama teacher (hidden 256, 4 layers) and student (128, 2) built from configs (no downloads),
untied heads, float32 on CPU (on CUDA: a bf16 teacher and bf16 autocast for every trainer). Every cell is one method at
one vocabulary size, run in a fresh subprocess so that peaks do not leak between cells:

* ``sft``: ``transformers.Trainer`` on the student alone (the model's own CE over full logits) -- the floor of any
  distillation step;
* ``teacher forward``: the teacher's forward pass with full logits under ``no_grad``, nothing else;
* ``hf_kd fused`` / ``hf_kd unfused``: ``DistillationTrainer``, forward KL at T=1, alpha=1, ``loss_chunk_size`` 256 / 0;
* ``TRL GKD``: ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=0`` (always off-policy), ``seq_kd=False``, ``beta=0``
  (its forward KL), which is the same objective: every KD trainer's loss on the first batch is checked to agree.

TRL's own ``DistillationTrainer`` (``trl.DistillationTrainer``, TRL 1.16) is not a cell: it generates completions from
prompts on-policy (vLLM or ``generate``), so it has no off-policy step to compare with on the same fixed token data.

Step time is the median over the optimizer steps after ``--warmup`` (``on_step_begin`` to ``on_step_end``: forward,
backward, AdamW; data loading excluded); the minimum is reported beside it because on a shared CPU the spread between
steps can reach 2x (the load average is printed with the table). tokens/s counts target positions,
``batch * (seq_len - 1)``. Peak memory is the peak above the memory with both models loaded and the trainer built
(optimizer state, gradients, activations, logits): on CPU the resident-set high-water mark (``VmHWM``, the kernel's
``ru_maxrss``, reset through ``/proc/self/clear_refs`` right before the steps so that setup cannot hide a peak), on
CUDA ``torch.cuda.max_memory_allocated``. The overhead ratio is KD step / (SFT step + teacher forward): 1 means distilling
costs exactly one student training step plus one teacher forward.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing hf_kd

from benchmarks.machine import machine  # noqa: E402 (after the path insert)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKDTrainer lives in trl.experimental (TRL 1.x)

GB = 1024**3
RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("sft", "teacher_forward", "hf_kd_fused", "hf_kd_unfused", "trl_gkd")
KD_METHODS = ("hf_kd_fused", "hf_kd_unfused", "trl_gkd")
LABELS = {
    "sft": "SFT step (student)",
    "teacher_forward": "teacher forward",
    "hf_kd_fused": "hf_kd fused (chunk 256)",
    "hf_kd_unfused": "hf_kd unfused",
    "trl_gkd": "TRL GKD (lmbda=0)",
}
TARGETS = {  # from the issue; checked at the largest vocabulary of the run (V >= 128k in the full run)
    "step_vs_trl": 0.7,  # hf_kd fused step time <= 0.7x TRL GKD's
    "peak_vs_trl": 0.5,  # hf_kd fused peak memory <= 0.5x TRL GKD's
    "overhead": 1.05,  # hf_kd fused step <= 1.05 x (SFT step + teacher forward)
}


@dataclass
class Setup:
    vocab: int = 32000
    seq_len: int = 512
    batch_size: int = 2
    teacher: tuple[int, int] = (256, 4)  # (hidden, layers)
    student: tuple[int, int] = (128, 2)
    steps: int = 4  # measured optimizer steps
    warmup: int = 1  # untimed first steps (allocator and optimizer-state warm-up)
    chunk_size: int = 256  # loss_chunk_size of the fused cell
    device: str = "cpu"
    threads: int = 0  # torch threads on CPU; 0: torch's default (all cores)


# ---- models, data, trainers -------------------------------------------------------------------------------------


def _llama(vocab: int, size: tuple[int, int], seq_len: int, seed: int, dtype):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, layers = size
    heads = max(hidden // 64, 1)
    # Llama-3's proportions at a tiny width: MLP 3.5x hidden, 4 query heads per KV head (head_dim 64, not 128)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(3.5 * hidden),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 4, 1),
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _dataset(setup: Setup):
    import torch
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    rows = (setup.warmup + setup.steps) * setup.batch_size
    ids = torch.randint(3, setup.vocab, (rows, setup.seq_len), generator=g)
    # Every position is a target (labels = input ids; the trainers shift them), no padding: the same tensors for all.
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": ids.tolist()}
    )


def _tokenizer():
    """GKDTrainer (an SFTTrainer) needs a processing class with a pad token; the data are already token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _common_args(setup: Setup, out_dir: str) -> dict:
    cuda = setup.device.startswith("cuda")
    return {
        "output_dir": out_dir,
        "max_steps": setup.warmup + setup.steps,
        "per_device_train_batch_size": setup.batch_size,
        "learning_rate": 1e-4,
        "lr_scheduler_type": "constant",
        "logging_steps": 10**6,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": not cuda,
        "bf16": cuda,
        "dataloader_num_workers": 0,
        "seed": 0,
    }


def _trainer(method: str, setup: Setup, teacher, student, data, out_dir: str, callbacks):
    """The Trainer of one method; every one gets the same student, data, collator, optimizer and schedule."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    common = {"model": student, "train_dataset": data, "data_collator": default_data_collator, "callbacks": callbacks}
    if method == "sft":
        return Trainer(args=TrainingArguments(**_common_args(setup, out_dir)), **common)
    if method in ("hf_kd_fused", "hf_kd_unfused"):
        from hf_kd import DistillationConfig, DistillationTrainer

        chunk = setup.chunk_size if method == "hf_kd_fused" else 0
        args = DistillationConfig(
            **_common_args(setup, out_dir), loss_type="forward_kl", temperature=1.0, alpha=1.0, loss_chunk_size=chunk
        )
        return DistillationTrainer(teacher_model=teacher, args=args, **common)
    if method == "trl_gkd":
        GKDConfig, GKDTrainer = gkd_classes()
        # lmbda=0: never on-policy; seq_kd=False: never teacher-generated; beta=0: generalized JSD -> forward KL.
        # temperature only affects GKD's sampling (its loss runs at T=1), so 1.0 is the same objective as hf_kd's.
        args = GKDConfig(
            **_common_args(setup, out_dir), lmbda=0.0, seq_kd=False, beta=0.0, temperature=1.0, max_length=setup.seq_len
        )
        return GKDTrainer(teacher_model=teacher, args=args, processing_class=_tokenizer(), **common)
    raise ValueError(f"unknown method {method!r}")


# ---- measuring ----------------------------------------------------------------------------------------------------


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


class PeakMemory:
    """Peak bytes above a baseline taken by :meth:`start`: max_memory_allocated on CUDA, the RSS high-water on CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def start(self) -> None:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        self.base = (_proc_status_kb("VmRSS") or 0) * 1024
        try:  # "5" resets VmHWM (= ru_maxrss) to the current RSS: setup spikes cannot mask the steps' peak
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
        except OSError:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux: a high-water base

    def peak(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        hwm = _proc_status_kb("VmHWM")
        hwm = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(hwm * 1024 - self.base, 0)


def measure(method: str, setup: Setup) -> dict:
    """Run one cell in this process: ``{"step_s", "tokens_per_s", "peak_bytes", "loss_at_init", ...}``."""
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging

    if setup.threads:
        torch.set_num_threads(setup.threads)
    hf_logging.set_verbosity_error()
    logging.getLogger("hf_kd").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    cuda = setup.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    teacher_dtype = torch.bfloat16 if cuda else torch.float32
    teacher = _llama(setup.vocab, setup.teacher, setup.seq_len, seed=1, dtype=teacher_dtype).to(setup.device).eval()
    teacher.requires_grad_(False)
    data = _dataset(setup)
    memory = PeakMemory(setup.device)
    times: list[float] = []

    if method == "teacher_forward":
        batch = {
            k: torch.tensor(data[: setup.batch_size][k], device=setup.device) for k in ("input_ids", "attention_mask")
        }
        memory.start()
        for _ in range(setup.warmup + setup.steps):
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                _ = teacher(**batch).logits  # full [B, S, V] logits, as any KD step needs them (fused: chunk by chunk)
            sync()
            times.append(time.perf_counter() - start)
        loss_at_init = None
    else:

        class Clock(TrainerCallback):
            def on_step_begin(self, *_, **__):
                sync()
                self.start = time.perf_counter()

            def on_step_end(self, *_, **__):
                sync()
                times.append(time.perf_counter() - self.start)

        student = _llama(setup.vocab, setup.student, setup.seq_len, seed=2, dtype=torch.float32)
        with tempfile.TemporaryDirectory() as out_dir:
            trainer = _trainer(method, setup, teacher, student, data, out_dir, [Clock()])
            trainer.remove_callback(PrinterCallback)  # no end-of-training metrics dict on stdout
            loss_at_init = _loss_at_init(trainer, method, data, setup) if method in KD_METHODS else None
            memory.start()
            trainer.train()
    peak = memory.peak()
    step = statistics.median(times[setup.warmup :])
    return {
        "method": method,
        "vocab": setup.vocab,
        "step_s": step,
        "step_times_s": times,
        "min_step_s": min(times[setup.warmup :]),
        "tokens_per_s": setup.batch_size * (setup.seq_len - 1) / step,
        "peak_bytes": peak,
        "loss_at_init": loss_at_init,
    }


def _loss_at_init(trainer, method: str, data, setup: Setup) -> float:
    """The trainer's own compute_loss on the first batch before any step: every KD method must give the same value."""
    import torch
    from transformers import default_data_collator

    batch = default_data_collator([data[i] for i in range(setup.batch_size)])
    batch = {k: v.to(trainer.args.device) for k, v in batch.items()}
    model = trainer.model
    model.train()  # both trainers normalize by the local target count when num_items_in_batch is None
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch, num_items_in_batch=None)
    return loss.item()


def run_cell(method: str, setup: Setup) -> dict:
    """:func:`measure` in a fresh interpreter (peaks and allocator state do not leak between cells)."""
    command = [sys.executable, __file__, "--worker", method, "--setup", json.dumps(asdict(setup))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{method} V={setup.vocab} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gkd_classes():
    """``(GKDConfig, GKDTrainer)``: in ``trl.experimental.gkd`` since TRL 1.0, top-level ``trl`` before."""
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        from trl import GKDConfig, GKDTrainer
    return GKDConfig, GKDTrainer


def trl_available() -> bool:
    try:
        gkd_classes()
    except ImportError:
        return False
    return True


# ---- the loss check -----------------------------------------------------------------------------------------------


def loss_agreement(vocab: int = 1000, seed: int = 0) -> dict | None:
    """hf_kd's forward / reverse KL at T=1 vs TRL's ``generalized_jsd_loss`` at beta 0 / 1 on the same logits.

    Which KL each beta is comes from TRL's source, not its docs: beta=0 is ``F.kl_div(log p_s, log p_t)`` =
    KL(teacher || student) (forward), beta=1 is KL(student || teacher) (reverse). Both are also compared with a float64
    reference written here from the definition, so a swapped convention shows up as a large ``vs_reference`` on one side.
    """
    if not trl_available():
        return None
    import torch

    from hf_kd import distillation_loss

    _, GKDTrainer = gkd_classes()
    g = torch.Generator().manual_seed(seed)
    student, teacher = 3 * torch.randn(2, 2, 64, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (2, 64), generator=g)
    labels[:, :5] = -100  # a prompt that neither loss may count
    mask = labels != -100
    log_s, log_t = student[mask].log_softmax(-1), teacher[mask].log_softmax(-1)
    reference = {  # KL(p || q) = sum_v p (log p - log q), mean over the unmasked positions
        "forward_kl": (log_t.exp() * (log_t - log_s)).sum(-1).mean().item(),  # KL(teacher || student)
        "reverse_kl": (log_s.exp() * (log_s - log_t)).sum(-1).mean().item(),  # KL(student || teacher)
    }
    result = {}
    for name, beta in (("forward_kl", 0.0), ("reverse_kl", 1.0)):
        ours = distillation_loss(student, teacher, labels, loss_type=name, temperature=1.0).item()
        theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=1.0).item()
        result[name] = {
            "trl_beta": beta,
            "hf_kd": ours,
            "trl": theirs,
            "reference": reference[name],
            "abs_diff": abs(ours - theirs),
            "trl_vs_reference": abs(theirs - reference[name]),
        }
    return result


# ---- the report -------------------------------------------------------------------------------------------------


def ratios(cells: dict) -> dict:
    """Per vocabulary and KD method: x TRL step time, x TRL peak, overhead KD / (SFT + teacher forward)."""
    out = {}
    for vocab, by_method in cells.items():
        sft, fwd, trl = by_method.get("sft"), by_method.get("teacher_forward"), by_method.get("trl_gkd")
        for method in KD_METHODS:
            cell = by_method.get(method)
            if cell is None:
                continue
            out.setdefault(vocab, {})[method] = {
                "step_vs_trl": cell["step_s"] / trl["step_s"] if trl else None,
                "peak_vs_trl": cell["peak_bytes"] / trl["peak_bytes"] if trl else None,
                "overhead": cell["step_s"] / (sft["step_s"] + fwd["step_s"]) if sft and fwd else None,
            }
    return out


def targets(ratio: dict) -> dict:
    """The issue's targets for hf_kd fused at the largest vocabulary measured: value, bound, met (None: not measured)."""
    vocab = max(ratio)
    fused = ratio[vocab].get("hf_kd_fused", {})
    return {
        name: {
            "vocab": vocab,
            "value": fused.get(name),
            "bound": bound,
            "met": None if fused.get(name) is None else fused[name] <= bound,
        }
        for name, bound in TARGETS.items()
    }


def _x(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown(cells: dict, ratio: dict, setup: Setup, header: str) -> str:
    lines = [
        header,
        "",
        "| V | method | step (s) | min step (s) | tokens/s | peak (GB) | step x TRL | peak x TRL | KD / (SFT + teacher fwd) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for vocab, by_method in cells.items():
        for method in METHODS:
            cell = by_method.get(method)
            if cell is None:
                lines.append(f"| {vocab} | {LABELS[method]} | not run (TRL not installed) | | | | | | |")
                continue
            r = ratio.get(vocab, {}).get(method, {})
            lines.append(
                f"| {vocab} | {LABELS[method]} | {cell['step_s']:.3f} | {cell['min_step_s']:.3f} | "
                f"{cell['tokens_per_s']:,.0f} | "
                f"{cell['peak_bytes'] / GB:.3f} | {_x(r.get('step_vs_trl'))} | {_x(r.get('peak_vs_trl'))} | "
                f"{_x(r.get('overhead'))} |"
            )
    return "\n".join(lines)


def plot(cells: dict, path: Path, title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot: matplotlib is not installed, no PNG written (pip install matplotlib)"
    vocabs = list(cells)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        xs = [j + (i - (len(METHODS) - 1) / 2) * width for j in range(len(vocabs))]
        step = [cells[v][method]["step_s"] if method in cells[v] else 0 for v in vocabs]
        peak = [cells[v][method]["peak_bytes"] / GB if method in cells[v] else 0 for v in vocabs]
        axes[0].bar(xs, step, width, label=LABELS[method])
        axes[1].bar(xs, peak, width, label=LABELS[method])
    for ax, ylabel in zip(axes, ("step time (s)", "peak memory above models (GB)")):
        ax.set_xticks(range(len(vocabs)), [f"V={v}" for v in vocabs])
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 150), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


def report(cells: dict, setup: Setup, out_dir: Path, stem: str, seconds: float) -> dict:
    """Print the table, write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` under ``out_dir``; return the JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ratio = ratios(cells)
    checks = targets(ratio)
    agreement = loss_agreement()
    where = machine(setup.device) + (f", {setup.threads} torch thread(s)" if setup.threads else "")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    header = (
        f"{where}; {setup.device}; teacher h={setup.teacher[0]} L={setup.teacher[1]}, student "
        f"h={setup.student[0]} L={setup.student[1]}, batch {setup.batch_size} x {setup.seq_len} tokens, "
        f"forward KL T=1; step: median (and min) of {setup.steps} steps after {setup.warmup} warm-up; peak above "
        "models loaded; ratios from the medians"
    )
    table = markdown(cells, ratio, setup, header)
    lines = [table, ""]
    for name, check in checks.items():
        state = "not measured" if check["met"] is None else ("met" if check["met"] else "NOT met")
        lines.append(
            f"target {name} (hf_kd fused, V={check['vocab']}): {_x(check['value'])} <= {check['bound']}x: {state}"
        )
    for vocab, by_method in cells.items():
        losses = {m: by_method[m]["loss_at_init"] for m in KD_METHODS if m in by_method}
        spread = max(losses.values()) - min(losses.values())
        lines.append(
            f"loss on the first batch, V={vocab}: "
            + ", ".join(f"{LABELS[m]} {v:.6f}" for m, v in losses.items())
            + f" (max diff {spread:.1e})"
        )
    if agreement is None:
        lines.append("loss check vs TRL's generalized_jsd_loss: TRL not installed")
    else:
        for name, a in agreement.items():
            lines.append(
                f"{name} vs TRL generalized_jsd_loss(beta={a['trl_beta']:g}), float64, T=1, same logits: "
                f"hf_kd {a['hf_kd']:.10f}, TRL {a['trl']:.10f}, from the definition {a['reference']:.10f}; "
                f"|hf_kd - TRL| {a['abs_diff']:.1e}, |TRL - definition| {a['trl_vs_reference']:.1e}"
            )
    if load is not None:
        lines.append(
            f"load average during the run (1/5/15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on "
            f"{os.cpu_count()} CPUs; wall time {seconds:.0f} s"
        )
    text = "\n".join(lines)
    print(text)
    results = {
        "machine": where,
        "device": setup.device,
        "setup": asdict(setup),
        "cells": cells,
        "ratios": ratio,
        "targets": checks,
        "loss_agreement_vs_trl": agreement,
        "load_average": load,
        "seconds": round(seconds, 1),
        "versions": _versions(),
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    (out_dir / f"{stem}.md").write_text(text + "\n", encoding="utf-8")
    print(plot(cells, out_dir / f"{stem}.png", header))
    return results


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def run(setup: Setup, vocabs, out_dir: Path, stem: str, in_process: bool = False) -> dict:
    """Every method at every vocabulary (TRL's only when installed), then :func:`report`."""
    started = time.time()
    methods = [m for m in METHODS if m != "trl_gkd" or trl_available()]
    cells: dict = {}
    for vocab in vocabs:
        cell_setup = Setup(**{**asdict(setup), "vocab": vocab})
        for method in methods:
            cells.setdefault(vocab, {})[method] = (measure if in_process else run_cell)(method, cell_setup)
            print(f"done V={vocab} {method}: {cells[vocab][method]['step_s']:.3f} s/step", file=sys.stderr, flush=True)
    return report(cells, setup, out_dir, stem, time.time() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="V=32000, sequence 256, 2 measured steps")
    parser.add_argument("--vocabs", default="32000,128256")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="measured optimizer steps per cell (the median is kept)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: all cores); 1 on a CPU shared "
        "with other jobs, where extra threads spin against them and timings swing 2x",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON, markdown and PNG go")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        setup = json.loads(args.setup)
        setup = Setup(**{**setup, "teacher": tuple(setup["teacher"]), "student": tuple(setup["student"])})
        print(json.dumps(measure(args.worker, setup)))
        return
    vocabs = [int(v) for v in args.vocabs.split(",")]
    setup = Setup(
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        threads=args.threads,
    )
    stem = "peers"
    if args.quick:
        vocabs, setup.seq_len, setup.steps, stem = [32000], 256, 2, "peers_quick"
    if args.device.startswith("cuda"):
        stem += "_cuda"
    run(setup, vocabs, args.out, stem)


if __name__ == "__main__":
    main()
