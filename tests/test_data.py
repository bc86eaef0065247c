"""Recipe data -> token ids and labels: formats, completion-only masks, truncation, packing, tokenizer agreement."""

import json

import pytest
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_kd.data import (
    DataError,
    check_tokenizers_agree,
    encode_example,
    load_raw_dataset,
    pack_dataset,
    prepare_datasets,
    tokenize_dataset,
)
from hf_kd.recipe.recipe import DataSection

SPECIALS = ["<pad>", "<eos>", "<unk>"]
MARKERS = ["U:", "A:", "END", "THINK"]
WORDS = [f"w{i}" for i in range(20)]
VOCAB = SPECIALS + MARKERS + WORDS
EOS = 1
# user turns "U: ... END", assistant turns "A: ... END"; the generation prompt is "A:"
CHAT = (
    "{% for m in messages %}{% if m['role'] == 'user' %}U: {{ m['content'] }} END {% else %}A: {{ m['content'] }} END "
    "{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}"
)
# like Qwen3: the last assistant turn gets a THINK marker, earlier ones do not -> they render differently in context
CHAT_LAST_DIFFERS = CHAT.replace(
    "{% else %}A: {{ m['content'] }} END ",
    "{% elif loop.last %}A: THINK {{ m['content'] }} END {% else %}A: {{ m['content'] }} END ",
)


def make_tokenizer(vocab=VOCAB, chat_template=CHAT):
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = chat_template
    return tok


def ids(text):
    return [VOCAB.index(t) for t in text.split()]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_text_format_appends_eos_and_trains_on_everything(tok):
    out = encode_example({"text": "w1 w2 w3"}, tok, DataSection(dataset="x"))
    assert out["input_ids"] == ids("w1 w2 w3") + [EOS]
    assert out["labels"] == out["input_ids"]
    out = encode_example({"body": "w1"}, tok, DataSection(dataset="x", text_field="body", add_eos=False))
    assert out["input_ids"] == ids("w1")


def test_prompt_completion_masks_the_prompt(tok):
    example = {"q": "w1 w2", "a": "w3 w4"}
    data = DataSection(dataset="x", format="prompt_completion", prompt_field="q", completion_field="a")
    out = encode_example(example, tok, data)
    assert out["input_ids"] == ids("w1 w2 w3 w4") + [EOS]
    assert out["labels"] == [-100, -100] + ids("w3 w4") + [EOS]
    data.completion_only = False
    assert encode_example(example, tok, data)["labels"] == out["input_ids"]


def test_messages_train_on_assistant_turns_only(tok):
    messages = [
        {"role": "user", "content": "w1 w2"},
        {"role": "assistant", "content": "w3"},
        {"role": "user", "content": "w4"},
        {"role": "assistant", "content": "w5 w6"},
    ]
    out = encode_example({"messages": messages}, tok, DataSection(dataset="x", format="messages"))
    assert out["input_ids"] == ids("U: w1 w2 END A: w3 END U: w4 END A: w5 w6 END")
    # the generation prompt "A:" belongs to the prompt; the assistant's words and its END are targets
    m = -100
    assert out["labels"] == [m, m, m, m, m] + ids("w3 END") + [m, m, m, m] + ids("w5 w6 END")


def test_messages_whose_earlier_turns_render_differently_keep_the_last_turn():
    tok = make_tokenizer(chat_template=CHAT_LAST_DIFFERS)
    messages = [
        {"role": "user", "content": "w1"},
        {"role": "assistant", "content": "w2"},
        {"role": "user", "content": "w3"},
        {"role": "assistant", "content": "w4"},
    ]
    out = encode_example({"messages": messages}, tok, DataSection(dataset="x", format="messages"))
    assert out["input_ids"] == ids("U: w1 END A: w2 END U: w3 END A: THINK w4 END")
    assert [t for t in out["labels"] if t != -100] == ids("THINK w4 END")  # w2's turn is not a stable prefix


def test_tokenized_format_passes_labels_through(tok):
    out = encode_example(
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, tok, DataSection(dataset="x", format="tokenized")
    )
    assert out == {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}
    assert encode_example({"input_ids": [5, 6]}, tok, DataSection(dataset="x", format="tokenized"))["labels"] == [5, 6]


def test_truncation_drops_examples_left_without_targets(tok):
    rows = [{"prompt": "w1 w2 w3 w4", "completion": "w5"}, {"prompt": "w1", "completion": "w2 w3"}]
    data = DataSection(dataset="x", format="prompt_completion", max_length=3, add_eos=False)
    out = tokenize_dataset(Dataset.from_list(rows), tok, data)
    # the first example keeps only its prompt after truncation -> dropped; the second keeps 2 targets
    assert out["input_ids"] == [ids("w1 w2 w3")]
    assert out["labels"] == [[-100] + ids("w2 w3")]


def test_no_trainable_tokens_is_an_error(tok):
    rows = [{"prompt": "w1 w2", "completion": ""}] * 3  # prompt-only data
    data = DataSection(dataset="x", format="prompt_completion", add_eos=False)
    with pytest.raises(DataError, match="no trainable tokens: all 3 examples"):
        tokenize_dataset(Dataset.from_list(rows), tok, data)


def test_packing_cuts_the_stream_and_keeps_masks(tok):
    rows = [{"prompt": "w1", "completion": "w2 w3"}, {"prompt": "w4 w5", "completion": "w6"}]
    data = DataSection(dataset="x", format="prompt_completion", max_length=4, packing=True)
    out = tokenize_dataset(Dataset.from_list(rows), tok, data)
    stream_ids = ids("w1 w2 w3") + [EOS] + ids("w4 w5 w6") + [EOS]
    stream_labels = [-100] + ids("w2 w3") + [EOS] + [-100, -100] + ids("w6") + [EOS]
    assert out["input_ids"] == [stream_ids[:4], stream_ids[4:]]
    assert out["labels"] == [stream_labels[:4], stream_labels[4:]]
    short = pack_dataset(Dataset.from_dict({"input_ids": [[1, 2, 3]], "labels": [[1, 2, 3]]}), 2)
    assert short["input_ids"] == [[1, 2], [3]]  # the remainder is a shorter block, not dropped


def test_missing_column_names_the_key(tok):
    with pytest.raises(DataError, match="data.text_field: the dataset has no column 'text'"):
        tokenize_dataset(Dataset.from_list([{"body": "w1"}]), tok, DataSection(dataset="x"))
    with pytest.raises(DataError, match="chat template"):
        tokenize_dataset(
            Dataset.from_list([{"messages": []}]),
            make_tokenizer(chat_template=None),
            DataSection(dataset="x", format="messages"),
        )


@pytest.mark.parametrize("extension", ["jsonl", "json", "parquet", "csv", "txt"])
def test_local_files_load(tmp_path, extension):
    rows = [{"text": "w1 w2"}, {"text": "w3"}]
    path = tmp_path / f"data.{extension}"
    frame = Dataset.from_list(rows)
    if extension == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif extension == "json":
        path.write_text(json.dumps(rows))
    elif extension == "parquet":
        frame.to_parquet(str(path))
    elif extension == "csv":
        frame.to_csv(str(path), index=False)
    else:
        path.write_text("w1 w2\nw3\n")  # one example per line, column "text"
    assert load_raw_dataset(str(path))["text"] == ["w1 w2", "w3"]


def test_prepare_datasets_holds_out_eval_and_checks_tokenizers(tmp_path, tok):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"w{i} w{i + 1}"}) + "\n" for i in range(10)))
    data = DataSection(dataset=str(path), eval_size=0.2, max_length=8)
    train, evaluation = prepare_datasets(data, tok, make_tokenizer(), seed=0)
    assert (len(train), len(evaluation)) == (8, 2)
    texts = {tuple(x) for x in list(train["input_ids"]) + list(evaluation["input_ids"])}
    assert texts == {tuple(ids(f"w{i} w{i + 1}") + [EOS]) for i in range(10)}  # a split, nothing lost or duplicated
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"text": "w7"}) + "\n")
    _, evaluation = prepare_datasets(DataSection(dataset=str(path), eval_split=str(eval_file)), tok)
    assert evaluation["input_ids"] == [ids("w7") + [EOS]]


def test_tokenizers_that_disagree_are_refused(tok):
    swapped = list(VOCAB)
    i, j = VOCAB.index("w3"), VOCAB.index("w4")
    swapped[i], swapped[j] = swapped[j], swapped[i]  # same strings, two ids exchanged
    examples = [{"text": "w1 w2"}, {"text": "w1 w3 w2"}]
    data = DataSection(dataset="x")
    assert "2 sample examples (7 tokens) tokenize identically" in check_tokenizers_agree(
        tok, make_tokenizer(), examples, data
    )
    with pytest.raises(
        DataError, match=r"sample example 1 at token 1: the student has id 10 \('w3'\), the teacher id 11"
    ):
        check_tokenizers_agree(tok, make_tokenizer(swapped), examples, data)
    # pre-tokenized data: what the ids mean must agree
    with pytest.raises(DataError, match="tokenizers"):
        check_tokenizers_agree(
            tok, make_tokenizer(swapped), [{"input_ids": [5, 10]}], DataSection(dataset="x", format="tokenized")
        )


def test_teacher_sees_the_student_chat_template(tok):
    """A teacher tokenizer without a chat template is checked on the student's rendering, not refused."""
    examples = [{"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]}]
    summary = check_tokenizers_agree(
        tok, make_tokenizer(chat_template=None), examples, DataSection(dataset="x", format="messages")
    )
    assert "1 sample examples (6 tokens)" in summary


def test_prompt_only_data_is_an_error_even_with_eos(tok):
    """An empty completion gets no EOS: prompt-only data is refused, not trained on nothing but EOS."""
    rows = [{"prompt": "w1 w2", "completion": ""}] * 3
    data = DataSection(dataset="x", format="prompt_completion")
    assert encode_example(rows[0], tok, data) == {"input_ids": ids("w1 w2"), "labels": [-100, -100]}
    with pytest.raises(DataError, match="no trainable tokens"):
        tokenize_dataset(Dataset.from_list(rows), tok, data)


def test_unloadable_data_is_a_data_error(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1"}\n{not json\n')
    with pytest.raises(DataError, match=r"^data.dataset: cannot load '.*bad.jsonl': JSON parse error"):
        prepare_datasets(DataSection(dataset=str(bad)), tok)
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "w1"}\n')
    with pytest.raises(DataError, match=r"^data.dataset: cannot load 'hf-kd-test/no-such-dataset'"):
        prepare_datasets(DataSection(dataset="hf-kd-test/no-such-dataset"), tok)  # offline: HF_HUB_OFFLINE=1
    with pytest.raises(DataError, match=r"^data.eval_split: cannot load"):
        prepare_datasets(DataSection(dataset=str(good), eval_split=str(bad)), tok)


def test_classification_format(tok):
    data = DataSection(
        dataset="x", format="classification", text_field="premise", text_pair_field="hypothesis", max_length=4
    )
    rows = [
        {"premise": "w1 w2 w3", "hypothesis": "w4 w5", "label": 2},
        {"premise": "w6", "hypothesis": "w7", "label": 0},
    ]
    out = tokenize_dataset(Dataset.from_list(rows), tok, data)
    assert out["labels"] == [2, 0]  # one label per example, never -100 or shifted
    assert [len(x) for x in out["input_ids"]] == [4, 2]  # truncated by the tokenizer to max_length
    assert out["input_ids"][1] == ids("w6 w7")
    with pytest.raises(DataError, match="data.label_field: the dataset has no column 'label'"):
        tokenize_dataset(Dataset.from_list([{"premise": "w1", "hypothesis": "w2"}]), tok, data)
    with pytest.raises(DataError, match="data.label_field: labels must be class ids"):
        encode_example({"premise": "w1", "hypothesis": "w2", "label": "positive"}, tok, data)


def test_prompt_format_renders_a_user_turn_up_to_the_generation_prompt(tok, tmp_path):
    data = DataSection(dataset="x", format="prompt")
    out = encode_example({"prompt": "w1 w2"}, tok, data)
    assert out["input_ids"] == ids("U: w1 w2 END A:") and out["labels"] == [-100] * 5  # nothing but the prompt
    conversation = [
        {"role": "user", "content": "w1"},
        {"role": "assistant", "content": "w2"},
        {"role": "user", "content": "w3"},
    ]
    assert encode_example({"prompt": conversation}, tok, data)["input_ids"] == ids("U: w1 END A: w2 END U: w3 END A:")
    base = make_tokenizer(chat_template=None)  # no template: the text as it is
    assert encode_example({"prompt": "w1 w2"}, base, data)["input_ids"] == ids("w1 w2")
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"w{i}"}) for i in range(4)))
    data = DataSection(dataset=str(path), format="prompt")
    with pytest.raises(DataError, match="data.format: prompt-only data has no completions to distill on"):
        prepare_datasets(data, tok)
    train, evaluation = prepare_datasets(data, tok, every_batch_generated=True)  # prompt-only examples are kept
    assert len(train) == 4 and evaluation is None
    with pytest.raises(DataError, match="data.eval_size: prompt-only data has no targets to evaluate on"):
        prepare_datasets(
            DataSection(dataset=str(path), format="prompt", eval_size=0.5), tok, every_batch_generated=True
        )
