"""MkDocs hooks: what a page would otherwise copy by hand, rendered from its one source when the site is built.

A page asks for it with a directive on a line of its own:

    {{ config_reference() }}               DistillationConfig's own fields: type, default, help (hf_kd/config.py)
    {{ recipe_reference() }}               the recipe sections' keys and their comments (hf_kd/recipe/schema.py)
    {{ results("quality.md") }}            a results file as its benchmark wrote it (benchmarks/results/)
    {{ results("seed_paper.md", "README table") }}   one "## " section of it
    {{ served_teacher() }}                 benchmarks/results/served_teacher.json and the bytes-on-the-wire table
    {{ mixed_precision() }}                docs/data/mixed_precision.yaml (measurements no benchmark writes yet)
    {{ readme_block("marker") }}           the README's python block that holds ``marker`` (one example, one copy)

The PNG plots under benchmarks/results/ are served as ``results/<name>.png``. An unknown directive, a missing file or
section fails the build. The functions are importable without MkDocs (tests/test_docs.py renders every directive).
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import re
import sys
import tokenize
import typing
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DIRECTIVE = re.compile(r"^\{\{\s*(\w+)\((.*?)\)\s*\}\}[ \t]*$", flags=re.MULTILINE)


# ---- the directives -------------------------------------------------------------------------------------------------


def config_reference() -> str:
    """One entry per field that DistillationConfig adds to TrainingArguments, in declaration order: a heading (so that
    a page can link to ``config.md#temperature``), its type and default, its help string and its default's comment."""
    from transformers import TrainingArguments

    from hf_kd.config import DistillationConfig

    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = [f for f in dataclasses.fields(DistillationConfig) if f.name not in inherited]
    why = _default_comments(ROOT / "hf_kd" / "config.py", "DistillationConfig")
    entries = []
    for f in own:
        kind = DistillationConfig.__annotations__[f.name]  # as written (HfArgumentParser rewrites f.type)
        entry = [f"### `{f.name}` {{ #{f.name} }}", "", f"`{kind}`, default {_default(f)}", ""]
        entry.append(_text(f.metadata.get("help", "")))
        if why.get(f.name):
            entry += ["", f"*Why this default:* {_text(why[f.name])}"]
        entries.append("\n".join(entry))
    return "\n\n".join(entries)


def recipe_reference() -> str:
    """The keys of the teacher / student and data sections, with the comment each carries in the schema."""
    from hf_kd.recipe import schema

    path = ROOT / "hf_kd" / "recipe" / "schema.py"
    parts = []
    for title, cls in (("`teacher:` and `student:`", schema.ModelSection), ("`data:`", schema.DataSection)):
        comments = _default_comments(path, cls.__name__, above=True)
        hints = typing.get_type_hints(cls)
        entries = [f"### {title}", ""]
        for f in dataclasses.fields(cls):
            kind = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
            entries += [
                f"`{f.name}` · `{kind}` · {_default(f)}",
                f":   {_text(comments.get(f.name, '')) or '&nbsp;'}",
                "",
            ]
        parts.append("\n".join(entries))
    return "\n\n".join(parts)


def results(name: str, section: str | None = None) -> str:
    """``benchmarks/results/<name>`` (or its ``## <section>``) with headings moved below the page's own."""
    path = RESULTS / name
    if not path.is_file():
        raise ValueError(f"no results file {path.relative_to(ROOT)}")
    text = path.read_text(encoding="utf-8")
    if section is not None:
        match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
        if match is None:
            raise ValueError(f"{path.relative_to(ROOT)} has no section '## {section}'")
        text = match.group(1)
    text = re.sub(r"^(#{1,3}) ", lambda m: "#" * (len(m.group(1)) + 3) + " ", text, flags=re.MULTILINE)
    where = f"`benchmarks/results/{name}`" + (f", section *{section}*" if section else "")
    return f"{_separate_tables(text).strip()}\n\n*Rendered from {where}, as the benchmark wrote it.*"


def served_teacher() -> str:
    """The bytes each kind of remote teacher sends (computed from the recipes' teacher sizes) and the measured step."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.served_teacher import wire_table
    finally:
        sys.path.remove(str(ROOT))
    row = json.loads((RESULTS / "served_teacher.json").read_text(encoding="utf-8"))
    ratio = row["served_step_s"] / row["local_step_s"]
    steps = [
        f"Student 128 x 2 layers, teacher 512 x 4 layers, vocabulary 4096, batch 8 x 256 tokens, median step; "
        f"{row['machine']}{' (quick run)' if row['quick'] else ''}:",
        "",
        "| teacher | step (s) | ratio | request round trip (s) | waited for it (s) | hidden behind the forward |",
        "|---|---|---|---|---|---|",
        f"| local | {row['local_step_s']:.3f} | 1.00x | - | - | - |",
        f"| served (same 2 cores) | {row['served_step_s']:.3f} | {ratio:.2f}x | {row['round_trip_s']:.3f} "
        f"| {row['served_wait_s']:.3f} | {100 * row['hidden_share']:.0f}% |",
    ]
    return "\n".join(
        [
            "Bytes per target position on the wire, at the shipped recipes' teacher sizes:",
            "",
            *wire_table(),
            "",
            *steps,
            "",
            "*Rendered from `benchmarks/results/served_teacher.json` and `benchmarks/served_teacher.py`'s "
            "`wire_table()`.*",
        ]
    )


def mixed_precision() -> str:
    """The bf16-autocast numerics and speed measurements kept in docs/data/mixed_precision.yaml."""
    data = yaml.safe_load((ROOT / "docs" / "data" / "mixed_precision.yaml").read_text(encoding="utf-8"))
    numerics = data["numerics"]
    rows = [
        f"{numerics['setting']}",
        "",
        "| objective | loss, relative error | student gradient, relative error | of which bf16 inputs alone |",
        "|---|---|---|---|",
    ]
    for case in numerics["cases"]:
        rows.append(
            f"| {case['objective']} | {case['loss_rel_error']:.1e} | {100 * case['grad_rel_error']:.2f}% "
            f"| {100 * case['grad_rel_error_bf16_inputs']:.2f}% |"
        )
    speed = data["speed"]
    rows += [
        "",
        f"Speed: {speed['setting']}: bf16 autocast **{speed['speedup']:.2f}x** faster than float32.",
        "",
        f"*Rendered from `docs/data/mixed_precision.yaml` ({data['source']}).*",
    ]
    return "\n".join(rows)


def readme_block(marker: str) -> str:
    """The README's python block holding ``marker``, so that a page shows the README's example without a copy."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.DOTALL)
    found = [block for block in blocks if marker in block]
    if len(found) != 1:
        raise ValueError(f"expected one README python block with {marker!r}, found {len(found)}")
    return f"```python\n{found[0]}```"


DIRECTIVES = {
    f.__name__: f for f in (config_reference, recipe_reference, results, served_teacher, mixed_precision, readme_block)
}


def render(markdown: str, where: str = "page") -> str:
    """``markdown`` with every directive replaced by what it renders."""

    def one(match: re.Match) -> str:
        name, arguments = match.group(1), match.group(2)
        if name not in DIRECTIVES:
            raise ValueError(f"{where}: unknown directive {name!r} (known: {', '.join(DIRECTIVES)})")
        args = ast.literal_eval(f"({arguments},)") if arguments.strip() else ()
        try:
            return DIRECTIVES[name](*args)
        except (ValueError, OSError, KeyError) as err:
            raise ValueError(f"{where}: {match.group(0).strip()}: {err}") from None

    return DIRECTIVE.sub(one, markdown)


# ---- the MkDocs events ----------------------------------------------------------------------------------------------


def on_page_markdown(markdown, page, config, files):
    from mkdocs.exceptions import PluginError

    try:
        return render(markdown, page.file.src_uri)
    except ValueError as err:
        raise PluginError(str(err)) from None


def on_files(files, config):
    from mkdocs.structure.files import File

    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"results/{png.name}", abs_src_path=str(png)))
    return files


# ---- helpers --------------------------------------------------------------------------------------------------------


def _default_comments(path: Path, class_name: str, above: bool = False) -> dict[str, str]:
    """``{field: the comment on its default's line}`` for the fields of ``class_name`` in ``path`` (the "why this
    default" comments the style guide asks for); ``above``: else the comment on a line of its own above the field."""
    source = path.read_text(encoding="utf-8")
    comments, alone = {}, set()  # line -> comment; the lines that hold nothing but a comment
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
            if not lines[token.start[0] - 1][: token.start[1]].strip():
                alone.add(token.start[0])
    cls = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == class_name)
    found = {}
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        line = node.lineno
        if isinstance(node.value, ast.Call):  # field(default=...,  # why)
            default = next((k.value for k in node.value.keywords if k.arg in ("default", "default_factory")), None)
            line = default.end_lineno if default is not None else line
        if above and line not in comments and node.lineno - 1 in alone:  # the comment on the line above the field
            line = node.lineno - 1
        if line in comments and not comments[line].startswith(("fmt:", "noqa")):
            found[node.target.id] = comments[line]
    return found


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{f.default!r}`"
    if f.default_factory is not dataclasses.MISSING:
        return f"`{f.default_factory()!r}`"
    return "required"


def _text(text: str) -> str:
    """A help string or a comment as one Markdown paragraph: no stray HTML or emphasis."""
    return " ".join(text.split()).replace("<", "&lt;").replace("*", "\\*")


def _separate_tables(text: str) -> str:
    """Each line outside a table a paragraph of its own, and a blank line around each table: the results files put
    their notes on consecutive lines and a table right under its caption, which Markdown would run together."""
    out: list[str] = []
    for line in text.splitlines():
        is_row = line.startswith("|")
        if out and out[-1].strip() and not (is_row and out[-1].startswith("|")):
            out.append("")
        out.append(line)
    return "\n".join(out) + "\n"
