"""``generation_backend: vllm``: a real vLLM engine on the CPU writes the student's on-policy completions.

vLLM brings its own torch build, so these tests run in the vLLM environment (``make test-vllm``; ``.ci/run`` does it
after ``make test``) and skip elsewhere. One engine serves the whole module (a start takes a few seconds here, 20-60 s
on a loaded machine): every trainer's engine reuses it, and pushes its own student's weights before its first
completion exactly as a freshly started one does. The student is a tiny Llama whose heads vLLM's CPU attention takes
(head_dim 64).
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from conftest import load_model, save_tiny_llama  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from test_onpolicy import KW, MAX_NEW, expected_batch, first_target, greedy, prompt_rows, reference_completion  # noqa: E402
from test_trainer import make_args, state_hash  # noqa: E402

from hf_kd import DistillationCollator, DistillationConfig, DistillationTrainer  # noqa: E402
from hf_kd.errors import SetupError  # noqa: E402
from hf_kd.training import vllm_engine  # noqa: E402
from hf_kd.training.vllm_engine import ColocatedEngine, Sampling  # noqa: E402


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("vllm") / "student", vocab_size=40, seed=7, hidden=256)


@pytest.fixture(scope="module")
def engine(student_dir):
    """The module's one engine, started (and fed) by the code path a trainer's first generation takes."""
    started = ColocatedEngine(None, 0.3)
    started.start(load_model(student_dir))
    return started


@pytest.fixture
def shared_engine(engine, monkeypatch):
    """Trainers' engines start as the module's engine: no new start, their own weights pushed first all the same."""
    monkeypatch.setattr(ColocatedEngine, "start", lambda self, model: setattr(self, "adapter", engine.adapter))


@pytest.fixture(scope="module")
def rows():
    return [{k: v for k, v in r.items() if k != "prompt_len"} for r in prompt_rows()]


@pytest.fixture(scope="module")
def prompts(rows):
    return [r["input_ids"][: first_target(r)] for r in rows]


@pytest.fixture(scope="module")
def eos(student_dir, prompts):
    """An id that ends some of the student's greedy completions early and not others."""
    plain = [reference_completion(load_model(student_dir), p, eos=1) for p in prompts]
    for candidate in sorted({t for c in plain for t in c[1:4]}):
        ends = [candidate in c for c in plain]
        if any(ends) and not all(ends):
            return candidate
    pytest.fail("no token ends some completions but not all")


def trainer_for(tmp_path, student, teacher_dir, rows, peft_config=None, **overrides):
    args = make_args(tmp_path, **{"generation_backend": "vllm", **KW, **overrides})
    return DistillationTrainer(model=student, teacher_model=load_model(teacher_dir), args=args, peft_config=peft_config,
                               train_dataset=Dataset.from_list(rows))  # fmt: skip


def losses(trainer):
    return [r["loss"] for r in trainer.state.log_history if "loss" in r]


# ---- the adapter: every version-specific vLLM call, against model.generate ----------------------------------------


def test_the_adapter_writes_generates_completions(engine, student_dir, prompts, eos):
    """Greedy ids == model.generate's (stopped at and keeping the first EOS; no stop: max_tokens); a vocabulary limit,
    seeded sampling, and weights reloaded in place. A vLLM upgrade that moves one of these calls fails here."""
    student = load_model(student_dir)
    adapter = engine.adapter
    adapter.load_weights(student.state_dict().items())
    stopped = adapter.generate(prompts, Sampling(max_tokens=MAX_NEW, temperature=0.0, stop_token_ids=(eos,)), None)
    assert stopped == [reference_completion(student, p, eos) for p in prompts]
    assert min(map(len, stopped)) < MAX_NEW == max(map(len, stopped))  # some stopped early, some did not
    unstopped = adapter.generate(prompts, Sampling(max_tokens=9, temperature=0.0), None)
    assert all(len(c) == 9 for c in unstopped)
    hot = Sampling(max_tokens=12, temperature=2.0, vocab_limit=20)
    first, again = adapter.generate(prompts, hot, list(range(6))), adapter.generate(prompts, hot, list(range(6)))
    assert first == again and max(max(c) for c in first) < 20  # seeded; the limit holds at temperature 2
    assert first != adapter.generate(prompts, hot, list(range(6, 12)))  # other seeds, other samples
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    adapter.load_weights(student.state_dict().items())
    moved = adapter.generate(prompts, Sampling(max_tokens=MAX_NEW, temperature=0.0, stop_token_ids=(eos,)), None)
    assert moved != stopped and moved == [reference_completion(student, p, eos) for p in prompts]


# ---- the trainer: the same completions as model.generate, before and after steps -----------------------------------


def test_completions_follow_the_student_through_its_steps(tmp_path, shared_engine, student_dir, tiny_dir, rows, eos):
    """Before training and after 3 optimizer steps: the vLLM batch == model.generate's, example by example; right after
    the last step the engine still holds the weights it last generated with, and writes other completions: the push
    is what keeps them equal."""
    student = load_model(student_dir)
    trainer = trainer_for(tmp_path, student, tiny_dir["teacher"], rows, **greedy(eos, lmbda=1.0, max_steps=3,
                                                                                 per_device_train_batch_size=2))  # fmt: skip
    batch = DistillationCollator()(rows)
    before = trainer.prepare_batch(batch, 0)
    assert before["input_ids"].tolist() == expected_batch(student, rows, eos)["input_ids"].tolist()
    assert before["labels"].tolist() == expected_batch(student, rows, eos)["labels"].tolist()
    trainer.train()
    engine = trainer.generation.engine
    assert engine.stale  # marked by the callback after the last step
    prompts = [r["input_ids"][: first_target(r)] for r in rows]
    unsynced = engine.adapter.generate(prompts, Sampling(max_tokens=MAX_NEW, temperature=0.0, stop_token_ids=(eos,)), None)
    now = expected_batch(student, rows, eos)
    assert unsynced != [reference_completion(student, p, eos) for p in prompts]  # the step-2 weights: stale
    assert now["input_ids"].tolist() != before["input_ids"].tolist()  # 3 steps changed the greedy completions
    after = trainer.prepare_batch(batch, 0)
    for key in ("input_ids", "attention_mask", "labels"):
        assert after[key].tolist() == now[key].tolist(), key


def test_a_greedy_on_policy_run_equals_the_generate_backend_step_for_step(tmp_path, shared_engine, student_dir,
                                                                          tiny_dir, rows, eos):  # fmt: skip
    runs = {}
    for backend in ("generate", "vllm"):
        student = load_model(student_dir)
        trainer = trainer_for(tmp_path / backend, student, tiny_dir["teacher"], rows, **greedy(
            eos, lmbda=1.0, max_steps=4, per_device_train_batch_size=2, generation_backend=backend))  # fmt: skip
        trainer.train()
        lengths = [r["completion_length"] for r in trainer.state.log_history if "loss" in r]
        runs[backend] = losses(trainer), lengths, student.state_dict()
    (loss_g, len_g, weights_g), (loss_v, len_v, weights_v) = runs["generate"], runs["vllm"]
    assert len(loss_v) == 4 and loss_v == pytest.approx(loss_g, rel=1e-4)
    assert len_v == len_g and min(len_g) < MAX_NEW  # the same completions, EOS stops included
    for name, value in weights_g.items():
        torch.testing.assert_close(weights_v[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("every, pushes", [(1, 4), (2, 2)])
def test_weights_are_pushed_every_vllm_sync_steps(tmp_path, shared_engine, engine, student_dir, tiny_dir, rows, every,
                                                   pushes, monkeypatch):  # fmt: skip
    """4 generating steps: a push before the first generation, then before each one after the every-th step."""
    pushed = []
    load = type(engine.adapter).load_weights
    monkeypatch.setattr(type(engine.adapter), "load_weights", lambda self, weights: pushed.append(1) or load(self, weights))
    trainer = trainer_for(tmp_path, load_model(student_dir), tiny_dir["teacher"], rows, lmbda=1.0, max_new_tokens=3,
                          max_steps=4, per_device_train_batch_size=2, vllm_sync_steps=every)  # fmt: skip
    trainer.train()
    assert len(pushed) == pushes


def test_a_seeded_sampled_run_is_reproducible(tmp_path, shared_engine, student_dir, tiny_dir, rows):
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("other_seed", 1)):
        student = load_model(student_dir)
        trainer = trainer_for(tmp_path / name, student, tiny_dir["teacher"], rows, lmbda=1.0, max_new_tokens=MAX_NEW,
                              max_steps=3, per_device_train_batch_size=2, seed=seed)  # fmt: skip
        trainer.train()
        runs.append((losses(trainer), state_hash(student)))
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[2][0]  # sampled: another seed, other completions


def test_a_resumed_sampled_run_equals_the_straight_run(tmp_path, shared_engine, student_dir, tiny_dir, rows):
    def run(out, resume=None):
        student = load_model(student_dir)
        trainer = trainer_for(out, student, tiny_dir["teacher"], rows, lmbda=1.0, max_new_tokens=MAX_NEW, max_steps=4,
                              per_device_train_batch_size=2, save_strategy="steps", save_steps=2)  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return state_hash(student)

    straight = run(tmp_path / "straight")
    assert run(tmp_path / "resumed", resume=str(tmp_path / "straight" / "out" / "checkpoint-2")) == straight


def test_a_peft_student_pushes_merged_weights_and_keeps_its_adapters(tmp_path, shared_engine, student_dir, tiny_dir,
                                                                     rows, eos):  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    trainer = trainer_for(tmp_path, load_model(student_dir), tiny_dir["teacher"], rows, peft_config=lora,
                          **greedy(eos, lmbda=1.0, max_steps=2))  # fmt: skip
    peft_model = trainer.model
    kept = state_hash(peft_model)
    batch = trainer.prepare_batch(DistillationCollator()(rows), 0)
    assert state_hash(peft_model) == kept  # merged into a copy: the trained adapters stay adapters
    assert batch["input_ids"].tolist() == expected_batch(peft_model, rows, eos)["input_ids"].tolist()
    with peft_model.disable_adapter():
        assert batch["input_ids"].tolist() != expected_batch(peft_model, rows, eos)["input_ids"].tolist()
    trainer.train()
    assert trainer.prepare_batch(DistillationCollator()(rows), 0)["input_ids"].tolist() == expected_batch(
        peft_model, rows, eos)["input_ids"].tolist()  # fmt: skip


def test_seq_kd_teacher_completions_stay_with_generate(tmp_path, shared_engine, student_dir, tiny_dir, rows, eos):
    trainer = trainer_for(tmp_path, load_model(student_dir), tiny_dir["teacher"], rows, **greedy(eos, seq_kd=True))
    batch = trainer.prepare_batch(DistillationCollator()(rows), 0)
    assert batch["input_ids"].tolist() == expected_batch(load_model(tiny_dir["teacher"]), rows, eos)["input_ids"].tolist()
    assert trainer.generation.engine.adapter is None  # the student never wrote: no engine was needed


# ---- refusals -------------------------------------------------------------------------------------------------------


def test_refusals_name_the_setting(tmp_path, student_dir, tiny_dir, rows, monkeypatch):
    with pytest.raises(ValueError, match="^generation_backend must be generate or vllm, got 'sglang'$"):
        DistillationConfig(output_dir=str(tmp_path), generation_backend="sglang")
    with pytest.raises(ValueError, match="^vllm_sync_steps must be an int >= 1, got 0$"):
        DistillationConfig(output_dir=str(tmp_path), vllm_sync_steps=0)
    cases = [
        ("generation_kwargs: no_repeat_ngram_size has no vLLM equivalent", {"generation_kwargs": {"no_repeat_ngram_size": 2}}),
        ("generation_temperature: vLLM samples at temperatures up to 2, not 3", {"generation_temperature": 3.0}),
    ]  # fmt: skip
    for message, overrides in cases:
        with pytest.raises(SetupError, match=f"^{message}"):
            trainer_for(tmp_path, load_model(student_dir), tiny_dir["teacher"], rows, lmbda=1.0, **overrides)
    monkeypatch.setattr(vllm_engine.VLLMAdapter, "missing", staticmethod(lambda: "ModuleNotFoundError: no vllm"))
    with pytest.raises(SetupError, match=r"^generation_backend: vllm cannot be imported \(ModuleNotFoundError: no vllm\); "
                       "pip install vllm .* `make vllm`"):  # fmt: skip
        trainer_for(tmp_path, load_model(student_dir), tiny_dir["teacher"], rows, lmbda=1.0)
    monkeypatch.setattr(vllm_engine, "teacher_is_sharded", lambda accelerator: True)  # as under FSDP / ZeRO-3
    with pytest.raises(SetupError, match="^generation_backend: vllm needs the whole student in one process: not under FSDP"):
        trainer_for(tmp_path, load_model(student_dir), tiny_dir["teacher"], rows, lmbda=1.0)
