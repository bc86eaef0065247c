"""Cross-tokenizer distillation: alignment, the loss terms against references written here, and the trainer path."""

import math
from pathlib import Path

import pytest
import torch
from conftest import SPECIALS, WORDS, load_model, save_tiny_llama, variable_length_examples
from datasets import Dataset
from test_trainer import make_args
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from hf_kd import DistillationCollator, DistillationTrainer
from hf_kd.errors import SetupError
from hf_kd.teachers.cross_tokenizer.alignment import align_batch, group_tokens
from hf_kd.teachers.cross_tokenizer.loss import span_log_probs, two_buckets, uld_distance
from hf_kd.teachers.cross_tokenizer.vocabulary import shared_vocabulary, token_strings

# ---- tokenizers built here ----------------------------------------------------------------------------------------

CHARS = ["a", "b", "c", "d", "Ġ"]  # byte-level BPE's stand-in for a space is "Ġ"


def byte_level_tokenizer(path, merges: list[tuple[str, str]], shuffle_seed: int | None = None) -> str:
    """A GPT-2-style byte-level BPE over a five-character alphabet with the given merges, saved to ``path``."""
    pieces = ["<pad>", "<eos>", *CHARS, *(a + b for a, b in merges)]
    if shuffle_seed is not None:
        order = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
        pieces = [pieces[i] for i in order]
    core = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>").save_pretrained(path)
    return str(path)


def permuted_wordlevel(path, seed: int) -> tuple[str, list[int]]:
    """conftest's tokenizer with its ids shuffled; returns the dir and ``new_id_of[old_id]``."""
    tokens = SPECIALS + WORDS
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed)).tolist()  # new id -> old id
    vocab = {tokens[old]: new for new, old in enumerate(order)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(path)
    new_id_of = [0] * len(tokens)
    for new, old in enumerate(order):
        new_id_of[old] = new
    return str(path), new_id_of


STUDENT_MERGES = [("a", "b"), ("c", "d")]  # "ab", "cd"
TEACHER_MERGES = [
    ("Ġ", "a"),
    ("a", "b"),
    ("ab", "c"),
]  # "Ġa" (first: it wins), "ab", "abc": coarser in places, finer in others


@pytest.fixture(scope="module")
def byte_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("xtok")
    student = AutoTokenizer.from_pretrained(byte_level_tokenizer(root / "student_tok", STUDENT_MERGES))
    teacher = AutoTokenizer.from_pretrained(byte_level_tokenizer(root / "teacher_tok", TEACHER_MERGES))
    return root, student, teacher


# ---- alignment ----------------------------------------------------------------------------------------------------


def test_token_strings_are_bytes_for_byte_level(byte_pair):
    _, student, teacher = byte_pair
    strings = token_strings(student)
    assert strings[student.convert_tokens_to_ids("Ġ")] == b" " and strings[student.convert_tokens_to_ids("cd")] == b"cd"
    assert strings[student.eos_token_id] == ("special", "eos_token")
    shared = shared_vocabulary(student, teacher)
    pairs = {
        student.convert_ids_to_tokens(s): teacher.convert_ids_to_tokens(t)
        for s, t in zip(shared.student_ids.tolist(), shared.teacher_ids.tolist())
    }
    assert pairs == {"<pad>": "<pad>", "<eos>": "<eos>", "a": "a", "b": "b", "c": "c", "d": "d", "Ġ": "Ġ", "ab": "ab"}


def test_group_tokens_by_common_boundaries():
    # student "ab|cd|x" ends 2, 4, 5; teacher "abc|d|x" ends 3, 4, 5: one 2:2 group, then 1:1
    assert group_tokens([2, 4, 5], [3, 4, 5]) == [([0, 1], [0, 1]), ([2], [2])]
    # a token that ends inside a character (None) joins the next token's group
    assert group_tokens([1, None, 3], [1, 3]) == [([0], [0]), ([1, 2], [1])]
    # text after the last common boundary spells different things on the two sides: no group
    assert group_tokens([2, 5], [2, 4]) == [([0], [0])]


def test_alignment_of_hand_built_examples(byte_pair):
    _, student, teacher = byte_pair
    text = "ab cdab abcd"
    ids = student(text, add_special_tokens=False)["input_ids"] + [student.eos_token_id]
    pieces = student.convert_ids_to_tokens(ids)
    assert pieces == ["ab", "Ġ", "cd", "ab", "Ġ", "ab", "cd", "<eos>"]
    t_pieces = teacher.convert_ids_to_tokens(teacher(text, add_special_tokens=False)["input_ids"])
    assert t_pieces == ["ab", "Ġ", "c", "d", "ab", "Ġa", "b", "c", "d"]
    batch_ids = torch.tensor([ids])
    labels = torch.tensor([[-100, -100, *ids[3:]]])  # aligned: the first 3 tokens ("ab", " ", "cd") are the prompt
    alignment = align_batch(batch_ids, None, labels, student, teacher, shared_vocabulary(student, teacher))
    t_ids = alignment.teacher_inputs["input_ids"][0].tolist()
    assert teacher.convert_ids_to_tokens(t_ids) == t_pieces + ["<eos>"]
    width_t = len(t_ids)
    # one-to-one targets: student "ab"(3) <-> teacher "ab"(4); student <eos>(7) <-> teacher <eos>(9)
    assert alignment.pairs.T.tolist() == [[2, 3], [6, 8]]
    assert width_t - 1 == 9
    # span groups: " ab"(student 4, 5) <-> " a" "b"(teacher 5, 6); "cd"(student 6) <-> "c" "d"(teacher 7, 8);
    # the prompt's "cd"(student 2) <-> "c" "d" is no target: never in a group
    assert alignment.span_student.T.tolist() == [[3, ids[4], 0], [4, ids[5], 0], [5, ids[6], 1]]
    assert [row for row, _, _ in alignment.span_teacher.T.tolist()] == [4, 5, 6, 7]
    assert alignment.span_starts.T.tolist() == [[3, 4], [5, 6]]
    assert alignment.targets == 5

    # the merged span probabilities are the chain-rule products, computed by hand
    torch.manual_seed(0)
    s_logits = torch.randn(len(ids) - 1, len(student), dtype=torch.float64)
    t_logits = torch.randn(width_t - 1, len(teacher), dtype=torch.float64)
    s_rows, s_tok, s_grp = alignment.span_student
    t_rows, t_tok, t_grp = alignment.span_teacher
    s_span = span_log_probs(torch.log_softmax(s_logits, -1)[s_rows, s_tok], s_grp, 2).exp()
    t_span = span_log_probs(torch.log_softmax(t_logits, -1)[t_rows, t_tok], t_grp, 2).exp()
    p_s, p_t = torch.softmax(s_logits, -1), torch.softmax(t_logits, -1)
    tid = teacher.convert_tokens_to_ids
    by_hand_t = [p_t[4, tid("Ġa")] * p_t[5, tid("b")], p_t[6, tid("c")] * p_t[7, tid("d")]]
    by_hand_s = [p_s[3, ids[4]] * p_s[4, ids[5]], p_s[5, ids[6]]]
    assert torch.allclose(t_span, torch.stack(by_hand_t), rtol=1e-12)
    assert torch.allclose(s_span, torch.stack(by_hand_s), rtol=1e-12)
    buckets = two_buckets(torch.log(t_span)).exp()
    assert torch.allclose(buckets.sum(-1), torch.ones(2, dtype=torch.float64), rtol=1e-12)


def test_left_padding_and_sampled_tokenizations(byte_pair):
    """Padding on the left shifts rows; a non-canonical id sequence (a sample: "a" "b" instead of "ab") still aligns."""
    _, student, teacher = byte_pair
    shared = shared_vocabulary(student, teacher)
    sid = student.convert_tokens_to_ids
    ids = [sid("a"), sid("b"), sid("Ġ"), sid("a"), sid("b")]  # "ab ab", spelled letter by letter
    padded = torch.tensor([[student.pad_token_id] * 2 + ids])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, -100, *ids[1:]]])  # aligned with positions 0..5
    alignment = align_batch(padded, mask, labels, student, teacher, shared)
    # teacher "ab" "Ġa" "b": groups [a b]<->[ab] (no target: the first token has nothing before it), [Ġ a]<->[Ġa]
    # (a span: rows 3, 4 of the student, row 0 of the teacher), [b]<->[b] (one to one: student row 5, teacher row 1)
    assert alignment.pairs.T.tolist() == [[5, 1]]
    assert alignment.span_student[0].tolist() == [3, 4] and alignment.span_teacher[0].tolist() == [0]


def test_uld_against_reference():
    torch.manual_seed(1)
    p = torch.softmax(torch.randn(3, 7, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(3, 5, dtype=torch.float64), -1)
    expected = []
    for row_p, row_q in zip(p.tolist(), q.tolist()):
        a = sorted(row_p, reverse=True)
        b = sorted(row_q, reverse=True) + [0.0] * 2
        expected.append(sum(abs(x - y) for x, y in zip(a, b)))
    assert torch.allclose(uld_distance(p, q), torch.tensor(expected, dtype=torch.float64), rtol=1e-12)
    assert math.isclose(float(uld_distance(q[:1], q[:1])), 0.0, abs_tol=1e-15)


# ---- the trainer --------------------------------------------------------------------------------------------------


def permuted_teacher(teacher, new_id_of):
    """The same model with its token rows moved to the permuted ids (embedding and lm_head)."""
    permuted = AutoModelForCausalLM.from_config(teacher.config)
    permuted.load_state_dict(teacher.state_dict())
    order = torch.tensor(new_id_of).argsort()  # new id -> old id
    with torch.no_grad():
        permuted.model.embed_tokens.weight.copy_(teacher.model.embed_tokens.weight[order])
        permuted.lm_head.weight.copy_(teacher.lm_head.weight[order])
    return permuted


@pytest.mark.parametrize("chunk", [0, 3])
def test_permuted_vocabulary_equals_same_tokenizer_path(tmp_path, tiny_dir, tokenizer, chunk):
    """A teacher whose tokenizer is the student's with the ids shuffled (rows permuted to match) gives the same loss,
    components and student gradients as the same-tokenizer path with the unpermuted teacher."""
    perm_dir, new_id_of = permuted_wordlevel(tmp_path / "perm_tok", seed=3)
    teacher = load_model(tiny_dir["teacher"])
    permuted = permuted_teacher(teacher, new_id_of)
    text = ["w3 w5 w7 w9 w2 <eos>", "w4 w4 w10", "w30 w31 w32 w33 w34 w35 w36 <eos>"]
    rows = [tokenizer(t)["input_ids"] for t in text]
    batch = DistillationCollator(pad_token_id=0)([{"input_ids": r, "labels": [-100] + r[1:]} for r in rows])
    results = []
    for teacher_model, teacher_tok in ((teacher, None), (permuted, perm_dir)):
        student = load_model(tiny_dir["student"])
        args = make_args(
            tmp_path,
            loss_type={"forward_kl": 0.5, "jsd": 0.5},
            temperature=2.0,
            alpha=0.6,
            loss_chunk_size=chunk,
            teacher_tokenizer_name_or_path=teacher_tok,
        )
        trainer = DistillationTrainer(model=student, teacher_model=teacher_model, args=args, processing_class=tokenizer)
        assert (type(trainer.teacher).__name__ == "CrossTokenizerTeacher") == (teacher_tok is not None)
        student.train()
        targets = (batch["labels"][:, 1:] != -100).sum()  # the step's count, as the Trainer passes it
        loss = trainer.compute_loss(student, dict(batch), num_items_in_batch=targets)
        loss.backward()
        terms = dict(trainer.accounting._window)
        results.append((loss.detach(), terms, [p.grad.clone() for p in student.parameters()]))
    (loss_a, terms_a, grads_a), (loss_b, terms_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-7)
    for name in ("distill_loss", "ce_loss"):
        assert torch.allclose(terms_a[name], terms_b[name], rtol=1e-5, atol=1e-7)
    assert float(terms_b["aligned_fraction"]) == pytest.approx(1.0)  # every target aligned one to one
    assert float(terms_b["shared_mass"]) == pytest.approx(1.0, rel=1e-5)  # every token shared
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_a_teacher_with_another_tokenizer_is_announced_in_one_warning(tmp_path, tiny_dir, tokenizer, caplog):
    """Switching to cross-tokenizer distillation is never silent: one WARNING (shown without any logging setup) that
    names both tokenizers, the shared vocabulary and how the first training examples align."""
    import logging

    perm_dir, _ = permuted_wordlevel(tmp_path / "perm_tok", seed=3)
    rows = variable_length_examples(8, seed=1)
    with caplog.at_level(logging.WARNING):
        DistillationTrainer(
            model=load_model(tiny_dir["student"]),
            teacher_model=tiny_dir["teacher"],
            args=make_args(tmp_path, teacher_tokenizer_name_or_path=perm_dir),
            processing_class=tokenizer,
            train_dataset=Dataset.from_list(rows),
        )
    records = [r for r in caplog.records if "cross-tokenizer" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert records[0].getMessage() == (
        f"cross-tokenizer distillation: the teacher's tokenizer ({perm_dir}, 40 tokens) is not the student's "
        f"({tiny_dir['tokenizer']}, 40 tokens); 40 tokens are shared (100.0% of the student's); of the target positions "
        "of the first 8 training examples, 100.0% align one to one, 0.0% in merged spans, the rest with nothing (CE only)"
    )


def test_cross_tokenizer_pair_trains_and_held_out_kl_falls(tmp_path, byte_pair):
    root, student_tok, teacher_tok = byte_pair
    teacher_dir = save_tiny_llama(root / "teacher_model", len(teacher_tok), seed=1, hidden=48)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with torch.no_grad():  # a random init is nearly uniform (KL ~0.03 from the start): sharpen it, like a trained one
        teacher.lm_head.weight.mul_(8.0)
    teacher.save_pretrained(teacher_dir)
    teacher_tok.save_pretrained(teacher_dir)  # the default: the teacher's directory holds its tokenizer
    student = AutoModelForCausalLM.from_pretrained(save_tiny_llama(root / "student_model", len(student_tok), 2, 32))
    g = torch.Generator().manual_seed(0)
    words = ["ab", "cd", "abc", "dab", "a", "bcd", "abcd"]

    def example():
        text = " ".join(words[int(i)] for i in torch.randint(len(words), (6,), generator=g))
        ids = student_tok(text)["input_ids"] + [student_tok.eos_token_id]
        return {"input_ids": ids, "labels": [-100, -100] + ids[2:]}

    train, held_out = (
        Dataset.from_list([example() for _ in range(64)]),
        Dataset.from_list([example() for _ in range(16)]),
    )
    args = make_args(
        tmp_path,
        max_steps=40,
        learning_rate=1e-2,
        optim="adamw_torch",
        loss_type="forward_kl",
        per_device_train_batch_size=8,
        loss_chunk_size=4,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher_dir,
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=student_tok,
    )
    assert type(trainer.teacher).__name__ == "CrossTokenizerTeacher"
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert 0 < before["eval_aligned_fraction"] < 1 and 0 < before["eval_shared_mass"] <= 1
    assert after["eval_distill_loss"] < 0.5 * before["eval_distill_loss"]  # 0.50 -> 0.14 when written
    logged = [entry for entry in trainer.state.log_history if "aligned_fraction" in entry]
    assert logged and all(0 < entry["aligned_fraction"] < 1 for entry in logged)


def test_refusals(tmp_path, tiny_dir, tokenizer, byte_pair):
    other = str(byte_pair[0] / "teacher_tok")
    student = load_model(tiny_dir["student"])
    with pytest.raises(SetupError, match="loss_type: mse compares logits over one vocabulary"):
        DistillationTrainer(
            model=student,
            teacher_model=tiny_dir["teacher"],
            processing_class=tokenizer,
            args=make_args(tmp_path, loss_type="mse", teacher_tokenizer_name_or_path=other),
        )
    with pytest.raises(SetupError, match="seq_kd"):
        DistillationTrainer(
            model=student,
            teacher_model=tiny_dir["teacher"],
            processing_class=tokenizer,
            args=make_args(tmp_path, seq_kd=True, teacher_tokenizer_name_or_path=other),
        )


def test_on_policy_samples_are_re_tokenized_for_the_teacher(tmp_path, byte_pair):
    """lmbda 1: the student's own samples (often spelled in tokens its tokenizer would not choose) are decoded and
    re-tokenized; the teacher's input is the teacher tokenizer's ids of exactly that text."""
    root, student_tok, teacher_tok = byte_pair
    teacher_dir = save_tiny_llama(root / "teacher_onpolicy", len(teacher_tok), seed=3, hidden=48)
    student = AutoModelForCausalLM.from_pretrained(save_tiny_llama(root / "student_onpolicy", len(student_tok), 4, 32))
    prompts = ["ab cd", "abc", "d ab cd ab"]
    train = Dataset.from_list(
        [
            {"input_ids": student_tok(p)["input_ids"], "labels": [-100] * len(student_tok(p)["input_ids"])}
            for p in prompts
        ]
        * 4
    )
    args = make_args(
        tmp_path,
        lmbda=1.0,
        max_new_tokens=6,
        per_device_train_batch_size=3,
        max_steps=2,
        teacher_tokenizer_name_or_path=str(root / "teacher_tok"),
        loss_chunk_size=4,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher_dir, args=args, train_dataset=train, processing_class=student_tok
    )
    batch = trainer.data_collator([train[i] for i in range(3)])
    generated = trainer.prepare_batch(batch, 0)
    labels = trainer.target_labels(generated)
    alignment = trainer.teacher.run(generated, trainer._forward, labels).alignment
    for row in range(3):
        ids = generated["input_ids"][row][generated["attention_mask"][row] == 1].tolist()
        text = student_tok.decode(ids, skip_special_tokens=False)
        expected = teacher_tok(text, add_special_tokens=False)["input_ids"]
        teacher_row = alignment.teacher_inputs["input_ids"][row][alignment.teacher_inputs["attention_mask"][row] == 1]
        assert teacher_row.tolist() == expected, text
    assert alignment.targets == int((labels != -100).sum()) > 0
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "aligned_fraction" in entry]
    assert len(logged) == 2 and all(entry["generated_fraction"] == 1.0 for entry in logged)
    assert all(math.isfinite(entry["loss"]) and 0 < entry["aligned_fraction"] <= 1 for entry in logged)


# ---- the shipped recipe's code path on tiny models of its architectures ----------------------------------------------

QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def full_byte_level(path, merges, specials: list[str], bos: str | None = None, **roles) -> str:
    """A byte-level BPE with all 256 byte symbols (any text encodes), ``merges`` and ``specials``; a ``bos`` is put
    before every text, as Llama 3's tokenizer does."""
    from tokenizers import AddedToken, processors
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    pieces = [*specials, *sorted(alphabet), *(a + b for a, b in merges)]
    core = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges))
    core.add_special_tokens([AddedToken(s, special=True) for s in specials])
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    if bos is not None:
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, pieces.index(bos))]
        )
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, **roles)
    tok.save_pretrained(path)
    return str(path)


def test_cross_tokenizer_recipe_runs_on_tiny_llama_teacher_and_qwen2_student(tmp_path, capsys):
    """recipes/llama-3.1-8b-to-qwen2.5-0.5b-cross-tokenizer.yaml with its models swapped for tiny ones of the same
    architectures and tokenizers built like theirs (Qwen: no BOS, <|im_end|> is EOS; Llama 3: BOS on every text,
    <|eot_id|> is EOS), chat data rendered with the student's template: `hf-kd check` and `hf-kd train` run it."""
    import json

    import yaml
    from transformers import Qwen2Config

    from hf_kd.cli import COMPLETE_MARKER, main

    qwen_tok = full_byte_level(
        tmp_path / "qwen",
        [("Ġ", "a"), ("b", "c")],
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    student_tok = AutoTokenizer.from_pretrained(qwen_tok)
    student_tok.chat_template = QWEN_TEMPLATE
    student_tok.save_pretrained(qwen_tok)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(student_tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        eos_token_id=student_tok.eos_token_id,
        pad_token_id=student_tok.pad_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(qwen_tok)
    llama_dir = full_byte_level(
        tmp_path / "llama",
        [("a", "b"), ("ab", "c"), ("Ġ", "d")],
        ["<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"],
        bos="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
    )
    save_tiny_llama(tmp_path / "llama_model", len(AutoTokenizer.from_pretrained(llama_dir)), seed=1, hidden=48)
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (tmp_path / "llama_model" / name).rename(tmp_path / "llama" / name)
    rows = [
        {"messages": [{"role": "user", "content": "ab cd"}, {"role": "assistant", "content": f"abc d ab {i}"}]}
        for i in range(12)
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    shipped = Path(__file__).resolve().parents[1] / "recipes" / "llama-3.1-8b-to-qwen2.5-0.5b-cross-tokenizer.yaml"
    with open(shipped) as f:
        recipe = yaml.safe_load(f)
    recipe["teacher"].update(name_or_path=llama_dir, tokenizer=llama_dir, dtype="float32", init_kwargs={})
    recipe["student"].update(name_or_path=qwen_tok, init_kwargs={})
    recipe["data"] = {
        **recipe["data"],
        "dataset": str(data),
        "eval_split": None,
        "eval_size": 4,
        "max_eval_samples": None,
        "max_length": 64,
        "num_proc": None,
    }
    recipe["training"].update(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        bf16=False,
        use_cpu=True,
        eval_steps=2,
        save_strategy="no",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert main(["check", str(path)]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "tokenizers: different vocabularies -> cross-tokenizer distillation" in out and "align one to one" in out
    assert main(["train", str(path)]) == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / COMPLETE_MARKER).read_text())["metrics"]
    assert 0 < metrics["train"]["train_aligned_fraction"] < 1 and 0 < metrics["eval"]["eval_shared_mass"] <= 1


def test_sampled_sequences_count_bytes_like_prefix_decoding(tmp_path):
    """A sampled id sequence: the byte-counting path gives the token ends that prefix-by-prefix decoding gives,
    including tokens that hold part of a multi-byte character (no end of their own)."""
    from hf_kd.teachers.cross_tokenizer.alignment import student_text

    tok = AutoTokenizer.from_pretrained(
        full_byte_level(tmp_path / "bytes", [("Ġ", "a"), ("b", "c")], ["<eos>"], eos_token="<eos>")
    )
    strings = token_strings(tok)
    g = torch.Generator().manual_seed(0)
    text_ids = tok("aé bc€ a", add_special_tokens=False)["input_ids"]  # é and € take 2 and 3 byte tokens
    for _ in range(20):
        ids = text_ids[: int(torch.randint(1, len(text_ids) + 1, (1,), generator=g))]
        ids = ids + [tok.convert_tokens_to_ids(c) for c in ("a", "b", "c")]  # "bc" spelled apart: not canonical
        by_bytes, (text, ends) = student_text(tok, ids, strings), student_text(tok, ids, None)
        # bytes that are no character decode to one U+FFFD that every prefix ending among them shows: one end, the last
        assert by_bytes == (text, [None if end == nxt else end for end, nxt in zip(ends, [*ends[1:], None])])
    assert None in student_text(tok, text_ids, strings)[1]  # a partial character has no end of its own


def test_every_term_against_a_float64_reference(byte_pair):
    """The projected next-token term (one-to-one targets and span starts), the span and ULD terms and the CE, value and
    gradient, against the definitions written out here (the loss runs 2 rows at a time, so the span term's weights
    cross chunks)."""
    from hf_kd.objective.losses import Objective
    from hf_kd.objective.signals import TeacherLogits
    from hf_kd.teachers.cross_tokenizer.loss import CrossTokenizerWeights, cross_tokenizer_terms

    _, student, teacher = byte_pair
    shared = shared_vocabulary(student, teacher)
    ids = student("ab cdab abcd a", add_special_tokens=False)["input_ids"] + [student.eos_token_id]
    labels = torch.tensor([[-100, -100, *ids[3:]]])
    alignment = align_batch(torch.tensor([ids]), None, labels, student, teacher, shared)
    torch.manual_seed(2)
    s_logits = torch.randn(1, len(ids) - 1, len(student), dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(1, alignment.teacher_inputs["input_ids"].shape[1] - 1, len(teacher), dtype=torch.float64)
    T, alpha, w_exact, w_uld = 2.0, 0.7, 0.8, 0.5
    objective = Objective("forward_kl", temperature=T, alpha=alpha)
    terms = cross_tokenizer_terms(
        s_logits,
        TeacherLogits(t_logits),
        alignment,
        shared,
        labels,
        objective,
        weights=CrossTokenizerWeights(w_exact, w_uld),
        chunk_size=2,
    )
    (grad,) = torch.autograd.grad(terms["loss"], s_logits)

    s, t = s_logits[0], t_logits[0]
    lp_s, lp_t = torch.log_softmax(s, -1), torch.log_softmax(t, -1)

    def kl_on_buckets(b_s, b_t):  # T^2 * KL(softmax(b_t / T) || softmax(b_s / T))
        p_t, log_q = torch.softmax(b_t / T, -1), torch.log_softmax(b_s / T, -1)
        return T * T * (p_t * (torch.log(p_t) - log_q)).sum()

    # each teacher token's probability goes to the longest student token its text starts with (specials: same name)
    s_text = {i: p.replace("Ġ", " ") for i, p in enumerate(student.convert_ids_to_tokens(list(range(len(student)))))}
    credit = []
    for piece in teacher.convert_ids_to_tokens(list(range(len(teacher)))):
        text = piece.replace("Ġ", " ")
        special = text.startswith("<")
        prefixes = [i for i, st in s_text.items() if (st == text if special else text.startswith(st) and "<" not in st)]
        credit.append(max(prefixes, key=lambda i: len(s_text[i])))
    assert [
        student.convert_ids_to_tokens(credit[teacher.convert_tokens_to_ids(t)]) for t in ("Ġa", "abc", "<eos>")
    ] == ["Ġ", "ab", "<eos>"]

    def projected_kl(row_s, row_t):  # T^2 * KL(q_T || softmax(s / T)), q_T: the teacher's credited probabilities at T
        p_t = torch.softmax(t[row_t] / T, -1)
        q = torch.stack([p_t[[j for j, c in enumerate(credit) if c == i]].sum() for i in range(len(student))])
        log_s = torch.log_softmax(s[row_s] / T, -1)
        return T * T * sum(q[i] * (torch.log(q[i]) - log_s[i]) for i in range(len(student)) if q[i] > 0)

    t_text = {i: p.replace("Ġ", " ") for i, p in enumerate(teacher.convert_ids_to_tokens(list(range(len(teacher)))))}
    # after the same text on both sides, where the student's target ends within the teacher's token: the one-to-one
    # targets and the starts of " ab" (" " within "Ġa") and " a"; not "cd", which runs past the teacher's "c"
    assert alignment.span_start_fits.tolist() == [True, False, True]
    boundaries = alignment.pairs.T.tolist() + alignment.span_starts.T[alignment.span_start_fits].tolist()
    exact = sum(projected_kl(r, q) for r, q in boundaries)

    def spelled(text):  # a teacher token's text as student tokens, longest first
        out = []
        while text:
            match = max(
                (i for i, st in s_text.items() if "<" not in st and text.startswith(st)), key=lambda i: len(s_text[i])
            )
            out.append(match)
            text = text[len(s_text[match]) :]
        return out

    # targets inside a teacher token: the last "a" is read inside the teacher's "Ġa", after "Ġ"; what the teacher's
    # tokens spell after "Ġ" there is its word on it. The student's "ab" after "Ġ" starts inside "Ġa" too but runs past
    # it: no teacher token spells it whole there, so it has none (the span term covers it)
    gid = student.convert_tokens_to_ids
    inner = [(r, q, [i for i in before if i >= 0]) for r, q, *before in alignment.inner.T.tolist()]
    assert [
        (r, teacher.convert_ids_to_tokens(alignment.teacher_inputs["input_ids"][0, q + 1].item()), b)
        for r, q, b in inner
    ] == [(7, "Ġa", [gid("Ġ")])]
    for r, q, before in inner:
        p_t = torch.softmax(t[q] / T, -1)
        mass = torch.zeros(len(student), dtype=torch.float64)
        for tau, text in t_text.items():
            spelling = [] if text.startswith("<") else spelled(text)
            if spelling[: len(before)] == before and len(spelling) > len(before):
                mass[spelling[len(before)]] += p_t[tau]
        q_t, log_s = mass / mass.sum(), torch.log_softmax(s[r] / T, -1)
        exact = exact + T * T * sum(q_t[i] * (torch.log(q_t[i]) - log_s[i]) for i in range(len(student)) if q_t[i] > 0)
    span = 0.0
    s_rows, s_tok, s_grp = alignment.span_student
    t_rows, t_tok, t_grp = alignment.span_teacher
    extended = []  # (side, token) whose last-of-span factor sums more than one token

    def factors(lp, rows_, toks, grps, g, text_of, side):
        # each token's log-prob; the span's last: every token whose text starts with its text ("goes on with it")
        members = [(r, k) for r, k, gg in zip(rows_.tolist(), toks.tolist(), grps.tolist()) if gg == g]
        total = sum(lp[r, k] for r, k in members[:-1])
        r, k = members[-1]
        ext = [j for j, text in text_of.items() if text.startswith(text_of[k]) and not text.startswith("<")]
        if len(ext) > 1:
            extended.append((side, text_of[k]))
        return total + torch.logsumexp(lp[r, ext], 0)

    for g in range(alignment.span_starts.shape[1]):
        log_ps = factors(lp_s, s_rows, s_tok, s_grp, g, s_text, "student")
        log_pt = factors(lp_t, t_rows, t_tok, t_grp, g, t_text, "teacher")
        two = lambda lp: torch.stack([lp, torch.log1p(-torch.exp(lp))])  # noqa: E731
        span = span + kl_on_buckets(two(log_ps), two(torch.as_tensor(log_pt)))
    uld = 0.0
    for r, q in alignment.span_starts.T.tolist():
        a = torch.softmax(s[r] / T, -1).sort(descending=True).values
        b = torch.softmax(t[q] / T, -1).sort(descending=True).values
        a = torch.cat([a, a.new_zeros(max(0, len(b) - len(a)))])
        b = torch.cat([b, b.new_zeros(max(0, len(a) - len(b)))])
        uld = uld + (a - b).abs().sum()
    count = alignment.targets
    target_rows_ = (labels[0] != -100).nonzero().flatten()
    ce = -lp_s[target_rows_, labels[0, target_rows_]].sum() / count
    divergence = (w_exact * (exact + span) + w_uld * uld) / count
    reference = alpha * divergence + (1 - alpha) * ce
    (reference_grad,) = torch.autograd.grad(reference, s_logits)
    assert alignment.pairs.shape[1] == 2 and alignment.span_starts.shape[1] == 3  # every kind of term is present
    assert extended == [("student", "a")]  # " a": the student's "a" goes on as "a" or "ab"
    assert terms["loss"].dtype == torch.float64  # float64 in, float64 throughout
    assert torch.allclose(terms["distill_loss"], divergence.detach(), rtol=1e-12)
    assert torch.allclose(terms["ce_loss"], ce.detach(), rtol=1e-12)
    assert torch.allclose(terms["loss"], reference.detach(), rtol=1e-12)
    assert torch.allclose(grad, reference_grad, rtol=1e-10, atol=1e-14)


def sentencepiece_like(path, words: list[str]) -> str:
    """A Llama-2 style tokenizer: "▁" for spaces (prepended to the text), byte fallback, a decoder that strips the
    leading space."""
    from tokenizers import normalizers

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", *"abcd", *words]
    merges = []
    for word in words:  # merge each word letter by letter: "▁ab" = ("▁a", "b") after ("▁", "a")
        for cut in range(2, len(word) + 1):
            left = word[: cut - 1]
            merges.append((left, word[cut - 1]))
            if left not in pieces:
                pieces.append(left)
    core = Tokenizer(
        models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, byte_fallback=True, unk_token="<unk>")
    )
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(path)
    return str(path)


def test_sentencepiece_pieces_are_text_and_sampled_sequences_count_bytes(tmp_path, byte_pair):
    """SentencePiece pieces spell text ("▁ab" is b" ab", "<0xC3>" one byte): they share tokens with a byte-level
    vocabulary, and a sampled sequence (letters spelled apart, a character cut in two) gets the ends that
    prefix-by-prefix decoding gives, without decoding prefix by prefix."""
    import hf_kd.teachers.cross_tokenizer.alignment as alignment

    _, byte_level, _ = byte_pair
    tok = AutoTokenizer.from_pretrained(sentencepiece_like(tmp_path / "sp", ["▁ab", "▁cd", "cd"]))
    strings = token_strings(tok)
    assert (
        strings[tok.convert_tokens_to_ids("▁ab")] == b" ab" and strings[tok.convert_tokens_to_ids("<0xC3>")] == b"\xc3"
    )
    shared = shared_vocabulary(tok, byte_level)
    assert {tok.convert_ids_to_tokens(i) for i in shared.student_ids.tolist()} >= {"▁", "a", "b", "c", "d", "cd"}
    tid = tok.convert_tokens_to_ids
    sampled = [tid("▁ab"), tid("▁"), tid("c"), tid("d"), tid("▁ab"), tid("<0xC3>")]  # ends inside "é"
    calls = []
    original = tok.decode
    tok.decode = lambda ids, **kw: calls.append(len(ids)) or original(ids, **kw)
    by_bytes = alignment.student_text(tok, sampled, strings)
    decodes = len(calls)
    by_prefix = alignment.student_text(tok, sampled, None)
    assert by_bytes == by_prefix and by_bytes[0] == "ab cd ab\ufffd"
    assert decodes == 1  # the whole sequence once: no prefix-by-prefix decoding


def test_a_batch_with_nothing_to_align_backpropagates_zero(byte_pair):
    """No target at all, or targets that align with nothing: a loss of 0 whose backward works, as the dense loss's."""
    from hf_kd.objective.losses import Objective
    from hf_kd.objective.signals import TeacherLogits
    from hf_kd.teachers.cross_tokenizer.loss import cross_tokenizer_terms

    _, student, teacher = byte_pair
    shared = shared_vocabulary(student, teacher)
    ids = torch.tensor([student("ab cd", add_special_tokens=False)["input_ids"]])
    for alpha in (1.0, 0.9):
        logits = torch.randn(1, ids.shape[1] - 1, len(student), requires_grad=True)
        labels = torch.full((1, ids.shape[1] - 1), -100)
        alignment = align_batch(ids, None, labels, student, teacher, shared)
        t_logits = torch.randn(1, alignment.teacher_inputs["input_ids"].shape[1] - 1, len(teacher))
        terms = cross_tokenizer_terms(
            logits, TeacherLogits(t_logits), alignment, shared, labels, Objective(alpha=alpha)
        )
        terms["loss"].backward()
        assert terms["loss"].item() == 0.0 and logits.grad is not None and not logits.grad.any()


def test_a_teacher_tokenizer_with_more_special_tokens_keeps_the_same_tokenizer_path(
    tmp_path, tiny_dir, tokenizer, byte_pair
):
    """The teacher's tokenizer adds special tokens after the student's (Qwen2 -> Qwen2.5): the teacher reads the
    student's ids over the shared rows, as without a teacher tokenizer. One with more merges (more text tokens, every
    student id kept) tokenizes text otherwise: another tokenizer."""
    bigger = AutoTokenizer.from_pretrained(tiny_dir["tokenizer"])
    bigger.add_special_tokens({"additional_special_tokens": ["<x1>", "<x2>", "<x3>"]})
    bigger.save_pretrained(tmp_path / "bigger")
    trainer = DistillationTrainer(
        model=load_model(tiny_dir["student"]),
        teacher_model=tiny_dir["teacher_padded"],
        args=make_args(tmp_path, teacher_tokenizer_name_or_path=str(tmp_path / "bigger")),
        processing_class=tokenizer,
    )
    assert type(trainer.teacher).__name__ == "ModelTeacher" and trainer.vocab_size == 40
    from hf_kd.teachers.cross_tokenizer.vocabulary import same_ids

    root = byte_pair[0]
    more_merges = AutoTokenizer.from_pretrained(byte_level_tokenizer(root / "more", [*STUDENT_MERGES, ("ab", "cd")]))
    fewer = AutoTokenizer.from_pretrained(byte_level_tokenizer(root / "fewer", STUDENT_MERGES))
    assert more_merges("abcd")["input_ids"] != fewer("abcd")["input_ids"]  # the extra merge changes the ids of text
    assert not same_ids(fewer, more_merges) and same_ids(fewer, byte_pair[1])


@pytest.mark.parametrize("chunk", [0, 4])
def test_gradient_accumulation_is_exact_across_tokenizers(tmp_path, byte_pair, chunk):
    """Batch 4 x GA 1 == batch 1 x GA 4 == batch 2 x GA 2 with a teacher of another tokenizer (examples of different
    lengths and alignments): the cross-tokenizer terms are normalized by the step's global target count too."""
    root, student_tok, _ = byte_pair
    teacher_dir = save_tiny_llama(root / "teacher_ga", 12, seed=5, hidden=48)  # the teacher tokenizer's 12 tokens
    student_dir = save_tiny_llama(root / "student_ga", len(student_tok), seed=6, hidden=32)
    texts = ["ab cd abc", "d abcd ab cd dab", "abc", "cd cd ab a b"]
    rows = []
    for text in texts:
        ids = student_tok(text)["input_ids"] + [student_tok.eos_token_id]
        rows.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    weights = {}
    for bs, ga in ((4, 1), (1, 4), (2, 2)):
        student = AutoModelForCausalLM.from_pretrained(student_dir)
        args = make_args(
            tmp_path / f"b{bs}",
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            loss_chunk_size=chunk,
            loss_type={"forward_kl": 0.5, "reverse_kl": 0.5},
            temperature=2.0,
            alpha=0.8,
            teacher_tokenizer_name_or_path=str(root / "teacher_tok"),
        )
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher_dir,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=student_tok,
        )
        trainer.train()
        weights[(bs, ga)] = {k: v.clone() for k, v in student.state_dict().items()}
        weights[(bs, ga, "loss")] = trainer.state.log_history[0]["loss"]
    initial = AutoModelForCausalLM.from_pretrained(student_dir).state_dict()
    assert any(not torch.equal(weights[(4, 1)][k], initial[k]) for k in initial)  # the step moved the weights
    for key in ((1, 4), (2, 2)):
        assert weights[key + ("loss",)] == pytest.approx(weights[(4, 1, "loss")], rel=1e-5)
        for name, value in weights[(4, 1)].items():
            torch.testing.assert_close(weights[key][name], value, rtol=1e-5, atol=1e-6, msg=f"{key}: {name}")


def test_a_lora_student_learns_across_tokenizers(tmp_path, byte_pair):
    """A PEFT student (frozen head, adapters train) with a teacher of another tokenizer, fused path: the adapters move,
    the frozen weights do not."""
    from peft import LoraConfig

    root, student_tok, _ = byte_pair
    teacher_dir = save_tiny_llama(root / "teacher_lora", 12, seed=7, hidden=48)
    student = AutoModelForCausalLM.from_pretrained(save_tiny_llama(root / "student_lora", len(student_tok), 8, 32))
    head_before = student.lm_head.weight.detach().clone()
    ids = student_tok("ab cd abc d", add_special_tokens=False)["input_ids"]
    args = make_args(
        tmp_path, loss_chunk_size=4, learning_rate=0.1, teacher_tokenizer_name_or_path=str(root / "teacher_tok")
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher_dir,
        args=args,
        processing_class=student_tok,
        train_dataset=Dataset.from_list([{"input_ids": ids, "labels": ids}] * 4),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert trainer.use_fused_loss and type(trainer.teacher).__name__ == "CrossTokenizerTeacher"
    moved = [n for n, p in trainer.model.named_parameters() if "lora_B" in n and not torch.equal(p, lora[n])]
    assert moved and torch.equal(trainer.model.get_base_model().lm_head.weight, head_before)


def test_a_teacher_whose_tokens_spell_no_student_token_gives_no_signal_not_nan(byte_pair):
    """Where no teacher token maps onto the student's vocabulary (tokenizers of different schemes), the projected term
    has nothing to say: the loss stays finite (the CE still trains), it does not turn into NaN."""
    import dataclasses

    from hf_kd.objective.losses import Objective
    from hf_kd.objective.signals import TeacherLogits
    from hf_kd.teachers.cross_tokenizer.loss import cross_tokenizer_terms, projected_log_probs

    _, student, teacher = byte_pair
    shared = shared_vocabulary(student, teacher)
    unmapped = dataclasses.replace(shared, segmentation=torch.full_like(shared.segmentation, -1))
    log_q, has = projected_log_probs(torch.randn(3, len(teacher)), unmapped.projection, len(student))
    assert not has.any()
    ids = torch.tensor([student("ab cdab abcd", add_special_tokens=False)["input_ids"]])
    labels = ids[:, 1:]
    alignment = align_batch(ids, None, labels, student, teacher, unmapped)
    logits = torch.randn(1, ids.shape[1] - 1, len(student), requires_grad=True)
    t_logits = torch.randn(1, alignment.teacher_inputs["input_ids"].shape[1] - 1, len(teacher))
    terms = cross_tokenizer_terms(logits, TeacherLogits(t_logits), alignment, unmapped, labels, Objective(alpha=0.5))
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"]) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "jsd"])
def test_two_models_sure_of_the_same_text_have_nothing_to_learn(byte_pair, loss_type):
    """Student "a|Ġ|cd" and teacher "a|Ġ|c|d", each all but certain of its own next token: the loss is ~0 and moves
    nothing (the student's "cd" is longer than the teacher's "c", so no teacher token alone speaks for it; the
    projection must not push it towards "c")."""
    from hf_kd.objective.losses import Objective
    from hf_kd.objective.signals import TeacherLogits
    from hf_kd.teachers.cross_tokenizer.loss import cross_tokenizer_terms

    _, student, teacher = byte_pair
    shared = shared_vocabulary(student, teacher)
    ids = student("a cd", add_special_tokens=False)["input_ids"] + [student.eos_token_id]
    assert student.convert_ids_to_tokens(ids) == ["a", "Ġ", "cd", "<eos>"]
    labels = torch.tensor([ids[1:]])
    alignment = align_batch(torch.tensor([ids]), None, labels, student, teacher, shared)
    t_ids = alignment.teacher_inputs["input_ids"][0].tolist()
    assert teacher.convert_ids_to_tokens(t_ids) == ["a", "Ġ", "c", "d", "<eos>"]
    s_logits = torch.zeros(1, len(ids) - 1, len(student))
    s_logits[0, torch.arange(len(ids) - 1), torch.tensor(ids[1:])] = 20.0
    t_logits = torch.zeros(1, len(t_ids) - 1, len(teacher))
    t_logits[0, torch.arange(len(t_ids) - 1), torch.tensor(t_ids[1:])] = 20.0
    s_logits.requires_grad_()
    terms = cross_tokenizer_terms(
        s_logits, TeacherLogits(t_logits), alignment, shared, labels, Objective(loss_type, alpha=1.0)
    )
    terms["loss"].backward()
    assert terms["loss"].item() < 1e-3 and s_logits.grad.abs().max().item() < 1e-3


def test_added_text_tokens_spell_their_bytes_and_duplicates_share_extensions(tmp_path, byte_pair):
    """An added (non-special) token of a byte-level tokenizer is text: "  " and "é" spell their UTF-8 bytes (a
    whitespace added token used to crash the sort of mixed str and bytes). A byte-fallback piece and the text piece
    that spell the same byte have the same extensions."""
    from hf_kd.teachers.cross_tokenizer.vocabulary import extensions

    _, student, teacher = byte_pair
    extra = AutoTokenizer.from_pretrained(byte_level_tokenizer(tmp_path / "extra", TEACHER_MERGES))
    extra.add_tokens(["  ", "é"])
    strings = token_strings(extra)
    assert (
        strings[extra.convert_tokens_to_ids("  ")] == b"  "
        and strings[extra.convert_tokens_to_ids("é")] == "é".encode()
    )
    shared_vocabulary(student, extra)  # builds the extensions of both without a TypeError
    sp = AutoTokenizer.from_pretrained(sentencepiece_like(tmp_path / "sp", ["▁ab"]))
    ext = extensions(token_strings(sp))
    members = lambda i: set(ext.order[ext.lo[i] : ext.hi[i]].tolist())  # noqa: E731
    assert members(sp.convert_tokens_to_ids("a")) == members(sp.convert_tokens_to_ids("<0x61>"))


@pytest.mark.parametrize("softcap,scale", [(None, None), (3.0, 0.5)])
def test_hidden_states_and_head_get_the_gradients_of_full_logits(byte_pair, softcap, scale):
    """The chunked path (hidden states + head, gradients by hand through the head, its scale and softcap) gives the
    loss and the gradients of hidden, weight and bias that autograd gives through full logits."""
    from hf_kd.models.heads import LMHeadSpec, finish_logits
    from hf_kd.objective.losses import Objective
    from hf_kd.objective.signals import StudentHidden, TeacherLogits
    from hf_kd.teachers.cross_tokenizer.loss import cross_tokenizer_terms

    _, student, teacher = byte_pair
    shared = shared_vocabulary(student, teacher)
    ids = student("ab cdab abcd a", add_special_tokens=False)["input_ids"] + [student.eos_token_id]
    labels = torch.tensor([[-100, *ids[2:]]])
    alignment = align_batch(torch.tensor([ids]), None, labels, student, teacher, shared)
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(1, len(ids) - 1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(len(student), 8, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(len(student), generator=g, dtype=torch.float64, requires_grad=True)
    t_logits = TeacherLogits(
        torch.randn(
            1, alignment.teacher_inputs["input_ids"].shape[1] - 1, len(teacher), generator=g, dtype=torch.float64
        )
    )
    objective = Objective({"forward_kl": 0.5, "reverse_kl": 0.5}, temperature=2.0, alpha=0.7)
    head = LMHeadSpec(weight, bias, softcap, scale)
    fused = cross_tokenizer_terms(
        StudentHidden(hidden, head), t_logits, alignment, shared, labels, objective, chunk_size=3
    )
    fused_grads = torch.autograd.grad(fused["loss"], [hidden, weight, bias])
    full_logits = finish_logits(hidden @ weight.T + bias, scale, softcap)
    full = cross_tokenizer_terms(full_logits, t_logits, alignment, shared, labels, objective)
    full_grads = torch.autograd.grad(full["loss"], [hidden, weight, bias])
    assert torch.allclose(fused["loss"], full["loss"], rtol=1e-12)
    for a, b in zip(fused_grads, full_grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
