"""On-policy (lmbda) and sequence-level (seq_kd) distillation: generated completions, their labels, exact updates."""

import pytest
import torch
from conftest import load_model
from datasets import Dataset
from peft import LoraConfig
from test_trainer import make_args, state_hash

from hf_kd import DistillationCollator, DistillationTrainer, distillation_loss
from hf_kd.training.generation import on_policy

MAX_NEW = 6
KW = dict(loss_type="reverse_kl", temperature=1.0, alpha=0.8)


def prompt_rows(n=6, seed=0):
    """Examples with prompts of 1-4 tokens and a completion (labels -100 on the prompt)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt_len, length = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(6, 10, (1,), generator=g))
        ids = torch.randint(3, 40, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt_len + ids[prompt_len:], "prompt_len": prompt_len})
    return rows


def reference_completion(model, prompt, eos):
    """``model.generate`` on one prompt, greedy, cut after its first EOS: the independent path."""
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=MAX_NEW,
        eos_token_id=eos,
        pad_token_id=0,
    )[0, len(prompt) :]
    out = out.tolist()
    return out[: out.index(eos) + 1] if eos in out else out


@pytest.fixture(scope="module")
def rows():
    return [{k: v for k, v in r.items() if k != "prompt_len"} for r in prompt_rows()]


@pytest.fixture(scope="module")
def eos(tiny_dir, rows):
    """An EOS id that ends some greedy completions early and not others (random tiny models rarely emit id 1)."""
    student = load_model(tiny_dir["student"])
    plain = [reference_completion(student, r["input_ids"][: first_target(r)], eos=1) for r in rows]
    for candidate in sorted({t for c in plain for t in c[1:4]}):
        ends = [candidate in c for c in plain]
        if any(ends) and not all(ends):
            return candidate
    pytest.fail("no token ends some completions but not all")


def first_target(row):
    return next(i for i, label in enumerate(row["labels"]) if i > 0 and label != -100)


def greedy(eos, **overrides):
    return dict(max_new_tokens=MAX_NEW, generation_kwargs={"do_sample": False, "eos_token_id": eos}, **overrides)


def expected_batch(model, rows, eos):
    """The batch the loss must see, built example by example: prompt + completion, labels on the completion only."""
    built = []
    for row in rows:
        prompt = row["input_ids"][: first_target(row)]
        completion = reference_completion(model, prompt, eos)
        built.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
    return DistillationCollator()(built)


@pytest.mark.parametrize("seq_kd", [False, True], ids=["student", "teacher"])
def test_greedy_completions_are_generate_example_by_example(tmp_path, tiny_dir, rows, eos, seq_kd):
    student, teacher = load_model(tiny_dir["student"]), load_model(tiny_dir["teacher"])
    args = make_args(tmp_path, **greedy(eos, lmbda=0.0 if seq_kd else 1.0, seq_kd=seq_kd))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    batch = trainer.prepare_batch(DistillationCollator()(rows), 0)
    expected = expected_batch(teacher if seq_kd else student, rows, eos)
    for key in ("input_ids", "attention_mask", "labels"):  # prompt, completion to its EOS, padding: all -100 but it
        assert batch[key].tolist() == expected[key].tolist(), key
    lengths = (expected["labels"] != -100).sum(-1)
    assert lengths.min() < MAX_NEW and lengths.max() == MAX_NEW  # early EOS in some rows, not all: a real test
    other = expected_batch(student if seq_kd else teacher, rows, eos)
    assert batch["input_ids"].tolist() != other["input_ids"].tolist()  # whose completions these are matters


def test_one_on_policy_sgd_step_equals_a_float64_reference(tmp_path, tiny_dir, rows, eos):
    student = load_model(tiny_dir["student"])
    reference = load_model(tiny_dir["student"]).double()
    teacher = load_model(tiny_dir["teacher"])
    batch = expected_batch(load_model(tiny_dir["student"]), rows[:4], eos)  # completions of the initial student
    trainer = DistillationTrainer(
        model=student,
        teacher_model=load_model(tiny_dir["teacher"]),
        train_dataset=Dataset.from_list(rows[:4]),
        args=make_args(tmp_path, **greedy(eos, lmbda=1.0), **KW),
    )
    trainer.train()
    # by hand, in float64: the loss on the generated sequences, one SGD step of 0.5
    s = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        t = teacher.double()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = distillation_loss(s[:, :-1], t[:, :-1], batch["labels"][:, 1:], **KW)  # logits at i predict token i + 1
    loss.backward()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(
            dict(student.named_parameters())[name].double(), p.detach() - 0.5 * p.grad, rtol=1e-5, atol=1e-6, msg=name
        )
    logged = trainer.state.log_history[0]
    assert logged["generated_fraction"] == 1.0
    assert logged["completion_length"] == pytest.approx((batch["labels"][:, 1:] != -100).sum().item() / 4)
    assert 0 < logged["completion_eos_fraction"] < 1 and 0 < logged["generation_time_share"] < 1


def test_lmbda_0_is_the_off_policy_update_bit_for_bit(tmp_path, tiny_dir, rows):
    hashes = []
    for overrides in ({}, {"lmbda": 0.0, "max_new_tokens": 3, "generation_temperature": 0.7}):
        student = load_model(tiny_dir["student"])
        trainer = DistillationTrainer(
            model=student,
            teacher_model=load_model(tiny_dir["teacher"]),
            args=make_args(tmp_path, max_steps=2, **KW, **overrides),
            train_dataset=Dataset.from_list(rows),
        )
        trainer.train()
        hashes.append(state_hash(student))
    assert hashes[0] == hashes[1]


def test_on_policy_draws_are_deterministic_and_follow_lmbda():
    draws = [on_policy(0, step, micro, 0.3) for step in range(200) for micro in range(4)]
    assert draws == [on_policy(0, step, micro, 0.3) for step in range(200) for micro in range(4)]
    assert 0.25 < sum(draws) / len(draws) < 0.35
    assert draws != [on_policy(1, step, micro, 0.3) for step in range(200) for micro in range(4)]
    assert not any(on_policy(0, s, 0, 0.0) for s in range(50)) and all(on_policy(0, s, 0, 1.0) for s in range(50))


@pytest.mark.parametrize("chunk", [0, 5], ids=["full_logits", "fused"])
def test_gradient_accumulation_is_exact_on_generated_batches(tmp_path, tiny_dir, rows, eos, chunk):
    weights = {}
    for name, bs, ga in (("b4ga1", 4, 1), ("b1ga4", 1, 4), ("b2ga2", 2, 2)):
        student = load_model(tiny_dir["student"])
        args = make_args(
            tmp_path / name,
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            loss_chunk_size=chunk,
            train_sampling_strategy="sequential",
            **greedy(eos, lmbda=1.0),
            **KW,
        )
        trainer = DistillationTrainer(
            model=student,
            teacher_model=load_model(tiny_dir["teacher"]),
            args=args,
            train_dataset=Dataset.from_list(rows[:4]),
        )
        trainer.train()
        weights[name] = student.state_dict()
    initial = load_model(tiny_dir["student"]).state_dict()
    assert not torch.allclose(initial["lm_head.weight"], weights["b4ga1"]["lm_head.weight"])
    for name in ("b1ga4", "b2ga2"):
        for key, value in weights["b4ga1"].items():
            torch.testing.assert_close(weights[name][key], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_resumed_on_policy_run_equals_the_straight_run(tmp_path, tiny_dir, rows, eos, sampled):
    def run(out, resume=None):
        student = load_model(tiny_dir["student"])
        # sampled: every step generates, the first resumed one included (its completions draw on the restored RNG)
        generation = dict(max_new_tokens=MAX_NEW, lmbda=1.0) if sampled else greedy(eos, lmbda=0.5)
        args = make_args(
            out, max_steps=4, per_device_train_batch_size=2, save_strategy="steps", save_steps=2, **generation, **KW
        )
        trainer = DistillationTrainer(
            model=student,
            teacher_model=load_model(tiny_dir["teacher"]),
            args=args,
            train_dataset=Dataset.from_list(rows),
        )
        trainer.train(resume_from_checkpoint=resume)
        return state_hash(student), [r.get("generated_fraction") for r in trainer.state.log_history if "loss" in r]

    straight, fractions = run(tmp_path / "straight")
    assert set(fractions) == ({1.0} if sampled else {0.0, 1.0})  # greedy: lmbda 0.5 generated some steps, not others
    resumed, _ = run(tmp_path / "resumed", resume=str(tmp_path / "straight" / "out" / "checkpoint-2"))
    assert resumed == straight


def test_peft_student_generates_with_its_adapters_and_self_teacher_without(tmp_path, tiny_dir, rows, eos):
    student = load_model(tiny_dir["student"])
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"], init_lora_weights=False
    )
    args = make_args(
        tmp_path,
        teacher_model_name_or_path="self",
        gradient_checkpointing=True,
        max_steps=2,
        **greedy(eos, lmbda=1.0, seq_kd=True),
        **KW,
    )
    trainer = DistillationTrainer(model=student, peft_config=lora, args=args, train_dataset=Dataset.from_list(rows))
    peft_model = trainer.model
    on_policy_batch = trainer.prepare_batch(DistillationCollator()(rows), 0)  # lmbda 1: the student, adapters on
    assert on_policy_batch["input_ids"].tolist() == expected_batch(peft_model, rows, eos)["input_ids"].tolist()
    with peft_model.disable_adapter():
        base = expected_batch(peft_model, rows, eos)
    trainer.args.lmbda = 0.0  # now every batch is seq_kd: the self teacher (adapters off) writes it
    assert trainer.prepare_batch(DistillationCollator()(rows), 0)["input_ids"].tolist() == base["input_ids"].tolist()
    assert base["input_ids"].tolist() != on_policy_batch["input_ids"].tolist()
    trainer.args.lmbda = 1.0
    trainer.train()  # gradient checkpointing on: generation still runs (the KV cache in eval mode)
    assert trainer.state.global_step == 2 and peft_model.training


def test_refused_combinations(tmp_path, tiny_dir, rows):
    from hf_kd import DistillationConfig

    with pytest.raises(ValueError, match="lmbda: a teacher cache cannot score new samples"):
        DistillationConfig(output_dir=str(tmp_path), teacher_cache=str(tmp_path), lmbda=0.5)
    with pytest.raises(ValueError, match="lmbda must be in"):
        DistillationConfig(output_dir=str(tmp_path), lmbda=1.5)
    with pytest.raises(ValueError, match="generation_kwargs: not transformers.GenerationConfig settings: bogus"):
        DistillationConfig(output_dir=str(tmp_path), generation_kwargs={"bogus": 1})
    prompt_only = Dataset.from_list(
        [{"input_ids": r["input_ids"], "labels": [-100] * len(r["input_ids"])} for r in rows]
    )
    with pytest.raises(ValueError, match="train_dataset: no trainable tokens: all 6 examples .* set lmbda 1 or seq_kd"):
        DistillationTrainer(
            model=load_model(tiny_dir["student"]),
            teacher_model=load_model(tiny_dir["teacher"]),
            args=make_args(tmp_path, lmbda=0.5),
            train_dataset=prompt_only,
        )
    # every batch generated: prompt-only data trains
    trainer = DistillationTrainer(
        model=load_model(tiny_dir["student"]),
        teacher_model=load_model(tiny_dir["teacher"]),
        args=make_args(tmp_path, lmbda=1.0, max_new_tokens=3),
        train_dataset=prompt_only,
    )
    trainer.train()
    assert trainer.state.log_history[0]["completion_length"] > 0


def test_fsdp1_is_refused_with_one_line(tmp_path, tiny_dir, monkeypatch):
    """FSDP2 and ZeRO-3 generate (tests/test_sharded.py); FSDP1 is the one sharded engine refused."""
    import hf_kd.training.preflight

    monkeypatch.setattr(hf_kd.training.preflight, "sharded_engine", lambda accelerator: "fsdp1")
    for field, overrides in (("lmbda", {"lmbda": 0.5}), ("seq_kd", {"seq_kd": True})):
        with pytest.raises(ValueError, match=f"^{field}: generation under FSDP1 is not supported; use FSDP2"):
            DistillationTrainer(
                model=load_model(tiny_dir["student"]),
                teacher_model=load_model(tiny_dir["teacher"]),
                args=make_args(tmp_path, **overrides),
            )


def test_generation_stays_in_the_shared_vocabulary(tiny_dir):
    from hf_kd.training.generation import complete, generation_config

    teacher = load_model(tiny_dir["teacher_padded"])  # 48 rows, of which the student shares 44
    config = generation_config(teacher, {"max_new_tokens": 12, "do_sample": True, "temperature": 50.0}, 0)
    torch.manual_seed(0)
    free = complete(teacher, [[5, 6], [7, 8, 9]] * 8, config, "cpu")
    torch.manual_seed(0)
    limited = complete(teacher, [[5, 6], [7, 8, 9]] * 8, config, "cpu", vocab_limit=44)
    assert max(max(c) for c in free) >= 44  # at temperature 50 the padding rows do get sampled
    assert max(max(c) for c in limited) < 44


def test_unsafe_generation_settings_and_packing_are_refused(tmp_path, tokenizer):
    from hf_kd import DistillationConfig
    from hf_kd.data import DataError, prepare_datasets
    from hf_kd.recipe.recipe import DataSection

    for bad in ({"num_return_sequences": 2}, {"num_beams": 4}, {"return_dict_in_generate": True}):
        with pytest.raises(ValueError, match="generation_kwargs: num_return_sequences, num_beams"):
            DistillationConfig(output_dir=str(tmp_path), lmbda=1.0, generation_kwargs=bad)
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "w1", "completion": "w2 w3"}\n' * 4)
    data = DataSection(dataset=str(path), format="prompt_completion", packing=True, max_length=8)
    with pytest.raises(DataError, match="data.packing: a packed block mixes examples"):
        prepare_datasets(data, tokenizer, generates=True)
    long_prompt = DataSection(dataset=str(path), format="prompt", prompt_field="prompt", max_length=2)
    path.write_text('{"prompt": "w1 w2 w3 w4"}\n')
    train, _ = prepare_datasets(long_prompt, tokenizer, every_batch_generated=True)
    assert train[0]["input_ids"] == tokenizer("w3 w4")["input_ids"]  # a long prompt keeps its end


def test_no_eos_stop_generates_to_max_new_tokens(tiny_dir, tmp_path):
    from hf_kd import DistillationConfig
    from hf_kd.training.generation import complete, generation_config

    student = load_model(tiny_dir["student"])
    student.generation_config.eos_token_id = 3  # greedy completions of this tiny model hit 3 early
    config = generation_config(student, {"max_new_tokens": 9, "do_sample": False, "eos_token_id": None}, 0)
    completions = complete(student, [[5, 6], [7, 8, 9]], config, "cpu")
    assert [len(c) for c in completions] == [9, 9]  # None means "no EOS stop", not the model's default EOS
    with pytest.raises(ValueError, match="generation_kwargs: top_k cannot be None"):
        DistillationConfig(output_dir=str(tmp_path), lmbda=1.0, generation_kwargs={"top_k": None})
