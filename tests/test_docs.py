"""The README and the documentation site say what is true: every Python block runs (here, in tests/test_readme.py, or
it says on its first line why not), every YAML block parses and every recipe in them validates, every directive of
docs/hooks.py renders, the API reference covers the public names, and the README's headline numbers are in the results
files it cites."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_model

import hf_kd
from hf_kd import DistillationCollator, DistillationConfig, DistillationTrainer
from hf_kd.recipe import load_recipe
from hf_kd.recipe.schema import DATA_EXTENSIONS, HARDWARE_FIELDS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
FENCE = re.compile(r"^( *)```(\w+)\n(.*?)^\1```", flags=re.MULTILINE | re.DOTALL)
OPT_OUT = re.compile(r"\A# docs: not run \((.*)\)")  # a block's first line: it cannot run here, and why
RECIPE_KEYS = {"teacher", "teachers", "student", "data", "training", "peft"}

# blocks that need names their page defines in prose (a student, an engine, a term): run by a test of their own
DEDICATED = {
    "DistillationTrainer(model=student, teacher_model=": "test_readme.py::test_python_in_15_lines",
    "class HiddenKD(DistillationTrainer)": "test_readme.py::test_extension_point_snippet",
    "class EngineCompletions(DistillationTrainer)": "test_readme.py::test_generation_engine_override_snippet",
    "class PowerTVD(hf_kd.Divergence)": "test_readme.py::test_architecture_page_divergence_snippet",
    "class BigramTeacher(hf_kd.Teacher)": "test_docs.py::test_contributing_teacher_kind_snippet",
}


def blocks(language: str) -> list[tuple[str, str]]:
    """``(where, code)`` of every ``language`` block of the README and the pages, indentation removed."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for number, match in enumerate(m for m in FENCE.finditer(text) if m.group(2) == language):
            indent = len(match.group(1))
            code = "".join(line[indent:] for line in match.group(3).splitlines(keepends=True))
            found.append((f"{page.relative_to(ROOT)}#{number}", code))
    return found


def block_with(marker: str, language: str = "python") -> str:
    """The one ``language`` block of the README and the pages that holds ``marker``."""
    found = [code for _, code in blocks(language) if marker in code]
    assert len(found) == 1, f"expected one {language} block with {marker!r} in the README and docs/, found {len(found)}"
    return found[0]


def hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- Python blocks ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where,code", blocks("python"), ids=[where for where, _ in blocks("python")])
def test_every_python_block_runs_or_says_why(where, code):
    opted_out = OPT_OUT.match(code)
    if opted_out:
        assert opted_out.group(1).strip(), f"{where}: '# docs: not run (...)' needs a reason"
        return
    claimed = [marker for marker in DEDICATED if marker in code]
    if claimed:
        file, test = DEDICATED[claimed[0]].split("::")
        assert f"def {test}(" in (ROOT / "tests" / file).read_text(), f"{where}: {DEDICATED[claimed[0]]} is gone"
        return
    registries = dict(hf_kd.DIVERGENCES), dict(hf_kd.TEACHERS)
    try:
        exec(compile(code, where, "exec"), {"__name__": "docs_block"})
    finally:  # a block may register a divergence or a teacher kind: the library's registries stay as they were
        for registry, before in zip((hf_kd.DIVERGENCES, hf_kd.TEACHERS), registries):
            registry.clear()
            registry.update(before)


def test_each_dedicated_marker_names_one_block():
    for marker in DEDICATED:
        block_with(marker)


def test_contributing_teacher_kind_snippet(tmp_path, tiny_dir):
    """The page's bigram teacher kind: built from the training data by name, its loss is the dense loss against the
    table of the data's bigram log-probabilities, computed here."""
    namespace = {}
    try:
        exec(compile(block_with("class BigramTeacher(hf_kd.Teacher)"), "docs/contributing.md", "exec"), namespace)
        rows = [[3, 5, 7, 9, 1], [4, 4, 10, 3], [5, 7, 9]]
        data = [{"input_ids": r, "labels": r} for r in rows]
        args = DistillationConfig(
            output_dir=str(tmp_path),
            use_cpu=True,
            report_to="none",
            teacher_kind="bigram",
            teacher_options={"smoothing": 0.5},
            alpha=0.5,
        )
        student = load_model(tiny_dir["student"])
        trainer = DistillationTrainer(model=student, args=args, train_dataset=data)
        assert isinstance(trainer.teacher, namespace["BigramTeacher"])
        batch = DistillationCollator()(data)
        loss = trainer.compute_loss(student, dict(batch))
        counts = torch.full((40, 40), 0.5)
        for r in rows:
            for a, b in zip(r, r[1:]):
                counts[a, b] += 1
        table = counts.log() - counts.sum(-1, keepdim=True).log()
        with torch.no_grad():
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        expected = hf_kd.distillation_loss(logits, table[batch["input_ids"][:, :-1]], batch["labels"][:, 1:], alpha=0.5)
        assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    finally:
        hf_kd.TEACHERS.pop("bigram", None)  # the page's example, not a kind of the library


# ---- YAML blocks ------------------------------------------------------------------------------------------------------


def _as_recipe(block: dict, tmp_path: Path) -> dict:
    """A recipe block completed with whatever sections it leaves out (a fragment shows only what it is about), its
    local files made: a token file, a data file of its extension."""
    recipe = {
        "teacher": {"name_or_path": "org/teacher"},
        "student": {"name_or_path": "org/student"},
        "data": {"dataset": "org/dataset"},
        "training": {"output_dir": str(tmp_path / "out")},
    }
    if "teachers" in block:
        del recipe["teacher"]
    for section, value in block.items():
        recipe[section] = {**recipe.get(section, {}), **value} if isinstance(value, dict) else value
    token = tmp_path / "token.txt"
    token.write_text("secret\n")
    for teacher in [recipe.get("teacher") or {}, *(recipe.get("teachers") or [])]:
        if "token_file" in teacher:
            teacher["token_file"] = str(token)
    dataset = recipe["data"]["dataset"]
    suffix = Path(dataset).suffix.lower()
    if suffix in DATA_EXTENSIONS:  # a local file in the example: one of the same kind here
        recipe["data"]["dataset"] = str(tmp_path / f"data{suffix}")
        Path(recipe["data"]["dataset"]).write_text("")
    return recipe


@pytest.mark.parametrize("where,code", blocks("yaml"), ids=[where for where, _ in blocks("yaml")])
def test_every_yaml_block_parses_and_recipes_validate(where, code, tmp_path):
    block = yaml.safe_load(code)
    assert isinstance(block, dict), f"{where}: not a mapping"
    if not set(block) <= RECIPE_KEYS:
        return  # not a recipe: parsing is the check
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_as_recipe(block, tmp_path), sort_keys=False))
    recipe = load_recipe(path)
    config = recipe.training_args(check_hardware=False)  # (bf16 and the like: turned off on a machine without GPU)
    for key, value in (block.get("training") or {}).items():  # what the block sets is what the config holds
        if key not in ("output_dir", *HARDWARE_FIELDS):
            got = getattr(config, key)
            assert got == value or str(got) == str(value), (
                f"{where}: training.{key} is {got!r}, the block says {value!r}"
            )


# ---- the site's generated parts ---------------------------------------------------------------------------------------


def test_every_directive_renders():
    """The build would fail on them too; here it fails in seconds and names the page."""
    module = hooks()
    seen = set()
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        seen |= {m.group(1) for m in module.DIRECTIVE.finditer(text)}
        rendered = module.render(text, str(page.relative_to(ROOT)))
        assert not module.DIRECTIVE.search(rendered)
    assert seen == set(module.DIRECTIVES), f"directives no page uses: {set(module.DIRECTIVES) - seen}"


def test_the_config_reference_has_every_field_of_distillation_config():
    from transformers import TrainingArguments

    reference = hooks().config_reference()
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = [f.name for f in dataclasses.fields(DistillationConfig) if f.name not in inherited]
    assert own and all(f"### `{name}` {{ #{name} }}" in reference for name in own)
    assert "### `temperature` { #temperature }\n\n`float`, default `1.0`\n\nSoftmax temperature" in reference


def test_the_results_directive_renders_a_file_as_its_benchmark_wrote_it():
    text = hooks().results("seed_paper.md", "README table")
    assert text.startswith("| claim (Kim et al. 2021) |")
    assert "`benchmarks/results/seed_paper.md`" in text
    with pytest.raises(ValueError, match="no section"):
        hooks().results("seed_paper.md", "no such section")


def test_the_api_reference_covers_every_public_name():
    page = (DOCS / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: [\w.]+\.(\w+)$", page, flags=re.MULTILINE))
    assert set(hf_kd.__all__) <= documented, sorted(set(hf_kd.__all__) - documented)


def test_every_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert all(re.search(rf"\b{re.escape(page.name)}$", nav, flags=re.MULTILINE) for page in DOCS.glob("*.md"))


# ---- the README -------------------------------------------------------------------------------------------------------


def test_the_readme_fits_on_a_page_and_its_links_resolve():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)", text):
        assert (ROOT / target).exists(), target


def test_the_readme_headline_numbers_are_in_the_files_it_cites():
    text = README.read_text(encoding="utf-8")
    section = text.split("## Measured", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) >= 5
    for row in rows:
        what, measured, source = (cell.strip() for cell in row.strip("|").split("|"))
        cited = (ROOT / source.strip("`")).read_text(encoding="utf-8")
        for number in re.findall(r"\d+(?:\.\d+)?(?:e-\d+)?", measured):
            assert number in cited, f"README: {number} ({what}) is not in {source}"
