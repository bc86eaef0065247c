"""Which objective earns the most of a real teacher back? SmolLM2-135M-Instruct distilled into students pruned from it,
on the Python reference topics (hf_kd/cli/real_text.py), on a CPU.

    python benchmarks/real_model.py                      # every method at depth 15, the main ones at depth 8, 1 seed
    python benchmarks/real_model.py --depths 15 --methods "CE only" "forward KL" --seeds 0 1 2
    python benchmarks/real_model.py --quick              # 2 steps, 4 held-out windows: the script runs (tests)

The teacher comes from ``scripts/real_models.py``. A student keeps the ``depth`` layers whose removal alone moves the
teacher most on 8 training windows (hf_kd.models.pruning.drop_one_divergence; the table of candidate layer choices is
written too). Every student gets the same budget (init, batches, steps, learning rate, schedule) and differs only in
the objective and in whose completions it trains on:

* CE only (alpha 0); forward KL; reverse KL; JSD (beta 0.5) -- off-policy, on the reference windows;
* on-policy reverse KL, cold (lmbda 1 from step 0) and warm-started (off-policy reverse KL for half the steps, then
  lmbda 1: ``lmbda_warmup_steps``);
* seq_kd: the teacher's own completions (forward KL).

Reported on held-out windows (topics never trained on): the completion tokens' NLL, KL(teacher || student) and top-1
agreement, and the teacher-scored NLL of the student's own samples (16 held-out prompts completed at T = 1, seeded):
how likely the teacher finds what the student writes. Generated completions are as long as the data's (no EOS stop),
so every batch has the same number of target tokens whoever wrote it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing hf_kd
sys.path.insert(0, str(ROOT / "scripts"))
RESULTS = Path(__file__).resolve().parent / "results"

METHODS = {
    "CE only": {"loss_type": "forward_kl", "alpha": 0.0},
    "forward KL": {"loss_type": "forward_kl", "alpha": 1.0},
    "reverse KL": {"loss_type": "reverse_kl", "alpha": 1.0},
    "JSD": {"loss_type": "jsd", "alpha": 1.0},
    "on-policy reverse KL (cold)": {"loss_type": "reverse_kl", "alpha": 1.0, "lmbda": 1.0},
    "on-policy reverse KL (warm start)": {"loss_type": "reverse_kl", "alpha": 1.0, "lmbda": 1.0, "warm": True},
    "seq_kd": {"loss_type": "forward_kl", "alpha": 1.0, "seq_kd": True},
}
MAIN = ("CE only", "forward KL", "on-policy reverse KL (warm start)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[15, 8])
    parser.add_argument("--methods", nargs="+", default=None, help="default: all at the first depth, MAIN after")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "real_model"), help="results stem (.json, .md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import real_models
    from benchmarks.machine import machine
    from hf_kd.cli.real_demo import FAST, RealSettings, held_out_metrics
    from hf_kd.data import DistillationCollator
    from hf_kd.models.pruning import drop_one_divergence, evenly_spaced, most_important, prune_layers

    hf_logging.set_verbosity_error()
    teacher_dir = str(real_models.asset_dir(real_models.MODEL))
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    s = FAST if args.quick else RealSettings(steps=args.steps)
    data = _data(tokenizer, s)
    windows = DistillationCollator()([data["train"][i] for i in range(s.importance_windows)])
    importance = drop_one_divergence(teacher, windows["input_ids"], windows["attention_mask"])

    layer_choice = []  # the measurement behind the choice: held-out KL of each candidate before training
    for depth in args.depths:
        candidates = {
            "most important (drop-one KL)": most_important(importance, depth),
            "evenly spaced": evenly_spaced(len(importance), depth),
            "first and last": [*range(depth - 1), len(importance) - 1],
        }
        for how, keep in candidates.items():
            metrics = held_out_metrics(prune_layers(teacher, keep).eval(), data["test"], teacher)
            layer_choice.append({"depth": depth, "choice": how, "layers": keep, **metrics})
            print(f"depth {depth} {how:<30} KL {metrics['kl']:.3f} top-1 {metrics['top1']:.3f}", flush=True)

    rows = [{"depth": 30, "method": "teacher", **held_out_metrics(teacher, data["test"], teacher)}]
    rows[0]["sample_teacher_nll"] = _sample_teacher_nll(teacher, teacher, data["prompts"], s)
    for index, depth in enumerate(args.depths):
        keep = most_important(importance, depth)
        start = prune_layers(teacher, keep).eval()
        rows.append({"depth": depth, "method": "pruned (before)", **held_out_metrics(start, data["test"], teacher)})
        rows[-1]["sample_teacher_nll"] = _sample_teacher_nll(start, teacher, data["prompts"], s)
        methods = args.methods or (list(METHODS) if index == 0 else list(MAIN))
        for method in methods:
            for seed in args.seeds:
                row = _run(method, depth, keep, seed, teacher, tokenizer, data, s)
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"machine": machine(), "threads": args.threads, "settings": vars(s), "seeds": args.seeds}
    result.update(layer_importance=importance, layer_choice=layer_choice, rows=rows)
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    Path(args.out).with_suffix(".md").write_text(report(result))
    print(report(result))
    return 0


def _data(tokenizer, s) -> dict:
    import datasets

    from hf_kd.cli.real_text import reference_windows
    from hf_kd.data import tokenize_dataset
    from hf_kd.recipe.schema import DataSection

    datasets.disable_progress_bars()
    train, held_out = reference_windows(tokenizer, s.prompt_tokens, s.completion_tokens)
    spec = DataSection(dataset="", format="prompt_completion", add_eos=False)
    out = {}
    for name, rows in (("train", train), ("test", held_out[1::2][: s.eval_windows])):
        out[name] = tokenize_dataset(datasets.Dataset.from_list(rows), tokenizer, spec, desc=name)
    prompts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in held_out[0::2][:16]]
    out["prompts"] = [p[: s.prompt_tokens] for p in prompts if len(p) >= s.prompt_tokens][: 4 if s.steps < 5 else 16]
    return out


def _run(method, depth, keep, seed, teacher, tokenizer, data, s) -> dict:
    from hf_kd.cli.demo import _args
    from hf_kd.cli.real_demo import held_out_metrics
    from hf_kd.models.pruning import prune_layers
    from hf_kd.training.trainer import DistillationTrainer

    settings = dict(METHODS[method])
    warm = settings.pop("warm", False)
    if settings.get("lmbda") or settings.get("seq_kd"):
        settings.update(max_new_tokens=s.completion_tokens, generation_kwargs={"eos_token_id": []})
    if warm:
        settings["lmbda_warmup_steps"] = max(1, s.steps // 2)
    torch.manual_seed(seed)
    student = prune_layers(teacher, keep)
    with tempfile.TemporaryDirectory() as out:
        args = _args(out, s, s.steps, seed, **settings)
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=data["train"], processing_class=tokenizer
        )
        started, cpu = time.perf_counter(), time.process_time()
        trainer.train()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    shares = [r["generation_time_share"] for r in trainer.state.log_history if "generation_time_share" in r]
    row = {"depth": depth, "method": method, "seed": seed, **held_out_metrics(student, data["test"], teacher)}
    row.update(
        sample_teacher_nll=_sample_teacher_nll(student, teacher, data["prompts"], s, seed),
        train_seconds=round(seconds, 1),
        train_cpu_seconds=round(cpu, 1),
        generation_share=round(statistics.fmean(shares), 3) if shares else None,
    )
    return row


@torch.no_grad()
def _sample_teacher_nll(model, teacher, prompts, s, seed: int = 0) -> float:
    """The teacher's NLL per token of ``model``'s own completions of ``prompts`` (T = 1, seeded, no EOS stop)."""
    torch.manual_seed(1000 + seed)
    model.eval()
    batch = torch.tensor(prompts)
    out = model.generate(
        batch,
        attention_mask=torch.ones_like(batch),
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=s.completion_tokens,
        eos_token_id=[],
        pad_token_id=0,
    )
    logits = teacher(out, use_cache=False).logits[:, batch.shape[1] - 1 : -1].double()
    completions = out[:, batch.shape[1] :]
    return -torch.log_softmax(logits, -1).gather(-1, completions.unsqueeze(-1)).mean().item()


def report(result: dict) -> str:
    lines = [
        "# Distilling a real model: SmolLM2-135M-Instruct into students pruned from it",
        "",
        f"Machine: {result['machine']} (shared), {result['threads']} threads, torch {torch.__version__}. "
        f"{result['settings']['steps']} steps x batch {result['settings']['batch_size']} x "
        f"{result['settings']['prompt_tokens']}+{result['settings']['completion_tokens']} tokens, AdamW lr "
        f"{result['settings']['learning_rate']}, cosine; seeds {result['seeds']}. Held-out: "
        f"{result['settings']['eval_windows']} windows of topics never trained on. Written by benchmarks/real_model.py.",
        "",
        "## Layer choice",
        "",
        "| depth | layers kept | held-out KL before training | top-1 agreement |",
        "|---|---|---|---|",
    ]
    for row in result["layer_choice"]:
        lines.append(f"| {row['depth']} | {row['choice']}: {row['layers']} | {row['kl']:.3f} | {row['top1']:.3f} |")
    lines += [
        "",
        "## Objectives",
        "",
        "| depth | method | NLL | KL(teacher ‖ student) | top-1 agreement | teacher NLL of own samples | train s "
        "(CPU s) | generation share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list] = {}
    for row in result["rows"]:
        groups.setdefault((row["depth"], row["method"]), []).append(row)
    for (depth, method), rows in groups.items():

        def cell(key, digits=3):
            values = [r[key] for r in rows if r.get(key) is not None]
            if not values:
                return ""
            mean = statistics.fmean(values)
            spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
            return f"{mean:.{digits}f}{spread}"

        seconds = f"{cell('train_seconds', 0)} ({cell('train_cpu_seconds', 0)})" if "train_seconds" in rows[0] else ""
        lines.append(
            f"| {depth} | {method} | {cell('nll')} | {cell('kl')} | {cell('top1')} | {cell('sample_teacher_nll')} | "
            f"{seconds} | {cell('generation_share', 2)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
