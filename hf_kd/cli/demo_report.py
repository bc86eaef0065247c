"""The demo's report: the results table and the picture of the validation curves."""

from __future__ import annotations

import math
import textwrap

from hf_kd.cli.synthetic import IMPOSSIBLE_NATS, Settings


def format_table(rows: list[dict], entropy: float, s: Settings) -> str:
    header = (
        f"{'model':<31}{'params':>7}{'test ppl':>10}{'accuracy':>10}{'excess nats':>13}{'best valid ppl':>16}"
        f"{'sample NLL':>12}{'sample KL':>11}"
    )
    title = (
        f"held-out test set: {s.test_seqs} sequences x {s.seq_len - 2} target tokens; students: {s.student_seqs} "
        f"sequences, {s.student_steps} steps of {s.batch_size} sequences each"
    )
    lines = [title, header]
    for row in rows:
        params = "-" if row["params"] is None else f"{row['params'] / 1e3:.0f}k"
        valid = "-" if row["best_valid_ppl"] is None else f"{row['best_valid_ppl']:.4f}"
        lines.append(
            f"{row['model']:<31}{params:>7}{row['ppl']:>10.4f}{row['accuracy']:>10.4f}"
            f"{math.log(row['ppl']) - entropy:>13.4f}{valid:>16}{row['sample_nll']:>12.4f}"
            f"{row['sample_kl']:>11.4f}"
        )
    impossible = sum(row["sample"]["impossible"] for row in rows[1:])
    notes = [
        (
            f"sample NLL: the true process's NLL per token of each model's own samples (the test prompts completed at "
            f"temperature 1); sample KL: that minus the model's own NLL of them, an estimate of KL(model || process) per "
            f"token (0 for the process; a low NLL alone can also mean a sharper, less diverse sampler). A token the "
            f"process cannot emit is charged {IMPOSSIBLE_NATS:.2f} nats: {impossible} of "
            f"{sum(row['sample']['tokens'] for row in rows[1:])} sampled tokens here."
        ),
    ]
    plain = [row["train_seconds"] for row in rows if row["train_seconds"] and row["generation_time_share"] is None]
    for row in rows:
        if row["generation_time_share"] is not None:
            notes.append(
                f"{row['model']}: the same steps, prompts and learning rate, but each step first samples its "
                f"{s.batch_size} completions ({s.seq_len - 2} tokens each) from the student: "
                f"{row['train_seconds']:.0f} s to train ({100 * row['generation_time_share']:.0f}% of it "
                f"generating) vs {min(plain):.0f}-{max(plain):.0f} s for the off-policy students."
            )
    return "\n".join(lines + [textwrap.fill(note, width=len(header)) for note in notes])


def y_range(curves: dict, floor: float, teacher: float) -> tuple[float, float]:
    """The perplexity axis of the picture: from just below the floor (or the lowest point) to a quarter of the range
    above the worst final value of a student (or the teacher). That is where the objectives differ; the first
    evaluations, near the vocabulary size, lie above it (a linear axis up to them squashed the students into a sliver)."""
    finals = [points[-1][1] for points in curves.values() if points]
    bottom = min([floor, teacher, *(ppl for points in curves.values() for _, ppl in points)])
    top = max([teacher, *finals])
    span = max(top - bottom, 0.01 * top)  # flat curves still get a visible band
    return bottom - 0.05 * span, top + 0.25 * span


NO_MATPLOTLIB = "plot: matplotlib is not installed, no PNG written (pip install matplotlib)"


def pyplot():
    """``matplotlib.pyplot`` drawing to files (the Agg backend, no display), or ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(curves: dict, floor: float, teacher: float, path: str) -> str:
    plt = pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    low, high = y_range(curves, floor, teacher)
    for value, text, style in (
        (floor, "true process (floor)", dict(color="k", linestyle="--")),
        (teacher, "teacher", dict(color="gray", linestyle=":")),
    ):
        ax.axhline(value, label=text, **style)
        # the line's name on it, at the left edge (the students reach these levels last, at the right)
        ax.text(
            0.01,
            value,
            f"{text} {value:.3f}",
            transform=ax.get_yaxis_transform(),
            ha="left",
            va="bottom",
            fontsize=8,
            color=style["color"],
        )
    ax.set_ylim(low, high)
    highest = max((ppl for points in curves.values() for _, ppl in points), default=high)
    cut = f"\n(the first evaluations lie above, up to {highest:.1f})" if highest > high else ""
    ax.set_xlabel("student step")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"hf-kd demo: equal-budget students{cut}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: the curves stay visible
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"
