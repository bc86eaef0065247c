"""`hf-kd check`: what can be known about a recipe before renting GPUs.

Everything is read from configs and tokenizers (local paths, the Hub cache, or the Hub when online); no weights are
downloaded. Whatever cannot be reached is reported as not checked, never as a failure. Without a network (one
2-second connection attempt to the Hub decides) only local files and the cache are read, as with HF_HUB_OFFLINE=1.
The refusals `hf-kd train` makes before loading anything are made here too, on this machine: hardware settings it
cannot run (bf16 without a GPU) and an output directory train would not write to. The last line is the verdict: whether
`hf-kd train` would refuse the recipe, and what was not checked.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from hf_kd.cli.check_memory import Found, _count, _size, count_parameters, estimate_memory, meta_model
from hf_kd.data import (
    DataError,
    check_tokenizers_agree,
    count_targets,
    encode_example,
    is_empty_tokenizer,
    load_raw_dataset,
    tokenize_dataset,
)
from hf_kd.models.adapters import SELF_TEACHER
from hf_kd.recipe.recipe import Recipe, loads_teacher_model
from hf_kd.teachers.cross_tokenizer.vocabulary import same_ids


@dataclass
class Report:
    """Lines to print; ``failed`` makes `hf-kd check` exit 1."""

    lines: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what each FAIL line is about: "vocab", "tokenizers", ...

    @property
    def failed(self) -> bool:
        return bool(self.problems)

    def add(self, line: str) -> None:
        self.lines.append(line)

    def fail(self, line: str) -> None:
        self.lines.append(f"FAIL {line}")
        self.problems.append(line.split(":", 1)[0])

    def verdict(self) -> str:
        """One line, printed last."""
        unchecked = f"; {len(self.unchecked)} thing(s) not checked (listed above)" if self.unchecked else ""
        if self.problems:
            return (
                f"verdict: FAIL: hf-kd train would refuse this recipe ({', '.join(dict.fromkeys(self.problems))})"
                f"{unchecked}"
            )
        return f"verdict: ok, no problem found{unchecked}"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


@functools.cache
def hub_reachable(timeout: float = 2.0) -> bool:
    """One TCP connection to the Hub (HF_ENDPOINT, through the HTTPS proxy if one is set) within ``timeout`` seconds,
    name lookup included. Without it every Hub request would spend minutes in retries before failing."""
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    target = endpoint
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    if proxy and not urllib.request.proxy_bypass(endpoint.hostname or ""):
        target = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    address = (target.hostname or "", target.port or (443 if target.scheme == "https" else 80))
    done: list[bool] = []

    def connect():
        try:
            socket.create_connection(address, timeout=timeout).close()
            done.append(True)
        except Exception:  # noqa: BLE001 - OSError, or a host name the resolver refuses: no Hub either way
            done.append(False)

    worker = threading.Thread(target=connect, daemon=True)  # a thread: a DNS lookup ignores the socket timeout
    worker.start()
    worker.join(timeout)
    return bool(done and done[0])


def _no_hub_reason() -> str | None:
    """Why the Hub cannot be asked (HF_HUB_OFFLINE, or no network), or None."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    if not hub_reachable():
        host = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
        return f"{host} is unreachable (no network? HF_HUB_OFFLINE=1 skips this 2-second test)"
    return None


def _fetch(loader, name: str):
    """``(object, None)`` from the local cache first, then the Hub if allowed; ``(None, why)`` if unreachable."""
    try:
        return loader(name, local_files_only=True), None
    except Exception as err:  # noqa: BLE001 - any failure here means "not available locally"
        local_error = err
    if os.path.isdir(os.path.expanduser(name)):
        return None, str(local_error).strip().splitlines()[0]
    no_hub = _no_hub_reason()
    if no_hub:
        return None, f"not in the local Hugging Face cache and {no_hub}"
    try:
        return loader(name), None
    except Exception as err:  # noqa: BLE001 - network down, gated repo, typo: say so, do not crash
        return None, str(err).strip().splitlines()[0][:200]


def check_recipe(recipe: Recipe) -> Report:
    """Validate what can be validated without weights; see the module docstring."""
    from transformers import AutoConfig, AutoTokenizer

    report = Report()
    args = recipe.training_args(check_hardware=False)
    report.add(f"recipe {recipe.path}: valid")
    _check_refusals(recipe, args, report)

    found: dict[str, Found] = {}
    for role, section in (("teacher", recipe.teacher), ("student", recipe.student)):
        if role == "teacher" and section.name_or_path == SELF_TEACHER:
            report.add("teacher self: the student's base model with its adapters disabled (self-distillation)")
            continue
        if role == "teacher" and not loads_teacher_model(section):
            report.add(f"teacher kind {section.kind}: {section.name_or_path} (no model config to inspect)")
            continue
        config, why = _fetch(AutoConfig.from_pretrained, section.name_or_path)
        if config is None:
            report.unchecked.append(f"{role} config ({section.name_or_path}): {why}")
            continue
        if recipe.task == "classification" and role == "student" and "teacher" in found:
            config.num_labels = found["teacher"].config.num_labels  # what hf-kd train gives the student's head
        model = meta_model(config, recipe.task)
        found[role] = Found(config, model, *count_parameters(model, recipe.task))
        rows = "vocab rows" if recipe.task == "causal_lm" else "classes"
        report.add(
            f"{role:8s}{section.name_or_path}: {config.model_type}, {_count(found[role].params)} parameters, "
            f"{found[role].rows} {rows}"
        )
    if recipe.teacher.name_or_path == SELF_TEACHER and "student" in found:
        found["teacher"] = found["student"]

    tokenizers = {}
    for role, section in (("teacher", recipe.teacher), ("student", recipe.student)):
        name = section.tokenizer or section.name_or_path
        if name == SELF_TEACHER or (role == "teacher" and not section.tokenizer and not loads_teacher_model(section)):
            continue
        tokenizer, why = _fetch(AutoTokenizer.from_pretrained, name)
        if tokenizer is None:
            report.unchecked.append(f"{role} tokenizer ({name}): {why}")
        elif is_empty_tokenizer(tokenizer):
            report.fail(
                f"{role} tokenizer ({name}): no tokenizer files, only {len(tokenizer)} special tokens; set "
                f"{role}.tokenizer"
            )
        else:
            tokenizers[role] = tokenizer

    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a sample of a few hundred examples: no bars between the report's lines
    try:
        sample = _data_sample(recipe, report) if "student" in tokenizers else None
        data_lines = Report()  # printed after the vocab line
        if sample is not None:
            _check_data(recipe, args, tokenizers["student"], sample, data_lines)
        agree = None  # whether both tokenizers give the same ids on the sample (None: not compared)
        if len(tokenizers) == 2 and sample:
            agree = _check_tokenizers(recipe, tokenizers["student"], tokenizers["teacher"], sample, data_lines)
    finally:
        if bars:
            datasets.enable_progress_bars()

    shared = None
    cross = len(tokenizers) == 2 and not same_ids(tokenizers["student"], tokenizers["teacher"])
    if recipe.task == "classification" and "teacher" in found:
        shared = found["teacher"].rows  # the student's head is built with the teacher's label set (hf_kd.cli.train)
        labels = ", ".join(str(found["teacher"].config.id2label.get(i, i)) for i in range(shared))
        report.add(f"labels: {shared} classes ({labels}), taken by the student's classification head from the teacher")
    elif "teacher" in found and "student" in found:
        t_rows, s_rows = found["teacher"].rows, found["student"].rows
        shared = min(t_rows, s_rows)
        if t_rows == s_rows:
            report.add(f"vocab: teacher and student both have {t_rows} rows")
        elif "student" not in tokenizers:
            report.unchecked.append(
                f"vocab alignment: rows differ ({t_rows} vs {s_rows}) and the tokenizer is unreachable"
            )
        elif cross:  # different tokenizers: each side keeps its own vocabulary
            shared = s_rows
            report.add(f"vocab: teacher {t_rows} rows, student {s_rows} rows, each over its own tokenizer")
        elif len(tokenizers["student"]) > shared:
            report.fail(
                f"vocab: teacher {t_rows} rows, student {s_rows} rows, tokenizer {len(tokenizers['student'])} "
                "tokens: these models do not share a vocabulary"
            )
        elif agree is False:  # the rows would line up, but not the tokens they stand for
            report.add(
                f"vocab: teacher {t_rows} rows, student {s_rows} rows, tokenizer {len(tokenizers['student'])} "
                "tokens; the tokenizers disagree (below), so the rows do not mean the same tokens"
            )
        else:
            report.add(
                f"vocab: teacher {t_rows} rows, student {s_rows} rows, tokenizer {len(tokenizers['student'])} "
                f"tokens -> distilling over the shared first {shared} rows (the rest is padding)"
            )
    report.lines += data_lines.lines
    report.problems += data_lines.problems

    if shared is not None and "teacher" in found and "student" in found:
        rows = estimate_memory(recipe, args, found["teacher"], found["student"], shared)
        total = sum(b for _, b in rows)
        report.add(
            f"memory per GPU, rough (DDP or one GPU, per_device_train_batch_size={args.per_device_train_batch_size}"
            f", max_length={recipe.data.max_length}):"
        )
        for label, size in rows:
            report.add(f"  {_size(size):>10}  {label}")
        report.add(
            f"  {_size(total):>10}  total (+ ~1 GiB CUDA context; FSDP/ZeRO-3 divide the weight and optimizer "
            "lines by the number of GPUs)"
        )
    else:
        report.unchecked.append("memory estimate: needs both configs")
    return report


def _check_refusals(recipe: Recipe, args, report: Report) -> None:
    """What `hf-kd train` refuses before it loads a tokenizer or a weight, on this machine: the hardware settings
    (bf16/fp16/tf32 without a GPU that has them) and the output directory (a finished run, an unfinished one not
    resumed, a resume without checkpoints). `check` has no --overwrite_output_dir: it checks the run as `train`
    would start it without one."""
    from hf_kd.cli.train import check_output_dir, resume_target
    from hf_kd.recipe.schema import HARDWARE_FIELDS, RecipeError

    try:
        recipe.training_args(check_hardware=True)
    except RecipeError as err:
        field = err.key.removeprefix("training.")
        where = "; a machine with such a GPU runs it as written" if field in HARDWARE_FIELDS else ""
        report.fail(f"{err.key}: {err.problem}{where}")
    try:
        check_output_dir(recipe, args, resume_target(args.resume_from_checkpoint), overwrite=False)
    except RecipeError as err:
        report.fail(f"{err.key}: {err.problem}")


SAMPLE_SIZE = 256  # examples read for the data checks (or tokenizer_check_samples, if more)


class Sample(list):
    """The first examples of the training split; ``total``: the split's size when known (a local file, or the Hub's
    dataset info), else None."""

    def __init__(self, examples=(), total: int | None = None):
        super().__init__(examples)
        self.total = total


def _data_sample(recipe: Recipe, report: Report) -> Sample | None:
    """The first examples of the training data (streamed from the Hub when online), or ``None`` if unreachable."""
    data = recipe.data
    local = os.path.exists(os.path.expanduser(data.dataset))
    no_hub = None if local else _no_hub_reason()
    if no_hub and not hub_offline():  # offline, `datasets` reads its own cache; without a network it would retry
        report.unchecked.append(f"data sample ({data.dataset}): {no_hub}")
        return None
    try:
        raw = load_raw_dataset(data.dataset, data.split, data.subset, streaming=not local and not no_hub)
        if not hasattr(raw, "take"):
            return Sample()
        return Sample(raw.take(max(data.tokenizer_check_samples, SAMPLE_SIZE)), total=_split_size(raw, data.split))
    except StopIteration:  # `datasets` on an empty file
        return Sample()
    except Exception as err:  # noqa: BLE001 - unreachable dataset: not checked, not failed
        report.unchecked.append(f"data sample ({data.dataset}): {str(err).strip().splitlines()[0][:200]}")
        return None


def _split_size(raw, split: str) -> int | None:
    try:
        return len(raw)
    except TypeError:  # streamed: the Hub's dataset info may know it
        splits = getattr(getattr(raw, "info", None), "splits", None) or {}
        info = splits.get(split) if hasattr(splits, "get") else None
        return getattr(info, "num_examples", None) or None


def _check_data(recipe: Recipe, args, tokenizer, sample: list, report: Report) -> None:
    """The checks `hf-kd train` applies to its data, on a sample: a recipe that train refuses fails here too."""
    import datasets

    data = recipe.data
    if not sample:
        report.fail(f"data: {data.dataset} has no examples")
        return
    try:
        if data.format == "prompt" and not args.every_batch_generated:
            raise DataError(
                "data.format",
                "prompt-only data has no completions to distill on: set training.lmbda: 1 "
                "(on-policy) or training.seq_kd: true (teacher completions)",
            )
        tokenized = tokenize_dataset(
            datasets.Dataset.from_list(sample),
            tokenizer,
            data,
            desc="Checking the data",
            keep_prompt_only=args.every_batch_generated,
        )
    except DataError as err:
        report.fail(f"data: {err}")
        return
    targets = (
        sum(count_targets(labels) for labels in tokenized["labels"])
        if data.format != "classification"
        else len(tokenized)
    )
    truncated, cut = _truncated(sample, tokenizer, data)
    what = "blocks" if data.packing else "trainable examples"
    report.add(
        f"data: the first {len(sample)} examples tokenize to {len(tokenized)} {what}, {targets} target tokens"
        + (
            ""
            if data.packing
            else f"; {truncated} truncated to max_length={data.max_length}" + (f" ({cut} tokens cut)" if cut else "")
        )
    )
    line = _steps_per_epoch(recipe, args, len(sample), len(tokenized), getattr(sample, "total", None))
    if line:
        report.add(line)


def _truncated(sample: list, tokenizer, data) -> tuple[int, int]:
    """Examples of the sample longer than ``max_length`` (cut by `hf-kd train`), and the tokens cut from them."""
    if data.packing:
        return 0, 0
    lengths = []
    for example in sample:
        if data.format == "classification":
            texts = [example[data.text_field]] + ([example[data.text_pair_field]] if data.text_pair_field else [])
            lengths.append(len(tokenizer(*texts)["input_ids"]))
        else:
            lengths.append(len(encode_example(example, tokenizer, data)["input_ids"]))
    over = [n - data.max_length for n in lengths if n > data.max_length]
    return len(over), sum(over)


def _steps_per_epoch(recipe: Recipe, args, sampled: int, trainable: int, total: int | None) -> str | None:
    """Optimizer steps per epoch at the recipe's batch, GA and world size, scaling the sample's trainable fraction to
    the split's size."""
    data = recipe.data
    if not sampled or not trainable:
        return None
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    shape = (
        f"batch {args.per_device_train_batch_size} x GA {args.gradient_accumulation_steps} x "
        f"{args.world_size} process{'es' if args.world_size > 1 else ''} = {batch}"
    )
    if total is None:
        return (
            f"data: steps per epoch unknown (the split's size is not known here); {trainable} trainable per "
            f"{sampled} examples sampled, at {shape} examples per step"
        )
    examples = min(total, data.max_samples or total)
    held = 0
    if data.eval_split is None and data.eval_size > 0:  # held out of the training split
        held = math.ceil(examples * data.eval_size) if data.eval_size < 1 else int(data.eval_size)
        examples = max(examples - held, 0)
    exact = sampled == total == examples  # the whole split was read, none of it held out
    trainable_total = trainable if exact else round(examples * trainable / sampled)
    steps = max(math.ceil(trainable_total / batch), 1)
    how = (
        ""
        if exact
        else (
            f"estimated from the first {sampled} of {total:,} examples"
            + (f", {held:,} held out for evaluation" if held else "")
            + ": "
        )
    )
    what = "blocks" if data.packing else "trainable examples"
    line = f"data: {how}~{trainable_total:,} {what}, {steps:,} optimizer steps per epoch at {shape}"
    if args.max_steps and args.max_steps > 0:
        line += f"; max_steps={args.max_steps} is {args.max_steps / steps:.2f} epochs"
    else:
        line += f"; num_train_epochs={args.num_train_epochs:g} is {math.ceil(steps * args.num_train_epochs):,} steps"
    return line.replace("~", "") if exact else line


def _check_tokenizers(recipe: Recipe, student, teacher, sample: list, report: Report) -> bool | None:
    """Whether both tokenizers give the student's ids on the sample (a FAIL line if not); ``None`` for different
    vocabularies (cross-tokenizer distillation: how well they align, instead)."""
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    data = recipe.data
    if not same_ids(
        student, teacher
    ):  # the teacher reads its own tokens of the same text: hf_kd.teachers.cross_tokenizer.alignment
        _report_alignment(recipe, student, teacher, sample[: data.tokenizer_check_samples], report)
        return None
    if s_vocab == t_vocab:
        report.add(f"tokenizers: identical vocabularies ({len(s_vocab)} tokens)")
    else:
        report.add(f"tokenizers: the student's {len(s_vocab)} tokens keep their ids among the teacher's {len(t_vocab)}")
    try:
        report.add(
            f"tokenizers: {check_tokenizers_agree(student, teacher, sample[: data.tokenizer_check_samples], data)}"
        )
    except DataError as err:  # "tokenizers: the teacher and student tokenizers disagree ..."
        report.fail(str(err))
        return False
    except KeyError as err:
        report.fail(f"tokenizers: the sample has no field {err}")
        return False
    return True


def _report_alignment(recipe: Recipe, student, teacher, sample: list, report: Report) -> None:
    """Different tokenizers: the vocabulary overlap and how the sample's targets align (hf_kd.teachers.cross_tokenizer.alignment)."""
    from hf_kd.teachers.cross_tokenizer.alignment import alignment_summary

    examples = [encode_example(example, student, recipe.data) for example in sample]
    found = alignment_summary(student, teacher, examples)
    report.add(
        f"tokenizers: different vocabularies -> cross-tokenizer distillation; {found['shared_tokens']:.0f} "
        f"tokens spelled alike ({100 * found['overlap']:.1f}% of the student's {found['student_tokens']:.0f}, "
        f"the teacher has {found['teacher_tokens']:.0f})"
    )
    report.add(
        f"alignment: of {found['targets']:.0f} target positions in {len(sample)} sample examples, "
        f"{100 * found['one_to_one']:.1f}% align one to one, {100 * found['in_spans']:.1f}% lie in merged spans "
        "(the chain rule; the projection where they start or inside a teacher token), the rest align with "
        "nothing (CE only)"
    )
    report.add(
        f"shared tokens: {100 * found['teacher_shared']:.1f}% of the teacher's target tokens on the sample are "
        "shared (a teacher that fits the data puts about this mass there; training logs its own as shared_mass)"
    )


def run_check(recipe: Recipe) -> int:
    report = check_recipe(recipe)
    for line in report.lines:
        print(line)
    for line in report.unchecked:
        print(f"not checked: {line}")
    print(report.verdict())
    return 1 if report.failed else 0
