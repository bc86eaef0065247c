"""`hf-kd check`: what can be known about a recipe before renting GPUs.

Everything is read from configs and tokenizers (local paths, the Hub cache, or the Hub when online); no weights are
downloaded. Whatever cannot be reached is reported as not checked, never as a failure. Without a network (one
2-second connection attempt to the Hub decides) only local files and the cache are read, as with HF_HUB_OFFLINE=1.
The refusals `hf-kd train` makes before loading anything are made here too, on this machine: hardware settings it
cannot run (bf16 without a GPU) and an output directory train would not write to. The last line is the verdict: whether
`hf-kd train` would refuse the recipe, and what was not checked.
"""

from __future__ import annotations

from hf_kd.cli.check_data import check_data, data_sample
from hf_kd.cli.check_memory import Found, _count, _size, count_parameters, estimate_memory, meta_model
from hf_kd.cli.check_report import Report, fetch_or_reason, hub_offline, hub_reachable  # noqa: F401 (hub_reachable: tests)
from hf_kd.data import (
    DataError,
    check_tokenizers_agree,
    encode_example,
    is_empty_tokenizer,
)
from hf_kd.models.adapters import SELF_TEACHER
from hf_kd.recipe.recipe import Recipe, loads_teacher_model
from hf_kd.teachers.cross_tokenizer.vocabulary import same_ids


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
        if role == "teacher" and section.kind == "mixture":  # several teachers: each named with its weight or route
            _list_teachers(recipe, section.options, report)
            continue
        if role == "teacher" and not loads_teacher_model(section):
            kind = section.kind or ("vllm" if section.server == "vllm" else "served")
            report.add(f"teacher kind {kind}: {section.name_or_path} (no model config to inspect)")
            continue
        config, why = fetch_or_reason(AutoConfig.from_pretrained, section.name_or_path)
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
        tokenizer, why = fetch_or_reason(AutoTokenizer.from_pretrained, name)
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
        sample = data_sample(recipe, report) if "student" in tokenizers else None
        data_lines = Report()  # printed after the vocab line
        if sample is not None:
            check_data(recipe, args, tokenizers["student"], sample, data_lines)
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
    from hf_kd.cli.output_dir import check_output_dir, resume_target
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


def _list_teachers(recipe, options: dict, report: Report) -> None:
    """Several teachers, one line each: its weight, or (routed) its name and the data column that picks it."""
    members = options["teachers"]
    for index, member in enumerate(members):
        where = member.get("url") or member.get("name_or_path")
        if options.get("routed"):
            name = member.get("name", str(index))
            field = recipe.data.teacher_field
            report.add(f"teacher {name} ({index + 1} of {len(members)}, routed by data.teacher_field {field}): {where}")
        else:
            weight = options["weights"][index] / sum(options["weights"])
            report.add(f"teacher {index + 1} of {len(members)} (weight {weight:.3g}): {where}")
