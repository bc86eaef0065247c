"""The founding paper's claims, tested on real data in its own setting (image classification).

hf_kd started from Kim et al. (2021), "Comparing Kullback-Leibler Divergence and Mean Squared Error Loss in Knowledge
Distillation". Its claims, each tested here with hf_kd's DistillationTrainer on classifier students:

1. as the temperature T grows, KL-based KD approaches logit matching (a), and closer logit matching goes with better
   students (b);
2. logit MSE outperforms KL;
3. sequential distillation (a student becomes the next teacher) can help;
4. KD mitigates label noise (a), particularly KL with a small T (b).

    python benchmarks/seed_paper.py           # 5 seeds, 110 students: 8 min (475 s wall, 473 s CPU) on 2 cores
    python benchmarks/seed_paper.py --fast    # 1 seed, 15 steps: ~8 s; prints (--out DIR to keep it)
    python benchmarks/seed_paper.py --seeds 3 --student-steps 800
    python benchmarks/seed_paper.py --report benchmarks/results/seed_paper.json   # tables again, no training

Writes benchmarks/results/seed_paper.md (a "README table" of the claims first, then every student) and
seed_paper.json (every run). One torch thread; the runs are deterministic (two full runs gave identical numbers).

Data: scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes, shipped with the package), split once
(seed 0, stratified) 60/20/20 into train / validation / test. Models: ViTs built from configs (4 patches of 4x4
pixels); a teacher (h=64, 3 layers, 103k parameters) trained with CE, and students (h=16, 1 layer, 2.8k parameters)
that all get the same budget: steps, batch, AdamW learning rate and cosine schedule. A seed sets a student's
initialization and its batch order, so within a seed every objective starts from the same weights and sees the same
batches: objectives are compared paired, by the per-seed difference of test accuracy (mean, sample std, and a
two-sided paired t-test over the seeds).

Students per seed: CE only; forward KL at T in {1, 2, 4, 8, 20}, with alpha 1 and with alpha 0.5 (half CE); logit
MSE (hf_kd's "mse": the mean over classes of the squared raw-logit difference, no T); sequential distillation, as in
teacher-assistant KD: an assistant (h=32, 1 layer) distilled from the teacher by MSE teaches, by MSE, a student with
the same initialization and batches as the seed's direct MSE student; and symmetric label noise (20% and 40% of the
training labels flipped, each to one of the other 9 classes uniformly): a teacher trained with CE on the noisy labels,
then CE, KL at T = 1 and T = 20, and MSE students on the same noisy labels, tested on clean ones. Each condition's
teacher is trained once (seed 0), saved with save_pretrained and reloaded with from_pretrained.

The logit distance of a student is the mean squared difference between its test-set logits and its teacher's after
removing each example's mean logit: softmax (hence KL) ignores that shift, and T^2 * KL tends to half this distance
as T grows, so it is the "logit matching" claim 1 is about (the raw distance is in the JSON too).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from benchmarks.machine import machine  # after the path insert

RESULTS = Path(__file__).resolve().parent / "results"
TEACHER = {"hidden_size": 64, "num_hidden_layers": 3}  # 103k parameters
STUDENT = {"hidden_size": 16, "num_hidden_layers": 1}  # 2.8k parameters
ASSISTANT = {"hidden_size": 32, "num_hidden_layers": 1}  # sequential KD's middle model
SIGNIFICANT = 0.05  # two-sided p of a paired t-test over seeds, for a "yes" or a "no"


@dataclass(frozen=True)
class Settings:
    seeds: int = 5
    teacher_steps: int = 600  # 71 epochs of the 1,078 training images: it fits them
    student_steps: int = 500  # 59 epochs; CE students still gain a little (800: +1 pp)
    batch_size: int = 128
    learning_rate: float = 3e-3
    temperatures: tuple[float, ...] = (1, 2, 4, 8, 20)
    mixed_alpha: float | None = 0.5  # each T again with this weight of KL, the rest CE
    noise: tuple[float, ...] = (0.2, 0.4)
    noisy_temperatures: tuple[float, ...] = (1, 20)  # small and large T


FAST = Settings(
    seeds=1,
    teacher_steps=100,
    student_steps=15,
    temperatures=(1, 20),
    mixed_alpha=None,
    noise=(0.4,),
)
SEQUENTIAL = "MSE"  # the chained objective: the one the paper recommends


def size(config: dict) -> str:
    layers = config["num_hidden_layers"]
    return f"h={config['hidden_size']}, {layers} layer{'s' * (layers > 1)}"


ASSISTED = (f"assistant ({size(ASSISTANT)}), MSE", "MSE, taught by the assistant")


def kl(t: float, alpha: float = 1.0) -> tuple[str, dict]:
    name = f"KL T={t:g}" + (f", alpha {alpha:g}" if alpha != 1 else "")
    return name, {"loss_type": "forward_kl", "temperature": float(t), "alpha": alpha}


def methods(s: Settings, noisy: bool) -> dict[str, dict]:
    """Student name -> DistillationConfig settings (alpha 0 leaves only the CE)."""
    temps = s.noisy_temperatures if noisy else s.temperatures
    found = dict([("CE", {"alpha": 0.0}), *(kl(t) for t in temps)])
    if s.mixed_alpha is not None and not noisy:
        found.update(kl(t, s.mixed_alpha) for t in temps)
    found["MSE"] = {"loss_type": "mse"}
    return found


# ---- data ---------------------------------------------------------------------------


def digits_split(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The digits as ``pixel_values [N, 1, 8, 8]`` in [-1, 1] and labels ``[N]``, split
    60/20/20 into train / valid / test, stratified by class; the same for a seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)  # pixel intensities 0..16
    index = list(range(len(labels)))
    train, rest = train_test_split(index, train_size=0.6, random_state=seed, stratify=labels)
    valid, test = train_test_split(rest, train_size=0.5, random_state=seed, stratify=labels[rest])
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 8.0 - 1.0
    y = torch.tensor(labels)
    parts = {"train": train, "valid": valid, "test": test}
    return {name: (x[ids], y[ids]) for name, ids in parts.items()}


def symmetric_noise(labels: torch.Tensor, fraction: float, classes: int, seed: int = 0):
    """A copy of ``labels [N]`` with exactly round(fraction * N) of them, chosen at
    random, moved to another class drawn uniformly from the other ``classes - 1``."""
    g = torch.Generator().manual_seed(seed)
    flip = torch.randperm(len(labels), generator=g)[: round(fraction * len(labels))]
    shift = torch.randint(1, classes, (len(flip),), generator=g)  # never 0: a new class
    noisy = labels.clone()
    noisy[flip] = (labels[flip] + shift) % classes
    return noisy


def rows(x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """A map-style dataset the Trainer's default collator stacks into batches."""
    return [{"pixel_values": pixels, "labels": int(label)} for pixels, label in zip(x, y)]


# ---- models, training, measures -----------------------------------------------------


def vit(config: dict, seed: int):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)  # the initialization
    hidden = config["hidden_size"]
    return ViTForImageClassification(
        ViTConfig(
            image_size=8,
            patch_size=4,
            num_channels=1,
            num_attention_heads=4,
            intermediate_size=2 * hidden,
            num_labels=10,
            **config,
        )
    )


def train(model, data, s: Settings, steps: int, seed: int, tmp: str, teacher=None, **kd):
    """Train ``model`` in place (CE with a plain Trainer, or hf_kd from ``teacher``) and
    return the seconds it took."""
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    from hf_kd import DistillationConfig, DistillationTrainer

    started = time.time()
    args = DistillationConfig(
        output_dir=f"{tmp}/run",
        max_steps=steps,
        per_device_train_batch_size=s.batch_size,
        learning_rate=s.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.0,
        seed=seed,
        use_cpu=True,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        logging_steps=steps,
        loss_chunk_size=0,
        **kd,  # 0: a classifier's loss uses full logits anyway
    )
    if teacher is None:
        trainer = Trainer(model=model, args=args, train_dataset=data)
    else:
        trainer = DistillationTrainer(model=model, teacher_model=teacher, args=args, train_dataset=data)
    trainer.remove_callback(PrinterCallback)  # no log dicts on stdout
    trainer.train()
    return time.time() - started


@torch.no_grad()
def logits_of(model, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(pixel_values=x).logits


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(-1) == y).double().mean().item()


def logit_distance(student: torch.Tensor, teacher: torch.Tensor, centered=True) -> float:
    """Mean over examples and classes of the squared logit difference, ``[N, C]`` each.
    ``centered`` removes each example's mean difference first: a shift softmax ignores."""
    diff = student.double() - teacher.double()
    if centered:
        diff = diff - diff.mean(-1, keepdim=True)
    return diff.pow(2).mean().item()


# ---- the runs -----------------------------------------------------------------------


def run(s: Settings, out_dir: Path | None, command: str = "") -> dict:
    """Train every teacher and student; return (and, with ``out_dir``, write
    ``seed_paper.json`` and ``seed_paper.md`` into it) the results."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards"
    clock, cpu = time.time(), time.process_time()
    split = digits_split()
    x, y = split["train"]
    results = {"teachers": {}, "students": {}}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for fraction in (0.0, *s.noise):
                condition = f"{fraction:.0%} noise" if fraction else "clean"
                noisy = symmetric_noise(y, fraction, classes=10)
                teacher, about = make_teacher(x, noisy, y, split, s, tmp)
                results["teachers"][condition] = about
                data = rows(x, noisy)
                runs = distill(teacher, data, split, s, tmp, condition)
                results["students"][condition] = runs
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    results.update(
        settings=asdict(s),
        teacher=TEACHER,
        student=STUDENT,
        assistant=ASSISTANT,
        split={k: len(v[1]) for k, v in split.items()},
        machine=machine(),
        threads=torch.get_num_threads(),
        command=command,
        seconds=round(time.time() - clock, 1),
        cpu_seconds=round(time.process_time() - cpu, 1),
    )
    return report(results, out_dir)


def report(results: dict, out_dir: Path | None) -> dict:
    """Judge the claims from the runs; with ``out_dir``, write the JSON and markdown."""
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in results["settings"].items()}
    results["claims"] = claims(results, Settings(**settings))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(results, indent=2)
        (out_dir / "seed_paper.json").write_text(text + "\n", encoding="utf-8")
        (out_dir / "seed_paper.md").write_text(markdown(results) + "\n", encoding="utf-8")
    return results


def make_teacher(x, labels, clean, split: dict, s: Settings, tmp: str):
    """A teacher trained with CE on ``labels``: the model and its report."""
    teacher = vit(TEACHER, 0)
    train(teacher, rows(x, labels), s, s.teacher_steps, 0, tmp)
    # saved and reloaded as a user's would be; passed as a model, not a path (hf_kd
    # loads classifier paths with AutoModelForSequenceClassification, which has no ViT)
    teacher.save_pretrained(f"{tmp}/teacher")
    teacher = type(teacher).from_pretrained(f"{tmp}/teacher")
    flipped, memorized = labels != clean, None
    if flipped.any():  # the share of the flipped training labels the teacher learned
        memorized = accuracy(logits_of(teacher, x[flipped]), labels[flipped])
    return teacher, {
        "test_acc": accuracy(logits_of(teacher, split["test"][0]), split["test"][1]),
        "valid_acc": accuracy(logits_of(teacher, split["valid"][0]), split["valid"][1]),
        "memorized": memorized,
        "params": sum(p.numel() for p in teacher.parameters()),
    }


def distill(teacher, data, split: dict, s: Settings, tmp: str, condition: str) -> dict:
    """Every student of every seed: ``{name: [one score per seed]}``."""
    noisy = condition != "clean"
    teacher_test = logits_of(teacher, split["test"][0])
    runs: dict[str, list[dict]] = {}

    def student(name: str, config: dict, init: int, seed: int, by, kd: dict):
        model = vit(config, init)
        seconds = train(model, data, s, s.student_steps, seed, tmp, by, **kd)
        found = score(model, teacher_test, split) | {"seed": seed, "seconds": seconds}
        runs.setdefault(name, []).append(found)
        print(
            f"{condition}, seed {seed}, {name}: test accuracy {found['test_acc']:.3f}, {seconds:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        return model

    for seed in range(s.seeds):
        for name, kd in methods(s, noisy).items():  # one init and batch order per seed
            student(name, STUDENT, 1000 + seed, seed, teacher, kd)
        if not noisy:  # sequential: the teacher -> an assistant -> the same student
            kd = methods(s, noisy)[SEQUENTIAL]
            middle = student(ASSISTED[0], ASSISTANT, 2000 + seed, seed, teacher, kd)
            student(ASSISTED[1], STUDENT, 1000 + seed, seed, middle, kd)
    return runs


def score(student, teacher_test: torch.Tensor, split: dict) -> dict:
    """Test and validation accuracy, and the logit distance to the (first) teacher."""
    test = logits_of(student, split["test"][0])
    return {
        "test_acc": accuracy(test, split["test"][1]),
        "valid_acc": accuracy(logits_of(student, split["valid"][0]), split["valid"][1]),
        "distance": logit_distance(test, teacher_test),
        "raw_distance": logit_distance(test, teacher_test, centered=False),
    }


# ---- statistics and verdicts --------------------------------------------------------


def paired(a: list[float], b: list[float]) -> dict:
    """Per-seed differences a - b: mean, sample std, two-sided p of a paired t-test."""
    from scipy import stats

    diffs = [x - y for x, y in zip(a, b)]
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    p = float(stats.ttest_rel(a, b).pvalue) if sd > 0 else None  # None: no spread
    return {"mean": statistics.fmean(diffs), "sd": sd, "n": len(diffs), "p": p}


def sign(stat: dict) -> int:
    """+1 / -1: the difference is positive / negative at p < SIGNIFICANT; else 0."""
    if stat["p"] is None or stat["p"] >= SIGNIFICANT:
        return 0
    return 1 if stat["mean"] > 0 else -1


def verdict(stats: list[dict]) -> str:
    """Whether comparisons the paper expects to be positive bear it out."""
    signs = [sign(stat) for stat in stats]
    if not signs:
        return "not resolved"
    if all(x == 1 for x in signs):
        return "yes"
    if 1 in signs:
        return "mixed" if -1 in signs else "partly"
    if all(x == -1 for x in signs):
        return "no, the opposite"
    return "no" if -1 in signs else "not resolved"


def correlation(xs: list[float], ys: list[float]) -> dict | None:
    from scipy import stats

    if len(xs) < 3:
        return None
    r, p = stats.pearsonr(xs, ys)
    return {"r": float(r), "p": float(p), "n": len(xs)}


def values(runs: list[dict], key: str = "test_acc") -> list[float]:
    return [r[key] for r in runs]


def _diff(stat: dict, scale: float = 100.0) -> str:
    """A paired difference: of accuracies in points (scale 100), or of distances."""
    unit = " pp" if scale == 100 else ""
    p = "n/a" if stat["p"] is None else f"{stat['p']:.2g}"
    return f"{stat['mean'] * scale:+.2f} ± {stat['sd'] * scale:.2f}{unit} (p {p})"


def claims(results: dict, s: Settings) -> list[dict]:
    """The paper's claims against these runs: each a verdict from paired comparisons."""
    clean = results["students"]["clean"]
    noisy = {c: r for c, r in results["students"].items() if c != "clean"}
    low, high = kl(min(s.temperatures))[0], kl(max(s.temperatures))[0]
    alpha_1 = [n for n in clean if n == "MSE" or n.startswith("KL") and "alpha" not in n]
    dist = {n: statistics.fmean(values(clean[n], "distance")) for n in alpha_1}
    trend = ", ".join(f"{n.removeprefix('KL ')} {d:.2f}" for n, d in dist.items())
    closer = paired(values(clean[low], "distance"), values(clean[high], "distance"))
    points = [r for n in alpha_1 for r in clean[n]]
    corr = correlation(values(points, "distance"), values(points))
    r_text = "n/a" if corr is None else f"r = {corr['r']:+.2f} (p {corr['p']:.2g})"
    mse = {n: paired(values(clean["MSE"]), values(clean[n])) for n in alpha_1 if n != "MSE"}
    seq = paired(values(clean[ASSISTED[1]]), values(clean[SEQUENTIAL]))
    small, large = kl(min(s.noisy_temperatures))[0], kl(max(s.noisy_temperatures))[0]
    vs_ce = {c: paired(values(r[small]), values(r["CE"])) for c, r in noisy.items()}
    beside = " / ".join(  # the students against their noisy teachers
        f"{100 * statistics.fmean(values(r[small])):.1f}% vs {100 * results['teachers'][c]['test_acc']:.1f}%"
        for c, r in noisy.items()
    )
    vs_large = {  # small T minus large T, and minus MSE, at each noise level
        f"minus {other}": {c: paired(values(r[small]), values(r[other])) for c, r in noisy.items()}
        for other in (large, "MSE")
    }

    def listed(stats: dict) -> str:
        return "; ".join(f"{name}: {_diff(stat)}" for name, stat in stats.items())

    def row(claim: str, paper: str, here: str, stats: dict) -> dict:
        agrees = verdict(list(stats.values()))
        return {
            "claim": claim,
            "paper": paper,
            "here": here,
            "agrees": agrees,
            "stats": stats,
        }

    # as a paired() result whose "mean" is -r: the paper expects a negative r
    towards = {"distance vs accuracy": {**corr, "mean": -corr["r"]}} if corr else {}
    return [
        row(
            "1a",
            "as T grows, KL-based KD approaches logit matching",
            f"logit distance to the teacher: {trend}; {low} minus {high}: {_diff(closer, 1)}",
            {f"{low} - {high}": closer},
        ),
        row(
            "1b",
            "closer logit matching goes with a better student",
            f"distance vs test accuracy, {len(points)} clean alpha-1 KD runs: {r_text}",
            towards,
        ),
        row("2", "logit MSE outperforms KL", f"MSE minus {listed(mse)}", mse),
        row(
            "3",
            "sequential distillation can help",
            f"MSE student taught by an MSE-distilled assistant ({size(ASSISTANT)}), minus "
            f"taught by the teacher: {_diff(seq)}",
            {"sequential - direct": seq},
        ),
        row(
            "4a",
            "KD mitigates label noise",
            f"{small} minus CE: {listed(vs_ce)} ({small} students vs their teachers: {beside})",
            vs_ce,
        ),
        row(
            "4b",
            "particularly KL with a small T",
            ". ".join(f"{small} {o}: {listed(d)}" for o, d in vs_large.items()),
            {f"{o}, {c}": d for o, ds in vs_large.items() for c, d in ds.items()},
        ),
    ]


# ---- the report ---------------------------------------------------------------------


def _acc(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.fmean(xs):.2f} ± {100 * sd:.2f}"


def markdown(r: dict) -> str:
    s, n = r["settings"], r["settings"]["seeds"]
    sds = [d["sd"] for c in r["claims"] if c["claim"] in ("2", "3", "4a", "4b") for d in c["stats"].values()]
    lines = [
        "## README table",
        "",
        "| claim (Kim et al. 2021) | paper | here | agrees? |",
        "|---|---|---|---|",
    ]
    lines += [f"| {c['claim']} | {c['paper']} | {c['here']} | {c['agrees']} |" for c in r["claims"]]
    lines += [
        "",
        (
            f"Spread: {n} seed{'s' * (n > 1)}; accuracy differences are paired within a seed (mean ± sample std "
            f"over seeds; that std is {100 * min(sds):.1f}-{100 * max(sds):.1f} pp here). A 'yes' or 'no' needs "
            f"p < {SIGNIFICANT} in a two-sided paired t-test (df {n - 1}), comparison by comparison, with no "
            "correction for making many of them; anything else is 'not resolved'. 1b pools runs that share "
            "seeds, so its p is optimistic."
        ),
        "",
        "## Setup",
        "",
        (
            f"Digits (scikit-learn, 8x8, 10 classes), split train/valid/test {r['split']['train']}/"
            f"{r['split']['valid']}/{r['split']['test']} (seed 0, stratified). ViTs, 4x4 patches: teacher "
            f"{size(r['teacher'])} ({r['teachers']['clean']['params']:,} parameters, CE, {s['teacher_steps']} "
            f"steps); students {size(r['student'])}, each {s['student_steps']} steps x batch {s['batch_size']}, "
            f"AdamW lr {s['learning_rate']:g}, cosine; seeds 0-{n - 1}, each fixing the students' init and batch "
            f"order. Sequential: an assistant ({size(r['assistant'])}) distilled by MSE teaches a student by MSE. "
            "Logit distance: mean squared difference of a student's test logits from its first teacher's, each "
            "example's mean removed."
        ),
        "",
        (
            f"Machine: {r['machine']}, {r['threads']} torch thread(s). Command: `{r['command']}`. "
            f"Wall {r['seconds']:.0f} s, CPU {r['cpu_seconds']:.0f} s."
        ),
    ]
    for condition, runs in r["students"].items():
        t = r["teachers"][condition]
        where = "clean" if condition == "clean" else f"{condition} on the"
        learned = t["memorized"] and f"; it predicts {100 * t['memorized']:.0f}% of the flipped labels"
        lines += [
            "",
            f"## Students, {where} training labels",
            "",
            f"Teacher: test accuracy {100 * t['test_acc']:.2f}% (clean test labels){learned or ''}.",
            "",
            "| student | test acc % | minus CE, paired | valid acc % | logit distance | s/run |",
            "|---|---|---|---|---|---|",
        ]
        for name, rs in runs.items():
            vs = "-" if name == "CE" else _diff(paired(values(rs), values(runs["CE"])))
            distance = statistics.fmean(values(rs, "distance"))
            seconds = statistics.fmean(values(rs, "seconds"))
            lines.append(
                f"| {name} | {_acc(values(rs))} | {vs} | {_acc(values(rs, 'valid_acc'))} "
                f"| {distance:.3f} | {seconds:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="1 seed, few steps")
    parser.add_argument("--seeds", type=int, help="student seeds (default 5)")
    parser.add_argument("--student-steps", type=int, help="per student (default 500)")
    parser.add_argument("--out", type=Path, help="default: results/ (--fast: nowhere)")
    parser.add_argument(
        "--report",
        type=Path,
        help="a seed_paper.json: no training, only its claims and tables written again (after editing them)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: a second thread only spins on a shared CPU
    s = FAST if args.fast else Settings()
    if args.seeds:
        s = replace(s, seeds=args.seeds)
    if args.student_steps:
        s = replace(s, student_steps=args.student_steps)
    out = args.out or (None if args.fast else RESULTS)
    if args.report:
        results = json.loads(args.report.read_text(encoding="utf-8"))
        print(markdown(report(results, out)))
        return
    command = " ".join(["python benchmarks/seed_paper.py", *sys.argv[1:]])
    print(markdown(run(s, out, command)))


if __name__ == "__main__":
    main()
