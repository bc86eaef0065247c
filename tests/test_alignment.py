"""Cross-tokenizer alignment of tokens that end inside a character: byte-level pieces of CJK characters and emoji,
on tokenizers built here and on real ones (Llama 3.1, Qwen3, SmolLM2; tests/assets.py fetches them)."""

import itertools
import json

import pytest
import torch
import yaml
from assets import REAL_TOKENIZERS, real_tokenizer_dir
from conftest import save_tiny_llama
from test_cross_tokenizer import full_byte_level
from transformers import AutoTokenizer

from hf_kd.teachers.cross_tokenizer.alignment import (
    _align_example,
    _ends_from_offsets,
    _teacher_bos,
    _whole_characters,
    align_batch,
)
from hf_kd.teachers.cross_tokenizer.vocabulary import shared_vocabulary

MULTILINGUAL = [
    "a 你好",
    "x 你",
    "pi. 你好",
    "Hello 你好 world",
    "I like 北京 a lot",
    "你好",
    "好 好",
    "数据 and more",
    "emoji 😀 ok 👍🏽!",
    "café naïve Ünïcödé",
    "def f(x):\n    return x**2  # 平方 ✓",
    "Привет, мир. مرحبا",
    "x = 1234567 + 89 * 3.14159 - 1e-5, 2024-06-30",
    "a  \n\n\t  b    c\n\n\n   ",
]


def test_a_token_that_ends_inside_a_character_has_no_end_of_its_own():
    """Offsets of byte-level pieces run to the end of the character they cut; the next token starts inside it. A
    piece that completes one character and starts the next ("łå" of "你好") ends inside the second, not after the
    first: it shares the first one's end but not its start."""
    offsets = [(0, 1), (1, 2), (1, 3), (2, 3)]  # " ", 你's first bytes, its last byte + 好's first, 好's rest
    assert _ends_from_offsets(offsets) == [1, None, None, 3]
    assert _whole_characters(offsets) == [1, 1, 2, 3]


@pytest.mark.parametrize(
    "student_merges, fits",
    [
        ([("Ġ", "ä"), ("Ġä", "½"), ("Ġä½", "ł")], False),  # student " 你" whole: runs past the teacher's "Ġä"
        ([("ä", "½"), ("ä½", "ł")], True),  # student " " then "你": " " is all "Ġä" holds whole
    ],
)
def test_a_span_whose_first_teacher_token_ends_inside_a_character(tmp_path, student_merges, fits):
    """SmolLM2 writes " 你" as "Ġä" "½" "ł"-like pieces: the span group's first teacher token has no end of its own
    (the crash of the issue). The projection speaks for the student's first token only if that token ends within the
    characters the teacher's first token holds whole."""
    student = AutoTokenizer.from_pretrained(
        full_byte_level(tmp_path / "s", student_merges, ["<pad>"], pad_token="<pad>")
    )
    teacher = AutoTokenizer.from_pretrained(full_byte_level(tmp_path / "t", [("Ġ", "ä")], ["<pad>"], pad_token="<pad>"))
    ids = student("a 你", add_special_tokens=False)["input_ids"]
    alignment = align_batch(
        torch.tensor([ids]), None, torch.tensor([ids[1:]]), student, teacher, shared_vocabulary(student, teacher)
    )
    assert alignment.span_start_fits.tolist() == [fits]
    assert alignment.span_student.shape[1] == len(ids) - 1  # every target but the first sits in the one span group


# ---- real tokenizers ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real():
    return {name: AutoTokenizer.from_pretrained(real_tokenizer_dir(name)) for name in REAL_TOKENIZERS}


@pytest.fixture(scope="module")
def shared_of(real):
    """``shared_of(student, teacher)``: the pair's shared vocabulary, built once per module (seconds for 150k
    tokens)."""
    built = {}

    def get(student: str, teacher: str):
        if (student, teacher) not in built:
            built[student, teacher] = shared_vocabulary(real[student], real[teacher])
        return built[student, teacher]

    return get


def byte_tokens(tokenizer, text: str) -> list[int]:
    """``text`` as one byte-level token per UTF-8 byte: a sampled (non-canonical) tokenization of it."""
    from hf_kd.teachers.cross_tokenizer.vocabulary import _byte_decoder

    symbol = {byte: char for char, byte in _byte_decoder().items()}  # GPT-2's printable stand-in of each byte
    return tokenizer.convert_tokens_to_ids([symbol[byte] for byte in text.encode()])


def check_groups(student, teacher, shared, ids: list[int], text: str) -> None:
    """Every group spells the same characters on both sides, and the groups cover the text on both sides."""
    teacher_ids, groups, _, _ = _align_example(ids, student, teacher, shared, _teacher_bos(teacher))
    decode = lambda tok, token_ids: tok.decode(token_ids, clean_up_tokenization_spaces=False)  # noqa: E731
    for s, t in ((s, t) for s, t, _ in groups):
        assert decode(student, [ids[k] for k in s]) == decode(teacher, [teacher_ids[j] for j in t]), (text, s, t)
    covered_s = [k for s, _, _ in groups for k in s]
    covered_t = [j for _, t, _ in groups for j in t]
    assert covered_s == list(range(len(ids))), text
    assert covered_t == list(range(len(teacher_ids) - len(covered_t), len(teacher_ids))), text  # after any BOS
    assert "".join(decode(student, [ids[k] for k in s]) for s, _, _ in groups) == text


@pytest.mark.parametrize("pair", list(itertools.permutations(REAL_TOKENIZERS, 2)), ids="->".join)
@pytest.mark.parametrize("sampled", [False, True], ids=["canonical", "sampled"])
def test_real_tokenizers_align_multilingual_text(real, shared_of, pair, sampled):
    student, teacher = real[pair[0]], real[pair[1]]
    shared = shared_of(*pair)
    for text in MULTILINGUAL:
        ids = byte_tokens(student, text) if sampled else student(text, add_special_tokens=False)["input_ids"]
        check_groups(student, teacher, shared, ids, text)
    batch = [student(text, add_special_tokens=False)["input_ids"] for text in MULTILINGUAL]
    width = max(map(len, batch))
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in batch])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in batch])
    labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    alignment = align_batch(input_ids, mask, labels, student, teacher, shared)
    assert alignment.targets == int(mask[:, 1:].sum())
    assert alignment.pairs.shape[1] + alignment.span_student.shape[1] <= alignment.targets


CHAT = [
    {"role": "system", "content": "You answer in   two languages."},
    {"role": "user", "content": "What is 12 * 34? 你好 😀"},
    {"role": "assistant", "content": "408.\n\n答案是 408 ✓"},
]
# what each student chat marker becomes for each teacher (docs/teachers.md, "Another tokenizer"): the teacher's
# special token of the same content, else of the same role (SmolLM2 calls <|im_start|> its BOS and <|im_end|> its
# EOS; Qwen3's <|im_end|> is its EOS, its <|im_start|> has no role), else nothing
MARKERS = {
    ("smollm2", "qwen3"): {"<|im_start|>": "<|im_start|>", "<|im_end|>": "<|im_end|>"},
    ("smollm2", "llama3.1"): {"<|im_start|>": "<|begin_of_text|>", "<|im_end|>": "<|eot_id|>"},
    ("qwen3", "smollm2"): {"<|im_start|>": "<|im_start|>", "<|im_end|>": "<|im_end|>"},
    ("qwen3", "llama3.1"): {"<|im_start|>": None, "<|im_end|>": "<|eot_id|>"},
}


@pytest.mark.parametrize("pair", list(MARKERS), ids="->".join)
def test_a_real_chat_template_reaches_the_teacher_with_its_markers_mapped_or_dropped(real, shared_of, pair):
    """A system/user/assistant chat rendered with the student's real chat template (assistant turns the targets, as
    the `messages` format makes them) reaches the teacher as the teacher's tokens of each stretch of text between
    markers, each marker replaced by its counterpart (MARKERS) or left out; a teacher that puts a BOS before every
    text (Llama 3) gets one unless the chat starts with a marker that maps to it. Each mapped marker aligns one to one
    with its counterpart, and the teacher's probability of the counterpart is credited to the student's marker."""
    import re

    from hf_kd.data import _encode_messages

    student, teacher = real[pair[0]], real[pair[1]]
    shared = shared_of(*pair)
    markers = MARKERS[pair]
    example = _encode_messages(CHAT, student, completion_only=True, chat_template=None)
    ids, labels = example["input_ids"], example["labels"]
    text = student.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou answer in   two languages.<|im_end|>\n<|im_start|>user\n")
    assert student.convert_tokens_to_ids(list(markers)) == [i for i in ids if i in student.all_special_ids][:2]

    expected = [] if pair[1] != "llama3.1" or markers["<|im_start|>"] == "<|begin_of_text|>" else [teacher.bos_token_id]
    for piece in re.split(r"(<\|im_start\|>|<\|im_end\|>)", text):  # the reference: marker by marker
        if piece in markers:
            expected += [teacher.convert_tokens_to_ids(markers[piece])] if markers[piece] is not None else []
        elif piece:
            expected += teacher(piece, add_special_tokens=False)["input_ids"]
    alignment = align_batch(
        torch.tensor([ids]), None, torch.tensor([labels[1:]]), student, teacher, shared
    )  # labels[i] is the target predicted at position i
    assert alignment.teacher_inputs["input_ids"][0].tolist() == expected

    teacher_ids = alignment.teacher_inputs["input_ids"][0]
    paired = {  # the special tokens among the one-to-one targets: (student's, teacher's)
        (ids[s + 1], int(teacher_ids[t + 1]))
        for s, t in alignment.pairs.T.tolist()
        if ids[s + 1] in student.all_special_ids
    }
    im_end = student.convert_tokens_to_ids("<|im_end|>")  # the assistant turn's end: the only marker that is a target
    assert paired == {(im_end, teacher.convert_tokens_to_ids(markers["<|im_end|>"]))}
    for marker, counterpart in markers.items():
        if counterpart is not None:
            credited = int(shared.projection[teacher.convert_tokens_to_ids(counterpart)])
            assert credited == student.convert_tokens_to_ids(marker)


def test_cross_tokenizer_training_on_multilingual_data_through_the_cli(tmp_path, real, capsys):
    """A Qwen3-tokenizer student and a SmolLM2-tokenizer teacher (tiny models) train through `hf-kd train` on a jsonl
    of Latin, CJK, emoji and code."""
    from hf_kd.cli import COMPLETE_MARKER, main

    student_dir, teacher_dir = tmp_path / "student", tmp_path / "teacher"
    for directory, name, seed in ((student_dir, "qwen3", 1), (teacher_dir, "smollm2", 2)):
        tokenizer = real[name]
        save_tiny_llama(directory, len(tokenizer), seed=seed, hidden=16, layers=1)
        tokenizer.save_pretrained(directory)
    data = tmp_path / "multilingual.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in MULTILINGUAL * 2))
    recipe = {
        "teacher": {"name_or_path": str(teacher_dir)},
        "student": {"name_or_path": str(student_dir)},
        "data": {"dataset": str(data), "format": "text", "max_length": 48},
        "training": {
            "output_dir": str(tmp_path / "out"),
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "learning_rate": "1e-3",
            "logging_steps": 1,
            "save_strategy": "no",
            "use_cpu": True,
            "report_to": "none",
            "disable_tqdm": True,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert main(["train", str(path)]) == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / COMPLETE_MARKER).read_text())["metrics"]
    assert 0 < metrics["train"]["train_aligned_fraction"] < 1


# ---- a teacher whose real vocabulary is the student's, permuted ------------------------------------------------------


def permuted_tokenizer(source: str, path, seed: int) -> tuple[str, list[int]]:
    """The tokenizer in ``source`` with every id moved by one random bijection (text tokens, added and special tokens
    alike; merges are by string and stay), saved to ``path``; returns the directory and ``new_id_of[old_id]``."""
    import shutil
    from pathlib import Path

    source, path = Path(source), Path(path)
    spec = json.loads((source / "tokenizer.json").read_text())
    config = json.loads((source / "tokenizer_config.json").read_text())
    size = max([*spec["model"]["vocab"].values(), *(t["id"] for t in spec["added_tokens"])]) + 1
    new_id_of = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    spec["model"]["vocab"] = {piece: new_id_of[i] for piece, i in spec["model"]["vocab"].items()}
    for token in spec["added_tokens"]:  # into the model's vocabulary too: else loading renumbers them from its end
        token["id"] = new_id_of[token["id"]]
        spec["model"]["vocab"][token["content"]] = token["id"]
    assert "special_tokens" not in json.dumps(spec["post_processor"]) or not spec["post_processor"].get(
        "special_tokens"
    )
    config["added_tokens_decoder"] = {
        str(new_id_of[int(i)]): t for i, t in config.get("added_tokens_decoder", {}).items()
    }
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # tokenizer.json as it is (Qwen2Tokenizer rebuilds its ids)
    path.mkdir(parents=True)
    (path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    for extra in ("chat_template.jinja",):
        if (source / extra).exists():
            shutil.copy(source / extra, path / extra)
    return str(path), new_id_of


# every token of these ends on a character boundary in Qwen3's tokenization (asserted below): CJK, emoji, code,
# numbers, whitespace runs, an EOS
PERMUTED_TEXTS = [
    "Hello 你好 world, 数据 and more 😀 ok<|im_end|>",
    "def f(x):\n    return x**2  # 你好\n\n\tprint(1234567 + 3.14159)",
    "café naïve Привет, мир. مرحبا    end",
]


def test_a_teacher_with_a_permuted_real_vocabulary_gives_the_same_tokenizer_loss(tmp_path, real):
    """Qwen3's real tokenizer (151k tokens) and a copy with every id permuted, loaded back through from_pretrained; a
    tiny teacher on the copy has its embedding and head rows permuted to match, so it is the same function of text.
    The cross-tokenizer loss (exact term only, the default weights 1 and 0: ULD compares sorted distributions
    wherever a group is merged, and here none is) equals the same-tokenizer loss with the unpermuted teacher: loss,
    logged components and every student gradient, in float64."""
    from conftest import load_model
    from test_cross_tokenizer import permuted_teacher
    from test_trainer import make_args

    from hf_kd import DistillationCollator, DistillationTrainer
    from hf_kd.teachers.cross_tokenizer.alignment import _ends_from_offsets

    student_tok = real["qwen3"]
    perm_dir, new_id_of = permuted_tokenizer(real_tokenizer_dir("qwen3"), tmp_path / "perm", seed=5)
    perm_tok = AutoTokenizer.from_pretrained(perm_dir)
    rows = []
    for text in PERMUTED_TEXTS:
        encoded = student_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert None not in _ends_from_offsets(encoded["offset_mapping"]), text  # no token ends inside a character
        permuted_ids = perm_tok(text, add_special_tokens=False)["input_ids"]
        assert permuted_ids == [new_id_of[i] for i in encoded["input_ids"]]  # the same tokenizer, ids moved
        rows.append(encoded["input_ids"])
    assert student_tok.eos_token_id in rows[0]
    batch = DistillationCollator(pad_token_id=student_tok.pad_token_id)(
        [{"input_ids": r, "labels": [-100] * 3 + r[3:]} for r in rows]  # a short prompt, masked
    )
    save_tiny_llama(tmp_path / "teacher", len(student_tok), seed=1, hidden=16, layers=1)
    save_tiny_llama(tmp_path / "student", len(student_tok), seed=2, hidden=16, layers=1)
    teacher = load_model(tmp_path / "teacher").double()
    permuted = permuted_teacher(teacher, new_id_of).double()
    results = []
    for teacher_model, teacher_tok in ((teacher, None), (permuted, perm_dir)):
        student = load_model(tmp_path / "student").double()
        args = make_args(
            tmp_path,
            loss_type={"forward_kl": 0.5, "jsd": 0.5},
            temperature=2.0,
            alpha=0.6,
            loss_chunk_size=16,  # the fused path, 16 rows a chunk (tests/test_cross_tokenizer.py: fused == full)
            teacher_tokenizer_name_or_path=teacher_tok,
        )
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher_model, args=args, processing_class=student_tok
        )
        assert (type(trainer.teacher).__name__ == "CrossTokenizerTeacher") == (teacher_tok is not None)
        student.train()
        targets = (batch["labels"][:, 1:] != -100).sum()
        loss = trainer.compute_loss(student, dict(batch), num_items_in_batch=targets)
        loss.backward()
        terms = dict(trainer.accounting._window)
        results.append((loss.detach(), terms, [p.grad.clone() for p in student.parameters()]))
    (loss_a, terms_a, grads_a), (loss_b, terms_b, grads_b) = results
    assert loss_a.dtype == torch.float64
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-10, atol=1e-12)
    for name in ("distill_loss", "ce_loss"):
        torch.testing.assert_close(terms_b[name], terms_a[name], rtol=1e-10, atol=1e-12)
    assert float(terms_b["aligned_fraction"]) == pytest.approx(1.0)  # every target aligned one to one
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12)
