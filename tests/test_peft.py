"""PEFT students: LoRA wrapping, the fused loss through adapters, self-distillation, adapter and merged saving."""

import importlib.util
import os

import pytest
import torch
from conftest import load_model, variable_length_examples
from datasets import Dataset
from peft import LoraConfig, PeftModel
from test_trainer import make_args, state_hash
from transformers import AutoModelForCausalLM

from hf_kd import DistillationCollator, DistillationTrainer, distillation_loss
from hf_kd.models.adapters import qlora_quantization_config
from hf_kd.teachers import SelfTeacher

LOSS_KW = dict(loss_type={"forward_kl": 0.5, "tvd": 0.5}, temperature=2.0, alpha=0.6)


@pytest.fixture(scope="module")
def batch():
    return DistillationCollator()(variable_length_examples(4, seed=5, min_len=4, max_len=12))


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def lora(**kwargs):
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **kwargs)


def base_weights(peft_model):
    """The base model's tensors inside a PeftModel, by their plain names (q_proj.base_layer.weight -> q_proj.weight)."""
    state = peft_model.get_base_model().state_dict()
    return {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}


def reference_loss(student, teacher, batch, **kw):
    """The objective on full logits from two independent forwards (position i predicts token i + 1)."""
    s, t = logits(student.eval(), batch), logits(teacher.eval(), batch)
    return distillation_loss(s[:, :-1], t[:, :-1], batch["labels"][:, 1:], **kw)


def test_peft_student_loss_and_training_fused_and_full_logits(tmp_path, tiny_dir, batch):
    """B = 0 at init, so the first loss is the plain student's; fused and full-logit training then agree."""
    ds = Dataset.from_list(variable_length_examples(8, seed=7))
    expected = reference_loss(load_model(tiny_dir["student"]), load_model(tiny_dir["teacher"]), batch, **LOSS_KW)
    adapters = {}
    for chunk in (0, 6):
        trainer = DistillationTrainer(
            model=load_model(tiny_dir["student"]),
            peft_config=lora(),
            train_dataset=ds,
            teacher_model=load_model(tiny_dir["teacher"]),
            args=make_args(
                tmp_path / str(chunk),
                per_device_train_batch_size=4,
                gradient_accumulation_steps=2,
                loss_chunk_size=chunk,
                **LOSS_KW,
            ),
        )
        assert trainer.use_fused_loss == bool(chunk)
        torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), expected, rtol=1e-5, atol=1e-6)
        trainer.train()
        adapters[chunk] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert all(w.abs().sum() > 0 for w in adapters[0].values())  # the adapters moved off B = 0
    for name, weight in adapters[0].items():
        torch.testing.assert_close(adapters[6][name], weight, rtol=1e-4, atol=1e-6, msg=name)


def test_lora_on_lm_head_falls_back_to_full_logits(tmp_path, tiny_dir, batch, caplog):
    teacher = load_model(tiny_dir["teacher"])
    with caplog.at_level("WARNING", logger="hf_kd.training.trainer"):
        trainer = DistillationTrainer(
            model=load_model(tiny_dir["student"]),
            teacher_model=teacher,
            peft_config=lora(target_modules=["q_proj", "lm_head"], init_lora_weights=False),
            args=make_args(tmp_path, loss_chunk_size=8, **LOSS_KW),
        )
    assert not trainer.use_fused_loss
    assert "wrapped by a PEFT adapter" in caplog.text
    expected = reference_loss(trainer.model, teacher, batch, **LOSS_KW)  # random B: the adapters change the logits
    torch.testing.assert_close(trainer.compute_loss(trainer.model.train(), batch), expected, rtol=1e-5, atol=1e-6)


# ---- self-distillation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [0, 5], ids=["full_logits", "fused"])
def test_self_teacher_is_the_base_model_with_adapters_off(tmp_path, tiny_dir, batch, chunk):
    student = load_model(tiny_dir["student"])
    pointers = {name: p.data_ptr() for name, p in student.named_parameters()}
    base = load_model(tiny_dir["student"])  # an independent copy of the base model, for reference only
    kw = dict(LOSS_KW, alpha=0.5)
    trainer = DistillationTrainer(
        model=student,
        peft_config=lora(init_lora_weights=False),  # random B: student != base
        args=make_args(tmp_path, teacher_model_name_or_path="self", loss_chunk_size=chunk, learning_rate=0.1, **kw),
        train_dataset=Dataset.from_list(variable_length_examples(8, seed=9)),
    )
    assert isinstance(trainer.teacher, SelfTeacher) and trainer.use_fused_loss == bool(chunk)

    # one copy of the weights: the teacher is the student's module, whose base tensors are the loaded model's own
    assert trainer.teacher_model is trainer.model
    model_storages = {p.data_ptr() for p in trainer.model.parameters()}
    assert {p.data_ptr() for p in trainer.teacher_model.parameters()} <= model_storages
    assert {name: t.data_ptr() for name, t in base_weights(trainer.model).items()} == pointers
    assert len(model_storages) == len(pointers) + 2 * 2 * 2  # + lora_A, lora_B on q_proj, v_proj in 2 layers

    key = "final_hidden_state" if chunk else "logits"  # the fused path reads the teacher's final hidden states
    expected_teacher = base_output(base, batch, key)
    attention = [m for m in trainer.model.modules() if hasattr(m, "attention_dropout")]
    for module in attention:
        module.attention_dropout = 0.5  # in training mode the student drops out; the teacher must not
    trainer.model.train()
    torch.testing.assert_close(trainer.teacher_forward(batch)[key], expected_teacher, rtol=0, atol=1e-6)
    for module in attention:
        module.attention_dropout = 0.0
    assert trainer.model.training  # the teacher forward ran in eval mode and restored training mode
    student_logits = logits(trainer.model, batch)
    assert not torch.allclose(student_logits, logits(base, batch), atol=1e-3)  # the adapters are back on
    expected = distillation_loss(student_logits[:, :-1], logits(base, batch)[:, :-1], batch["labels"][:, 1:], **kw)
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), expected, rtol=1e-5, atol=1e-6)

    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert any(not torch.equal(p, lora_before[n]) for n, p in trainer.model.named_parameters() if p.requires_grad)
    # after training the teacher is still exactly the base model: the base weights never moved
    torch.testing.assert_close(trainer.teacher_forward(batch)[key], expected_teacher, rtol=0, atol=1e-6)


def base_output(base, batch, key):
    with torch.no_grad():
        if key == "logits":
            return logits(base, batch)
        return base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def test_self_teacher_needs_adapters(tmp_path, tiny_dir):
    student = load_model(tiny_dir["student"])
    with pytest.raises(ValueError, match="has no adapters"):
        DistillationTrainer(model=student, teacher_model="self", args=make_args(tmp_path))
    with pytest.raises(ValueError, match="teacher_model='self'"):
        DistillationTrainer(model=student, teacher_model=student, peft_config=lora(), args=make_args(tmp_path))


# ---- saving -------------------------------------------------------------------------------------------------------


def _trained(tmp_path, tiny_dir, peft_config, **overrides):
    args = make_args(tmp_path, max_steps=2, optim="adamw_torch", learning_rate=1e-2, **overrides)
    trainer = DistillationTrainer(
        model=load_model(tiny_dir["student"]),
        teacher_model=load_model(tiny_dir["teacher"]),
        peft_config=peft_config,
        args=args,
        train_dataset=Dataset.from_list(variable_length_examples(8, seed=4)),
    )
    trainer.train()
    return trainer


def test_lora_student_trains_only_adapters_and_saves_them(tmp_path, tiny_dir, batch):
    config = lora()
    trainer = _trained(tmp_path, tiny_dir, config)
    assert isinstance(trainer.model, PeftModel)
    assert config.target_modules is None  # the caller's config is not modified
    assert trainer.model.peft_config["default"].target_modules == {"q_proj", "v_proj"}  # PEFT's Llama default
    assert not any(
        "lora_" in name for name, _ in trainer.teacher_model.named_parameters()
    )  # the teacher is never wrapped
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    initial = load_model(tiny_dir["student"]).state_dict()
    assert all(torch.equal(t, initial[name]) for name, t in base_weights(trainer.model).items())  # adapters trained
    trained = logits(trainer.model.eval(), batch)
    assert not torch.allclose(trained, logits(load_model(tiny_dir["student"]), batch), atol=1e-4)  # it did learn

    trainer.save_model()
    out = tmp_path / "out"
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    assert "model.safetensors" not in files  # adapters only, not the base weights
    loaded = PeftModel.from_pretrained(load_model(tiny_dir["student"]), out)
    torch.testing.assert_close(logits(loaded, batch), trained, rtol=0, atol=1e-6)


def test_adapters_of_a_student_given_by_a_relative_path_load_from_anywhere(tmp_path, tiny_dir, batch, monkeypatch):
    """PEFT records the student's name_or_path as the adapters' base model: a relative one (``./student``) would
    only resolve from the directory training ran in."""
    import json
    import shutil

    from peft import AutoPeftModelForCausalLM

    shutil.copytree(tiny_dir["student"], tmp_path / "run" / "student")
    monkeypatch.chdir(tmp_path / "run")
    student = AutoModelForCausalLM.from_pretrained("./student", dtype=torch.float32)
    args = make_args(tmp_path, max_steps=2, optim="adamw_torch", learning_rate=1e-2)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=load_model(tiny_dir["teacher"]),
        peft_config=lora(),
        args=args,
        train_dataset=Dataset.from_list(variable_length_examples(8, seed=4)),
    )
    trainer.train()
    trainer.save_model()
    trained = logits(trainer.model.eval(), batch)
    out = tmp_path / "out"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "run" / "student")

    os.makedirs(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(logits(loaded, batch), trained, rtol=0, atol=1e-6)


def test_save_merged_copies_and_leaves_the_trained_model_alone(tmp_path, tiny_dir, batch):
    trainer = _trained(
        tmp_path,
        tiny_dir,
        lora(target_modules=["q_proj", "v_proj", "down_proj"]),
        save_merged=True,
        save_strategy="steps",
        save_steps=2,
    )
    trained = logits(trainer.model.eval(), batch)
    before = state_hash(trainer.model)
    trainer.save_model()
    out = tmp_path / "out"
    files = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "README.md"} <= files and "adapter_config.json" not in files
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any("lora" in name for name in merged.state_dict())
    torch.testing.assert_close(logits(merged, batch), trained, rtol=1e-5, atol=1e-5)
    # the live model was not merged: bit-identical weights, adapters still separate, same outputs
    assert state_hash(trainer.model) == before
    assert isinstance(trainer.model, PeftModel)
    assert not trainer.model.get_base_model().model.layers[0].mlp.down_proj.merged
    assert torch.equal(logits(trainer.model, batch), trained)
    # the checkpoint the Trainer wrote during training holds the adapters, to resume from
    checkpoint = set(os.listdir(out / "checkpoint-2"))
    assert "adapter_model.safetensors" in checkpoint and "model.safetensors" not in checkpoint


def test_qlora_needs_bitsandbytes_and_cuda(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def bitsandbytes_installed(installed):
        spec = object() if installed else None
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a: spec if name == "bitsandbytes" else real_find_spec(name, *a)
        )

    bitsandbytes_installed(False)
    with pytest.raises(RuntimeError, match="pip install bitsandbytes"):
        qlora_quantization_config()
    bitsandbytes_installed(True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        qlora_quantization_config()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = qlora_quantization_config(torch.bfloat16)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
