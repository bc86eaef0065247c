"""``generation_backend: vllm``: a real vLLM engine on the CPU writes the student's on-policy completions.

vLLM brings its own torch build, so these tests run in the vLLM environment (``make test-vllm``; ``.ci/run`` does it
after ``make test``) and skip elsewhere. One engine serves the whole module (a start takes a few seconds here, 20-60 s
on a loaded machine): every trainer's engine reuses it, and pushes its own student's weights before its first
completion exactly as a freshly started one does. The student is a tiny Llama whose heads vLLM's CPU attention takes
(head_dim 64).
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_model, save_tiny_llama
from datasets import Dataset
from peft import LoraConfig
from test_onpolicy import KW, MAX_NEW, expected_batch, first_target, greedy, prompt_rows, reference_completion
from test_trainer import make_args, state_hash

from hf_kd import DistillationCollator, DistillationConfig, DistillationTrainer
from hf_kd.errors import SetupError
from hf_kd.training import vllm_engine
from hf_kd.training.vllm_engine import ColocatedEngine, Sampling

pytest.importorskip("vllm")  # the main environment has no vLLM: the module skips there


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("vllm") / "student", vocab_size=40, seed=7, hidden=256)


@pytest.fixture(scope="module")
def engine(student_dir):
    """The module's one engine, started by the code path a trainer's first generation takes; ``kept`` records whether
    the start left this process's RNG and thread count as they were."""
    student, threads = load_model(student_dir), torch.get_num_threads()
    torch.manual_seed(123)
    torch.set_num_threads(2)
    started = ColocatedEngine(None, 0.3)
    started.start(student)
    rng_kept = torch.equal(torch.get_rng_state(), torch.manual_seed(123).get_state())
    threads_kept = torch.get_num_threads() == 2
    torch.set_num_threads(3)  # vLLM's CPU worker replaces torch.set_num_threads with a no-op
    started.kept = rng_kept, threads_kept and torch.get_num_threads() == 3
    torch.set_num_threads(threads)
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
    plain = greedy_ids(load_model(student_dir), prompts, eos=1)
    for candidate in sorted({t for c in plain for t in c[1:4]}):
        ends = [candidate in c for c in plain]
        if any(ends) and not all(ends):
            return candidate
    pytest.fail("no token ends some completions but not all")


@pytest.fixture
def build(tmp_path, student_dir, tiny_dir, rows):
    """A trainer of a fresh copy of the student: backend vllm, on-policy (lmbda 1), batch 2, then ``overrides``."""

    def make(name="run", peft_config=None, **overrides):
        settings = dict(generation_backend="vllm", lmbda=1.0, per_device_train_batch_size=2, max_new_tokens=MAX_NEW)
        args = make_args(tmp_path / name, **{**settings, **KW, **overrides})
        teacher, data = load_model(tiny_dir["teacher"]), Dataset.from_list(rows)
        return DistillationTrainer(load_model(student_dir), teacher, args, train_dataset=data, peft_config=peft_config)

    return make


def losses(trainer):
    return [r["loss"] for r in trainer.state.log_history if "loss" in r]


def greedy_ids(model, prompts, eos):
    return [reference_completion(model, p, eos) for p in prompts]


GREEDY = dict(max_tokens=MAX_NEW, temperature=0.0)


# ---- the adapter: every version-specific vLLM call, against model.generate ----------------------------------------


def test_the_adapter_writes_what_model_generate_writes(engine, student_dir, prompts, eos):
    """Greedy ids == model.generate's (stopped at and keeping the first EOS; no stop: max_tokens); a vocabulary limit,
    seeded sampling, and weights reloaded in place. A vLLM upgrade that moves one of these calls fails here."""
    assert engine.kept == (True, True)  # the start reseeds the RNG and disables torch.set_num_threads: both undone
    student = load_model(student_dir)
    adapter = engine.adapter
    adapter.load_weights(student.state_dict().items())
    stopped = adapter.generate(prompts, Sampling(**GREEDY, stop_token_ids=(eos,)), None)
    assert stopped == greedy_ids(student, prompts, eos)
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
    moved = adapter.generate(prompts, Sampling(**GREEDY, stop_token_ids=(eos,)), None)
    assert moved != stopped and moved == greedy_ids(student, prompts, eos)


# ---- the trainer: the same completions as model.generate, before and after steps -----------------------------------


def test_completions_follow_the_student_through_its_steps(shared_engine, build, rows, prompts, eos):
    """Before training and after 3 optimizer steps: the vLLM batch == model.generate's, example by example; right after
    the last step the engine still holds the weights it last generated with, and writes other completions: the push
    is what keeps them equal."""
    trainer = build(**greedy(eos, max_steps=3))
    student, batch = trainer.model, DistillationCollator()(rows)
    before = trainer.prepare_batch(batch, 0)
    for key in ("input_ids", "attention_mask", "labels"):
        assert before[key].tolist() == expected_batch(student, rows, eos)[key].tolist(), key
    trainer.train()
    engine = trainer.generation.engine
    assert engine.stale  # marked by the callback after the last step
    unsynced = engine.adapter.generate(prompts, Sampling(**GREEDY, stop_token_ids=(eos,)), None)
    assert unsynced != greedy_ids(student, prompts, eos)  # the weights of step 2, which wrote step 3's batch
    now = expected_batch(student, rows, eos)
    assert now["input_ids"].tolist() != before["input_ids"].tolist()  # 3 steps changed the greedy completions
    after = trainer.prepare_batch(batch, 0)
    for key in ("input_ids", "attention_mask", "labels"):
        assert after[key].tolist() == now[key].tolist(), key


def test_a_greedy_on_policy_run_equals_the_generate_backend_step_for_step(shared_engine, build, eos):
    runs = {}
    for backend in ("generate", "vllm"):
        trainer = build(backend, **greedy(eos, max_steps=4, generation_backend=backend))
        trainer.train()
        lengths = [r["completion_length"] for r in trainer.state.log_history if "loss" in r]
        runs[backend] = losses(trainer), lengths, trainer.model.state_dict()
    (loss_g, len_g, weights_g), (loss_v, len_v, weights_v) = runs["generate"], runs["vllm"]
    assert len(loss_v) == 4 and loss_v == pytest.approx(loss_g, rel=1e-4)
    assert len_v == len_g and min(len_g) < MAX_NEW  # the same completions, EOS stops included
    for name, value in weights_g.items():
        torch.testing.assert_close(weights_v[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("every, pushes", [(1, 4), (2, 2)])
def test_weights_are_pushed_every_vllm_sync_steps(shared_engine, engine, build, every, pushes, monkeypatch):
    """4 generating steps: a push before the first generation, then before each one after the every-th step."""
    pushed, load = [], type(engine.adapter).load_weights
    monkeypatch.setattr(type(engine.adapter), "load_weights", lambda self, w: pushed.append(1) or load(self, w))
    build(max_new_tokens=3, max_steps=4, vllm_sync_steps=every).train()
    assert len(pushed) == pushes


def test_a_seeded_sampled_run_is_reproducible(shared_engine, build):
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("other_seed", 1)):
        trainer = build(name, max_steps=3, seed=seed)
        trainer.train()
        runs.append((losses(trainer), state_hash(trainer.model)))
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[2][0]  # sampled: another seed, other completions


def test_a_resumed_sampled_run_equals_the_straight_run(tmp_path, shared_engine, build):
    def run(name, resume=None):
        trainer = build(name, max_steps=4, save_strategy="steps", save_steps=2)
        trainer.train(resume_from_checkpoint=resume)
        return state_hash(trainer.model)

    straight = run("straight")
    assert run("resumed", resume=str(tmp_path / "straight" / "out" / "checkpoint-2")) == straight


def test_a_peft_student_pushes_merged_weights_and_keeps_its_adapters(shared_engine, build, rows, eos):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    trainer = build(peft_config=lora, **greedy(eos, max_steps=2))
    peft_model, kept = trainer.model, state_hash(trainer.model)
    batch = trainer.prepare_batch(DistillationCollator()(rows), 0)
    assert state_hash(peft_model) == kept  # merged into a copy: the trained adapters stay adapters
    assert batch["input_ids"].tolist() == expected_batch(peft_model, rows, eos)["input_ids"].tolist()
    with peft_model.disable_adapter():
        assert batch["input_ids"].tolist() != expected_batch(peft_model, rows, eos)["input_ids"].tolist()
    trainer.train()
    batch = trainer.prepare_batch(DistillationCollator()(rows), 0)
    assert batch["input_ids"].tolist() == expected_batch(peft_model, rows, eos)["input_ids"].tolist()


def test_seq_kd_teacher_completions_stay_with_generate(shared_engine, build, tiny_dir, rows, eos):
    trainer = build(**greedy(eos, lmbda=0.0, seq_kd=True))
    batch = trainer.prepare_batch(DistillationCollator()(rows), 0)
    teacher = load_model(tiny_dir["teacher"])
    assert batch["input_ids"].tolist() == expected_batch(teacher, rows, eos)["input_ids"].tolist()
    assert trainer.generation.engine.adapter is None  # the student never wrote: no engine was needed


# ---- refusals -------------------------------------------------------------------------------------------------------


def test_refusals_name_the_setting(tmp_path, build, monkeypatch):
    with pytest.raises(ValueError, match="^generation_backend must be generate or vllm, got 'sglang'$"):
        DistillationConfig(output_dir=str(tmp_path), generation_backend="sglang")
    with pytest.raises(ValueError, match="^vllm_sync_steps must be an int >= 1, got 0$"):
        DistillationConfig(output_dir=str(tmp_path), vllm_sync_steps=0)
    with pytest.raises(SetupError, match="^generation_kwargs: no_repeat_ngram_size has no vLLM equivalent"):
        build(generation_kwargs={"no_repeat_ngram_size": 2})
    with pytest.raises(SetupError, match="^generation_temperature: vLLM samples at temperatures up to 2, not 3"):
        build(generation_temperature=3.0)
    monkeypatch.setattr(vllm_engine.VLLMAdapter, "missing", staticmethod(lambda: "ModuleNotFoundError: no vllm"))
    missing = (
        r"^generation_backend: vllm cannot be imported \(ModuleNotFoundError: no vllm\); pip install vllm .*make vllm"
    )
    with pytest.raises(SetupError, match=missing):
        build()
    monkeypatch.setattr(vllm_engine, "teacher_is_sharded", lambda accelerator: True)  # as under FSDP / ZeRO-3
    with pytest.raises(SetupError, match="^generation_backend: vllm needs the whole student in one process: not unde"):
        build()
