"""`hf-kd check`'s data checks, on a sample of the recipe's data: what `train` would make of it (trainable targets,
truncation, prompt-only examples) and how many steps an epoch is."""

from __future__ import annotations

import math
import os

from hf_kd.cli.check_report import Report, hub_offline, no_hub_reason
from hf_kd.data import DataError, count_targets, encode_example, load_raw_dataset, tokenize_dataset
from hf_kd.recipe.recipe import Recipe

SAMPLE_SIZE = 256  # examples read for the data checks (or tokenizer_check_samples, if more)


class Sample(list):
    """The first examples of the training split; ``total``: the split's size when known (a local file, or the Hub's
    dataset info), else None."""

    def __init__(self, examples=(), total: int | None = None):
        super().__init__(examples)
        self.total = total


def data_sample(recipe: Recipe, report: Report) -> Sample | None:
    """The first examples of the training data (streamed from the Hub when online), or ``None`` if unreachable."""
    data = recipe.data
    local = os.path.exists(os.path.expanduser(data.dataset))
    no_hub = None if local else no_hub_reason()
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


def check_data(recipe: Recipe, args, tokenizer, sample: list, report: Report) -> None:
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
                "(on-policy, without lmbda_warmup_steps / lmbda_ramp_steps, which read the dataset's completions) or "
                "training.seq_kd: true (teacher completions)",
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
    if data.teacher_field is not None and not _routes_known(recipe, sample, report):
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


def _routes_known(recipe: Recipe, sample: list, report: Report) -> bool:
    """Every sampled ``data.teacher_field`` value names a teacher (an index from 0, or a member's name), as
    `train` requires; a FAIL line otherwise."""
    members = recipe.teacher.options["teachers"]
    names = [member.get("name", str(index)) for index, member in enumerate(members)]
    for example in sample:
        value = example.get(recipe.data.teacher_field)
        known = value in names if isinstance(value, str) else isinstance(value, int) and 0 <= value < len(names)
        if not known:
            report.fail(
                f"data: data.teacher_field {recipe.data.teacher_field}: {value!r} names no teacher; use an index "
                f"0..{len(names) - 1} or a member name ({', '.join(names)})"
            )
            return False
    return True
