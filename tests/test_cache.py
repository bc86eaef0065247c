"""Teacher caches: what is stored, training from them, refusing the wrong one, resuming an interrupted build."""

import json
import os

import pytest
import torch
from conftest import SPECIALS, WORDS, load_model, variable_length_examples
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import hf_kd.teachers.cache.build as cache_module
from hf_kd import DistillationCollator, DistillationConfig, DistillationTrainer
from hf_kd.teachers.cache.build import TeacherCache, build_teacher_cache, example_key
from hf_kd.teachers.cache.store import row_positions

BUILD = dict(device="cpu", progress=False)  # the teacher on CPU like the trainers below; no progress bars
LOSS_KW = dict(loss_type={"forward_kl": 0.6, "reverse_kl": 0.4}, temperature=2.0, alpha=0.7)


def make_args(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return DistillationConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def peaked_teacher(tiny_dir, tmp_path_factory):
    """The tiny teacher with a 30x sharper head: like a trained LM, its top 8 of 40 ids hold ~97% of the mass."""
    teacher = load_model(tiny_dir["teacher"])
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30.0)
    path = tmp_path_factory.mktemp("peaked") / "teacher"
    teacher.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def rows():
    return variable_length_examples(12, seed=5, min_len=4, max_len=14)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, peaked_teacher, tokenizer, rows):
    """k = 8 and k = V = 40 caches of the peaked teacher over ``rows`` (several shards, uneven batches)."""
    root = tmp_path_factory.mktemp("caches")
    data = Dataset.from_list(rows)
    return {
        k: build_teacher_cache(
            load_model(peaked_teacher),
            data,
            str(root / f"k{k}"),
            k=k,
            tokenizer=tokenizer,
            batch_size=3,
            shard_size=5,
            **BUILD,
        )
        for k in (8, 40)
    }


def test_cache_holds_the_teachers_top_k(caches, peaked_teacher, rows, tokenizer):
    cache = caches[8]
    meta = cache.metadata
    assert meta["complete"] and meta["k"] == 8 and meta["vocab_size"] == 40 and meta["num_shards"] == 3
    assert meta["teacher"] == os.path.abspath(peaked_teacher) and meta["num_examples"] == len(rows) == len(cache)
    assert cache.data.features["topk_ids"].feature.dtype == "int32"  # flat int32 / float32 lists: 8k + 4 B/position
    assert cache.data.features["topk_logprobs"].feature.dtype == "float32"
    teacher = load_model(peaked_teacher)
    for index in (0, 7, 11):  # rows of the first, second and last shard
        row, ids = cache.data[index], torch.tensor(rows[index]["input_ids"])
        assert row["key"] == example_key(ids, None, row_positions(rows[index]))  # its ids and target positions
        # targets: labels[i + 1] != -100 (the first two labels are a prompt) -> positions 1 .. n - 2
        assert row["target_spans"] == [1, len(ids) - 1]
        with torch.no_grad():
            log_p = torch.log_softmax(teacher(input_ids=ids[None]).logits[0, 1:-1], -1)
        top, top_ids = log_p.topk(8, -1)
        assert torch.equal(torch.tensor(row["topk_ids"]).view(-1, 8), top_ids.int())
        torch.testing.assert_close(torch.tensor(row["topk_logprobs"]).view(-1, 8), top, rtol=0, atol=2e-6)
        rest = [[p for i, p in enumerate(r) if i not in t] for r, t in zip(log_p.tolist(), top_ids.tolist())]
        rest = torch.tensor(rest)  # each position's log-probs outside its top 8
        torch.testing.assert_close(torch.tensor(row["tail_logprob"]), rest.logsumexp(-1), rtol=0, atol=2e-6)
        assert torch.tensor(row["tail_logprob"]).exp().max() < 0.2  # peaked: the tail is a small bucket
    assert torch.isinf(torch.tensor(caches[40].data[0]["tail_logprob"])).all()  # k = V: the tail is empty


def test_bytes_per_position_within_8k_plus_8(tmp_path, tiny_dir):
    data = Dataset.from_list(variable_length_examples(6, seed=1, min_len=100, max_len=120))
    for k in (4, 16):
        cache = build_teacher_cache(load_model(tiny_dir["teacher"]), data, str(tmp_path / str(k)), k=k, **BUILD)
        meta = cache.metadata
        assert meta["num_positions"] == sum(len(r["input_ids"]) - 2 for r in data)  # labels[1:] minus one prompt label
        assert meta["bytes_on_disk"] == sum(os.path.getsize(f["filename"]) for f in cache.data.cache_files)
        assert 8 * k + 4 < meta["bytes_per_position"] <= 8 * k + 8


@pytest.mark.parametrize("k", [40, 8], ids=["k=V", "k<V"])
def test_training_from_cache_reproduces_the_live_teacher(tmp_path, tiny_dir, peaked_teacher, caches, rows, k):
    """Three SGD steps, batch 2 x GA 2. k = V: the live run to float32 rounding (any loss, any T). k = 8 of 40
    (teacher tail mass ~3%), forward KL at T = 1: the bucketed KL misses only tail_mass * KL(teacher || student on
    the tail): logged losses within 3% (measured: distill 1.6%, loss 1.0%, grad norm 0.2%), the 3-step update
    within 5% of the live one (measured 2.3%; k = V: 3e-7)."""
    data = Dataset.from_list(rows)
    loss_kw = LOSS_KW if k == 40 else dict(loss_type="forward_kl", temperature=1.0, alpha=0.7)
    runs, evals = {}, {}
    variants = [
        ("live", {}),
        ("cache", {"teacher_cache": caches[k].path}),
        ("cache_full_logits", {"teacher_cache": caches[k].path, "loss_chunk_size": 0}),
    ]
    for name, extra in variants:
        student = load_model(tiny_dir["student"])
        args = make_args(
            tmp_path / name,
            max_steps=3,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            **loss_kw,
            **extra,
        )
        teacher = load_model(peaked_teacher) if name == "live" else None
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
        trainer.train()
        runs[name] = student.state_dict(), [r for r in trainer.state.log_history if "loss" in r]
        evals[name] = trainer.evaluate(Dataset.from_list(rows[:6]))  # cached rows too
        if name != "live":
            assert trainer.teacher_model is None and isinstance(
                trainer.teacher.cache, TeacherCache
            )  # no teacher model in memory
            assert trainer.teacher.name == os.path.abspath(peaked_teacher)
            assert trainer.use_fused_loss == (name == "cache")  # chunked over the student's lm_head by default
    # the chunked sparse loss and the sparse loss on full logits train the same student
    (w_fused, logs_fused), (w_full, logs_full) = runs["cache"], runs["cache_full_logits"]
    for fused, full in zip(logs_fused, logs_full, strict=True):
        for key in ("loss", "distill_loss", "ce_loss", "grad_norm"):
            assert fused[key] == pytest.approx(full[key], rel=1e-5), key
    for name in w_fused:
        torch.testing.assert_close(w_fused[name], w_full[name], rtol=1e-4, atol=1e-6)
    (w_live, logs_live), (w_cache, logs_cache) = runs["live"], runs["cache"]
    rel = 1e-5 if k == 40 else 0.03
    for live, cached in zip(logs_live, logs_cache, strict=True):
        for key in ("loss", "distill_loss", "ce_loss", "grad_norm"):
            assert cached[key] == pytest.approx(live[key], rel=rel), key
    for key in ("eval_distill_loss", "eval_ce_loss"):
        assert evals["cache"][key] == pytest.approx(evals["live"][key], rel=rel), key
    # how far apart the two 3-step updates are, relative to the update itself
    initial = load_model(tiny_dir["student"]).state_dict()
    update_live = torch.cat([(w_live[n] - initial[n]).flatten() for n in initial])
    update_cache = torch.cat([(w_cache[n] - initial[n]).flatten() for n in initial])
    gap = ((update_cache - update_live).norm() / update_live.norm()).item()
    assert gap < (1e-4 if k == 40 else 0.05), gap
    if k == 8:  # the bucketed KL is a different number: the comparisons above are not vacuous
        assert logs_cache[0]["distill_loss"] != pytest.approx(logs_live[0]["distill_loss"], rel=1e-3)
        assert gap > 1e-3


def _other_tokenizer():
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS[::-1])}  # the same tokens under other ids
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def test_mismatched_caches_and_data_are_refused(tmp_path, tiny_dir, caches, rows, tokenizer):
    path = caches[8].path
    student = load_model(tiny_dir["student"])
    args = make_args(tmp_path, teacher_cache=path)
    tampered = [dict(r) for r in rows]
    tampered[3] = {**rows[3], "input_ids": [5] + rows[3]["input_ids"][1:]}
    with pytest.raises(ValueError, match="no row for 1 of the 12 training examples"):
        DistillationTrainer(model=student, args=args, train_dataset=Dataset.from_list(tampered))

    trainer = DistillationTrainer(model=student, args=args, processing_class=tokenizer)  # no dataset to check up front
    assert trainer.compute_loss(student, DistillationCollator()(rows[:4])).item() > 0
    with pytest.raises(ValueError, match="batch example 3 .* not in the teacher cache"):
        trainer.compute_loss(student, DistillationCollator()(rows[:3] + [tampered[3]]))
    unmasked = [{"input_ids": r["input_ids"]} for r in rows[:2]]  # labels = ids: the prompt became a target
    with pytest.raises(ValueError, match=r"batch example 0 .* its token ids or target positions differ"):
        trainer.compute_loss(student, DistillationCollator()(unmasked))

    with pytest.raises(ValueError, match="vocabulary differs"):
        DistillationTrainer(model=student, args=args, processing_class=_other_tokenizer())
    with pytest.raises(ValueError, match="names the teacher"):
        DistillationTrainer(
            model=student, args=make_args(tmp_path, teacher_cache=path, teacher_model_name_or_path=tiny_dir["student"])
        )
    with pytest.raises(ValueError, match="covers 40 vocab rows, the student has 44"):  # no tokenizer to prove padding
        DistillationTrainer(model=load_model(tiny_dir["student_padded"]), args=args)
    with pytest.raises(ValueError, match="replaces the teacher model"):
        DistillationTrainer(model=student, teacher_model=load_model(tiny_dir["teacher"]), args=args)
    with pytest.raises(ValueError, match="mse"):
        make_args(tmp_path, teacher_cache=path, loss_type={"forward_kl": 0.5, "mse": 0.5})


def test_tampered_cache_files_are_refused(tmp_path, tiny_dir, rows, tokenizer):
    data = Dataset.from_list(rows[:4])
    path = str(tmp_path / "cache")
    build_teacher_cache(load_model(tiny_dir["teacher"]), data, path, k=4, tokenizer=tokenizer, **BUILD)
    meta_path = os.path.join(path, cache_module.METADATA_FILE)
    original = json.load(open(meta_path))

    def with_metadata(**changes):
        json.dump({**original, **changes}, open(meta_path, "w"))
        return path

    with pytest.raises(ValueError, match="format version 0"):
        TeacherCache(with_metadata(format_version=0))
    with pytest.raises(ValueError, match="incomplete"):
        TeacherCache(with_metadata(complete=False))
    with pytest.raises(ValueError, match="has 4 rows, its metadata says 5"):
        TeacherCache(with_metadata(num_examples=5))
    student = load_model(tiny_dir["student"])
    trainer = DistillationTrainer(model=student, args=make_args(tmp_path, teacher_cache=with_metadata(k=5)))
    with pytest.raises(ValueError, match="row 0 is corrupt"):
        trainer.compute_loss(student, DistillationCollator()(rows[:1]))
    with pytest.raises(ValueError, match="other settings .*k: 5 there, 4 now"):  # resuming with another k
        build_teacher_cache(load_model(tiny_dir["teacher"]), data, path, k=4, tokenizer=tokenizer, **BUILD)
    with_metadata()
    other = build_teacher_cache(
        load_model(tiny_dir["teacher_padded"]), data, str(tmp_path / "padded"), k=4, tokenizer=tokenizer, **BUILD
    )
    with pytest.raises(ValueError, match="rebuild it with vocab_size=40"):  # cache of a 48-row teacher, student 40
        DistillationTrainer(
            model=student, args=make_args(tmp_path, teacher_cache=other.path), processing_class=tokenizer
        )


def test_interrupted_build_resumes_to_an_identical_cache(tmp_path, tiny_dir, rows, tokenizer, monkeypatch):
    data = Dataset.from_list(rows[:10])  # shard_size 3: shards of 3, 3, 3, 1 examples
    kwargs = dict(k=6, tokenizer=tokenizer, batch_size=2, shard_size=3, **BUILD)
    reference = build_teacher_cache(load_model(tiny_dir["teacher"]), data, str(tmp_path / "whole"), **kwargs)

    save = cache_module._save_shard
    saved = []

    def crash_after_two(table, path):
        if len(saved) == 2:
            raise KeyboardInterrupt("simulated interruption")
        save(table, path)
        saved.append(path)

    monkeypatch.setattr(cache_module, "_save_shard", crash_after_two)
    path = str(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(load_model(tiny_dir["teacher"]), data, path, **kwargs)
    assert sorted(os.listdir(os.path.join(path, "shards"))) == ["shard-00000", "shard-00001"]
    with pytest.raises(ValueError, match="incomplete"):
        TeacherCache(path)
    monkeypatch.setattr(cache_module, "_save_shard", save)

    teacher = load_model(tiny_dir["teacher"])
    seen = []
    teacher.register_forward_hook(lambda module, args, kw, out: seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
    resumed = build_teacher_cache(teacher, data, path, **kwargs)
    assert sum(seen) == 4  # only shards 2 and 3 (3 + 1 examples) were computed again
    assert {k: v for k, v in resumed.metadata.items()} == reference.metadata
    for mine, theirs in zip(resumed.data.cache_files, reference.data.cache_files, strict=True):
        assert open(mine["filename"], "rb").read() == open(theirs["filename"], "rb").read()
    assert resumed.data[:] == reference.data[:]


@pytest.mark.parametrize("pair", [("teacher", "student"), ("teacher_padded", "student_padded")], ids=["same", "padded"])
def test_cli_caches_a_recipe_and_trains_from_it(tmp_path, tiny_dir, capsys, pair):
    """hf-kd cache-teacher RECIPE, then hf-kd train RECIPE --teacher_cache: the recipe's tokenization finds its rows;
    a padded-vocabulary pair (48 and 44 rows) gets a cache over the shared 44."""
    from hf_kd.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": " ".join(f"w{(7 * i + j) % 37}" for j in range(3 + i % 5))}) + "\n" for i in range(10)
        )
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"teacher: {{name_or_path: {tiny_dir[pair[0]]}, tokenizer: {tiny_dir['tokenizer']}}}\n"
        f"student: {{name_or_path: {tiny_dir[pair[1]]}, tokenizer: {tiny_dir['tokenizer']}}}\n"
        f"data: {{dataset: {data}, eval_size: 2, tokenizer_check_samples: 0}}\n"
        f"training: {{output_dir: {tmp_path / 'out'}, max_steps: 2, per_device_train_batch_size: 4, use_cpu: true, "
        "report_to: none, save_strategy: 'no', eval_strategy: 'no'}\n"
    )
    cache_dir = tmp_path / "cache"
    assert main(["cache-teacher", str(recipe), "--output", str(cache_dir), "--k", "8"]) == 0
    assert "10 examples" in capsys.readouterr().out  # 8 train + 2 held-out eval examples
    assert TeacherCache(str(cache_dir)).vocab_size == (44 if pair[0] == "teacher_padded" else 40)
    assert main(["train", str(recipe), "--teacher_cache", str(cache_dir)]) == 0
    marker = json.load(open(tmp_path / "out" / "training_complete.json"))
    assert marker["global_step"] == 2 and marker["resolved_recipe"]["training"]["teacher_cache"] == str(cache_dir)
    assert marker["metrics"]["eval"]["eval_distill_loss"] > 0  # the eval examples were found in the cache too


def test_recipe_teacher_cache_section(tmp_path, tiny_dir, capsys):
    """teacher.cache in a recipe: cache-teacher writes there without --output, train reads it; mistakes exit 2."""
    from hf_kd.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"w{i % 37} w{(3 * i) % 37} w5"}) + "\n" for i in range(6)))
    cache_dir = tmp_path / "cache"

    def recipe(name, teacher_extra="", student_extra=""):
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            f"teacher: {{name_or_path: {tiny_dir['teacher']}, tokenizer: {tiny_dir['tokenizer']}{teacher_extra}}}\n"
            f"student: {{name_or_path: {tiny_dir['student']}, tokenizer: {tiny_dir['tokenizer']}{student_extra}}}\n"
            f"data: {{dataset: {data}, tokenizer_check_samples: 0}}\n"
            f"training: {{output_dir: {tmp_path / name}, max_steps: 1, per_device_train_batch_size: 3, "
            "use_cpu: true, report_to: none, save_strategy: 'no'}\n"
        )
        return str(path)

    cached = recipe("cached", f", cache: {cache_dir}")
    assert main(["train", cached]) == 2  # not built yet
    assert "teacher.cache" in capsys.readouterr().err and not (tmp_path / "cached" / "training_complete.json").exists()
    assert main(["cache-teacher", cached, "--k", "4"]) == 0
    assert (cache_dir / "hf_kd_cache.json").exists()
    assert main(["train", cached]) == 0
    marker = json.load(open(tmp_path / "cached" / "training_complete.json"))
    assert marker["resolved_recipe"]["teacher"]["cache"] == str(cache_dir)
    assert main(["cache-teacher", recipe("nowhere")]) == 2  # neither --output nor teacher.cache
    assert "--output" in capsys.readouterr().err
    assert main(["train", recipe("student_cache", student_extra=f", cache: {cache_dir}")]) == 2
    assert "student.cache: only the teacher can be cached" in capsys.readouterr().err


def test_same_ids_with_other_label_masks_are_two_rows(tmp_path, tiny_dir, tokenizer):
    ids = [5, 9, 12, 7, 30, 22]
    rows = [{"input_ids": ids, "labels": [-100, -100] + ids[2:]}, {"input_ids": ids, "labels": list(ids)}]
    cache = build_teacher_cache(
        load_model(tiny_dir["teacher"]),
        Dataset.from_list(rows),
        str(tmp_path / "c"),
        k=40,
        tokenizer=tokenizer,
        **BUILD,
    )
    assert len(set(cache.data["key"])) == 2 and cache.missing(Dataset.from_list(rows)) == []
    student = load_model(tiny_dir["student"])
    cached = DistillationTrainer(
        model=student,
        args=make_args(tmp_path, teacher_cache=cache.path, loss_chunk_size=0),
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(rows),
    )
    live = DistillationTrainer(
        model=student, teacher_model=load_model(tiny_dir["teacher"]), args=make_args(tmp_path, loss_chunk_size=0)
    )
    for row in rows:  # k = V: each row's cached loss is the live teacher's
        batch = DistillationCollator()([row])
        torch.testing.assert_close(
            cached.compute_loss(student, batch), live.compute_loss(student, batch), rtol=1e-5, atol=1e-6
        )


def test_an_eval_set_without_cached_rows_is_refused_at_setup(tmp_path, tiny_dir, caches, rows, tokenizer):
    other = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]}]
    with pytest.raises(ValueError, match="teacher_cache: .* no row for 1 of the 1 eval examples"):
        DistillationTrainer(
            model=load_model(tiny_dir["student"]),
            args=make_args(tmp_path, teacher_cache=caches[8].path),
            train_dataset=Dataset.from_list(rows),
            eval_dataset=Dataset.from_list(other),
        )
