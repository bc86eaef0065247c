"""FSDP2 and DeepSpeed ZeRO-3 on two CPU processes (gloo): the sharded run is the plain run (the fused loss, and greedy
on-policy / seq_kd completions, on gathered heads and weights), and no process ever holds more than its share of the
teacher.

The pair is the hard case: a padded-vocabulary pair of two architectures (a Qwen2 teacher with tied embeddings and 48
rows, a Llama student with 44 rows, one 40-token tokenizer), so each model wraps its own decoder layers and the
vocabulary check must read full shapes from partitioned ZeRO-3 weights. FSDP on CPU processes needs a test-only patch
of Accelerate (tests/ddp_worker.py: ``allow_fsdp_on_cpu``); ZeRO-3 needs ``deepspeed`` (skipped without it).
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import load_model
from test_distributed import run
from transformers import AutoModelForCausalLM, Qwen2Config

PROCESSES = 2
SHIPPED = Path(__file__).parents[1] / "recipes" / "accelerate"
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (pip install deepspeed)"
)


def save_tiny_qwen2(path, vocab_size: int, seed: int, hidden: int = 48) -> str:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def mixed_pair(tiny_dir, tmp_path_factory):
    """Qwen2 teacher (48 rows, tied) -> Llama student (44 rows), the 40-token tokenizer: two kinds of layer."""
    teacher = save_tiny_qwen2(tmp_path_factory.mktemp("qwen2") / "teacher", vocab_size=48, seed=3)
    return {"tokenizer": tiny_dir["tokenizer"], "teacher": teacher, "student": tiny_dir["student_padded"]}


@pytest.fixture(scope="module")
def plain_run(mixed_pair, tmp_path_factory):
    """One process, batch 4, the fused loss: what every sharded run must reproduce."""
    out = tmp_path_factory.mktemp("plain")
    weights, logs = run(mixed_pair, out, nproc=1, batch=4, ga=1, evaluate=True)
    assert json.loads((out / "teacher.0.json").read_text())["fused"]
    return weights, logs, eval_metrics(out)


def eval_metrics(out) -> dict:
    """The evaluation's row of a run's logs (``--evaluate``)."""
    (row,) = [row for row in json.loads((out / "logs.json").read_text()) if "eval_loss" in row]
    return row


@pytest.fixture(scope="module")
def plain_generated(mixed_pair, tmp_path_factory):
    """One process, batch 4, every batch completed greedily (by the student, or the teacher for seq_kd); with
    ``peft``, a LoRA student."""
    runs = {}

    def get(generated, peft=False):
        if (generated, peft) not in runs:
            out = tmp_path_factory.mktemp(f"plain_{generated}{'_peft' if peft else ''}")
            runs[generated, peft] = run(mixed_pair, out, nproc=1, batch=4, ga=1, generated=generated, peft=peft)
        return runs[generated, peft]

    return get


def assert_like_plain(out, plain, processes, rel=1e-5, atol=1e-6):
    """The sharded run in ``out`` against the plain run: losses, the saved student, the teacher's share per rank."""
    plain_weights, plain_logs = plain[:2]
    logs = [row for row in json.loads((out / "logs.json").read_text()) if "loss" in row]
    assert len(logs) == len(plain_logs) == 3
    for a, b in zip(plain_logs, logs, strict=True):
        for key in ("loss", "distill_loss", "ce_loss"):
            assert b[key] == pytest.approx(a[key], rel=rel), key
    saved = load_model(str(out / "student")).state_dict()  # gathered to a full state dict, through from_pretrained
    assert saved.keys() == plain_weights.keys()
    for name, value in plain_weights.items():
        torch.testing.assert_close(saved[name].float(), value.float(), rtol=rel, atol=atol, msg=name)
    for rank in range(processes):
        info = json.loads((out / f"teacher.{rank}.json").read_text())
        assert info["world"] == processes and info["fused"]  # the sharded heads are gathered for the chunked loss
        assert info["vocab_size"] == 44  # the padded rows were seen (ZeRO-3 loads 0-row placeholders)
        share = info["full"] / processes
        # Each rank holds its 1/n, before training and after it. Tolerance 2%: a unit left gathered after the teacher's
        # forward (FSDP2's root / Accelerate's norm + tied-embedding unit here) shows as +5% on this pair.
        for when in ("before", "after"):
            assert abs(info[when] - share) <= 0.02 * share, (when, info)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp", pytest.param("zero3", marks=needs_deepspeed)])
def test_sharded_run_matches_a_plain_run_and_each_rank_holds_its_share(tmp_path, mixed_pair, plain_run, engine):
    run(mixed_pair, tmp_path, nproc=PROCESSES, batch=4 // PROCESSES, ga=1, engine=engine, evaluate=True)
    assert_like_plain(tmp_path, plain_run, PROCESSES)
    # evaluation (5 rows on 2 ranks): both heads gathered without a gradient, for the loss and the agreement metrics
    sharded = eval_metrics(tmp_path)
    for key in ("eval_loss", "eval_distill_loss", "eval_ce_loss", "eval_top1_agreement", "eval_teacher_kl"):
        assert sharded[key] == pytest.approx(plain_run[2][key], rel=1e-5), key


@pytest.mark.slow
@pytest.mark.parametrize("generated", ["onpolicy", "seq_kd"])
@pytest.mark.parametrize("engine", ["fsdp", pytest.param("zero3", marks=needs_deepspeed)])
def test_generation_on_sharded_weights_matches_a_plain_run(tmp_path, mixed_pair, plain_generated, engine, generated):
    """Greedy completions by the sharded student (lmbda 1) or teacher (seq_kd), each forward of generate gathering
    the weights on both ranks, of different lengths per rank (some end early): the plain run's, step for step, with
    and without gradient accumulation."""
    plain = plain_generated(generated)
    # seq_kd in 2 micro-batches of 1 per process (gradient accumulation): still the one-process batch of 4
    batch, ga = (4 // PROCESSES, 1) if generated == "onpolicy" else (1, 4 // PROCESSES)
    run(mixed_pair, tmp_path, nproc=PROCESSES, batch=batch, ga=ga, engine=engine, generated=generated)
    assert_like_plain(tmp_path, plain, PROCESSES)
    logs = [row for row in json.loads((tmp_path / "logs.json").read_text()) if "loss" in row]
    assert all(row["generated_fraction"] == 1.0 for row in logs)
    for a, b in zip(plain[1], logs, strict=True):
        for key in ("completion_length", "completion_eos_fraction"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), key
    if generated == "onpolicy":  # completions of different lengths: the ranks' generate loops must stay in step
        assert any(0 < row["completion_eos_fraction"] < 1 for row in logs)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp", pytest.param("zero3", marks=needs_deepspeed)])
def test_peft_student_on_sharded_weights_matches_a_plain_run(tmp_path, mixed_pair, plain_generated, engine):
    """A LoRA student, on-policy (greedy): generation through the PeftModel, the fused loss on its gathered head."""
    _, plain_logs = plain_generated("onpolicy", peft=True)
    out = tmp_path / engine
    run(mixed_pair, out, nproc=PROCESSES, batch=4 // PROCESSES, ga=1, engine=engine, generated="onpolicy", peft=True)
    logs = [row for row in json.loads((out / "logs.json").read_text()) if "loss" in row]
    assert len(logs) == len(plain_logs) == 3
    for a, b in zip(plain_logs, logs, strict=True):  # steps 2 and 3 score completions of the updated adapters
        for key in ("loss", "distill_loss", "ce_loss", "completion_length"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert all(json.loads((out / f"teacher.{rank}.json").read_text())["fused"] for rank in range(PROCESSES))
    assert plain_logs[0]["loss"] != plain_logs[2]["loss"]  # the adapters moved


def test_fsdp1_falls_back_to_full_logits_with_a_reason(tmp_path, tiny_dir, monkeypatch, caplog):
    """FSDP1's flat parameters are not gathered for the chunked loss: full logits, and the log says why."""
    import hf_kd.training.preflight
    from hf_kd import DistillationConfig, DistillationTrainer

    monkeypatch.setattr(hf_kd.training.preflight, "sharded_engine", lambda accelerator: "fsdp1")
    with caplog.at_level("WARNING", logger="hf_kd.training.preflight"):
        trainer = DistillationTrainer(
            model=load_model(tiny_dir["student"]),
            teacher_model=load_model(tiny_dir["teacher"]),
            args=DistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True),
        )
    assert not trainer.use_fused_loss
    assert "FSDP1 keeps the lm_head in flat parameters that the loss cannot gather; use fsdp_version 2" in caplog.text


@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero3"])
def test_shipped_accelerate_configs_load(name):
    """recipes/accelerate/*.yaml parse as Accelerate configs; fsdp.yaml is the one the FSDP2 runs above use."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(SHIPPED / f"{name}.yaml"))
    assert config.distributed_type.name == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero3": "DEEPSPEED"}[name]
    fsdp, zero = config.fsdp_config, config.deepspeed_config
    if name == "fsdp":  # FSDP2 with no layer-class list: teacher and student of different architectures both work
        assert fsdp["fsdp_version"] == 2 and "fsdp_transformer_layer_cls_to_wrap" not in fsdp
    if name == "zero3":  # the student is gathered into a full state dict on save, which from_pretrained loads
        assert zero["zero_stage"] == 3 and zero["zero3_save_16bit_model"]
