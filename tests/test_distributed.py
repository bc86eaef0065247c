"""Data parallel is exact: 2 processes x batch 2 == 1 process x batch 4 (gloo on CPU). Processes launched together
on CPU train as one run, or stop with one line (hf_kd.models.sharding.check_world). FSDP2 / ZeRO-3: test_sharded.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def run(
    tiny_dir,
    out,
    nproc,
    batch,
    ga,
    engine="ddp",
    device="cpu",
    bf16=False,
    teacher_url=None,
    generated=None,
    evaluate=False,
    peft=False,
):
    """Train ``tiny_dir["teacher"]`` -> ``tiny_dir["student"]`` in ``nproc`` processes (tests/ddp_worker.py): rank 0's
    student weights (DDP engines; sharded ones save the student under ``out/student``) and training logs."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{WORKER.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(WORKER),
        tiny_dir["teacher"],
        tiny_dir["student"],
        str(out),
        str(batch),
        str(ga),
        "--engine",
        engine,
        "--device",
        device,
        "--tokenizer",
        tiny_dir["tokenizer"],
        *(["--bf16"] if bf16 else []),
        *(["--teacher-url", teacher_url] if teacher_url else []),
        *(["--generated", generated] if generated else []),
        *(["--evaluate"] if evaluate else []),
        *(["--peft"] if peft else []),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = json.loads((out / "logs.json").read_text())
    weights = torch.load(out / "weights.pt") if (out / "weights.pt").exists() else None
    return weights, [row for row in logs if "loss" in row]


@pytest.mark.slow
def test_two_ranks_match_one_rank(tmp_path, tiny_dir):
    single_w, single_logs = run(tiny_dir, tmp_path / "one", nproc=1, batch=4, ga=1)
    ddp_w, ddp_logs = run(tiny_dir, tmp_path / "two", nproc=2, batch=2, ga=1)
    ddp_ga_w, ddp_ga_logs = run(tiny_dir, tmp_path / "two_ga", nproc=2, batch=1, ga=2)
    assert len(single_logs) == 3
    for logs in (ddp_logs, ddp_ga_logs):
        for a, b in zip(single_logs, logs, strict=True):
            for key in ("loss", "distill_loss", "ce_loss"):
                assert b[key] == pytest.approx(a[key], rel=1e-5), key
    for weights in (ddp_w, ddp_ga_w):
        for key, value in single_w.items():
            torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # the run really moved the weights, so equality above is not trivial
    from conftest import load_model

    initial = load_model(tiny_dir["student"]).state_dict()
    assert not torch.allclose(initial["lm_head.weight"], single_w["lm_head.weight"], atol=1e-4)


@pytest.mark.slow
def test_on_policy_two_ranks_match_one_rank(tmp_path, tiny_dir):
    """lmbda 1, greedy: completions of different lengths, counted after generation, across processes."""
    single_w, single_logs = run(tiny_dir, tmp_path / "one", nproc=1, batch=4, ga=1, engine="onpolicy")
    ddp_w, ddp_logs = run(tiny_dir, tmp_path / "two", nproc=2, batch=2, ga=1, engine="onpolicy")
    assert len(single_logs) == 3 and all(row["generated_fraction"] == 1.0 for row in single_logs)
    assert any(0 < row["completion_eos_fraction"] < 1 for row in single_logs)  # early EOS in some completions
    for a, b in zip(single_logs, ddp_logs, strict=True):
        for key in ("loss", "distill_loss", "ce_loss", "completion_length", "completion_eos_fraction"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    for key, value in single_w.items():
        torch.testing.assert_close(ddp_w[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_uneven_eval_and_unlogged_train_loss_match_one_process(tmp_path, tiny_dir):
    """5 eval examples on 2 processes (the last batch padded with a repeat) and 3 steps logged only at the end."""
    worker = WORKER.with_name("ddp_eval_worker.py")
    env = {
        **os.environ,
        "PYTHONPATH": f"{WORKER.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    results = {}
    for nproc, batch in ((1, 4), (2, 2)):
        out = tmp_path / str(nproc)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(worker),
            tiny_dir["teacher"],
            tiny_dir["student"],
            str(out),
            str(batch),
        ]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        results[nproc] = json.loads((out / "result.json").read_text())
    one, two = results[1], results[2]
    for key in ("eval_loss", "eval_distill_loss", "eval_ce_loss", "eval_top1_agreement", "eval_teacher_kl"):
        assert two["eval"][key] == pytest.approx(one["eval"][key], rel=1e-5), key
    for run in (one, two):  # train_loss is the run's exact mean: alpha * distill + (1 - alpha) * ce
        s = run["summary"]
        assert s["train_loss"] == pytest.approx(0.6 * s["train_distill_loss"] + 0.4 * s["train_ce_loss"], rel=1e-5)
    assert two["summary"]["train_loss"] == pytest.approx(one["summary"]["train_loss"], rel=1e-5)


def test_bf16_autocast_on_cpu_trains_and_stays_close_to_fp32(tmp_path, tiny_dir):
    from conftest import load_model, variable_length_examples
    from datasets import Dataset
    from test_trainer import make_args

    from hf_kd import DistillationTrainer

    data = Dataset.from_list(variable_length_examples(8, seed=5))
    losses = {}
    for bf16 in (False, True):
        student = load_model(tiny_dir["student"])
        args = make_args(tmp_path / str(bf16), bf16=bf16, max_steps=2, learning_rate=0.1, temperature=2.0, alpha=0.5)
        trainer = DistillationTrainer(
            model=student, teacher_model=load_model(tiny_dir["teacher"]), args=args, train_dataset=data
        )
        trainer.train()
        losses[bf16] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        assert all(torch.isfinite(p).all() for p in student.parameters())
    assert len(losses[True]) == 2
    for low, full in zip(losses[True], losses[False]):
        assert low == pytest.approx(full, rel=3e-2) and low != full  # bf16 autocast: close, not equal


# ---- processes launched together train together, or not at all ----------------------------------------------------


def test_check_world_refuses_processes_that_would_not_train_as_asked(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from hf_kd.errors import SetupError
    from hf_kd.models.sharding import check_world

    def accelerator(processes, kind):
        return SimpleNamespace(num_processes=processes, device=torch.device("cpu"), distributed_type=kind)

    alone, together = accelerator(1, DistributedType.NO), accelerator(2, DistributedType.MULTI_CPU)
    for name in ("WORLD_SIZE", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
    check_world(alone)  # python train.py
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_world(together)  # torchrun with use_cpu: one run of two processes over gloo
    expected = (
        r"^use_cpu: 2 processes were launched but .* no distributed backend for cpu, so each would train "
        r"alone, all writing one output_dir; on CPU set use_cpu: true"
    )
    with pytest.raises(SetupError, match=expected) as err:
        check_world(alone)  # torchrun without use_cpu: two single-process runs
    assert "\n" not in str(err.value)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # an FSDP plugin, which Accelerate drops on CPU
    with pytest.raises(
        SetupError,
        match="^fsdp: Accelerate runs FSDP on GPUs only: these 2 CPU processes would "
        "train as DDP instead, each holding the whole teacher",
    ):
        check_world(together)
    check_world(accelerator(2, DistributedType.FSDP))
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_world(alone)  # FSDP on one process is a plain run


def _launch_cli(tmp_path, tiny_dir, use_cpu: bool) -> tuple[subprocess.CompletedProcess, str]:
    """`accelerate launch --multi_gpu --num_processes 2 -m hf_kd train RECIPE` as a user runs it on CPU."""
    from test_cli import prompt_completion_rows, write_jsonl, write_recipe

    data = write_jsonl(tmp_path / "train.jsonl", prompt_completion_rows(16))
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_dir, {"dataset": data}, use_cpu=use_cpu)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        "-m",
        "hf_kd",
        "train",
        recipe,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False), recipe


@pytest.mark.slow
def test_a_cpu_launch_without_use_cpu_stops_with_one_line(tmp_path, tiny_dir):
    done, recipe = _launch_cli(tmp_path, tiny_dir, use_cpu=False)
    assert done.returncode != 0
    line = f"error: {recipe}: training.use_cpu: 2 processes were launched but Accelerate found no distributed backend"
    assert done.stderr.count(line) == 2, done.stderr[-3000:]  # each process says it, before anything is written
    assert not any((tmp_path / "out").rglob("*"))  # (the Trainer itself makes the empty directory)


@pytest.mark.slow
def test_a_cpu_launch_with_use_cpu_trains_as_one_run(tmp_path, tiny_dir):
    done, _ = _launch_cli(tmp_path, tiny_dir, use_cpu=True)
    assert done.returncode == 0, done.stderr[-3000:]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| batch size (per device x accumulation x processes) | 4 x 1 x 2 |" in card  # one run of two processes


@pytest.mark.slow
def test_two_ranks_against_one_served_teacher_match_one_rank_with_the_local_teacher(tmp_path, tiny_dir):
    """Both DDP ranks ask one teacher server (hf-kd serve-teacher's server, here in this process) for their
    micro-batches' hidden states: the same training as one process with the teacher loaded."""
    pytest.importorskip("aiohttp")
    from conftest import load_model
    from test_served import serving

    single_w, single_logs = run(tiny_dir, tmp_path / "one", nproc=1, batch=4, ga=1)
    with serving(load_model(tiny_dir["teacher"])) as (url, server):
        served_w, served_logs = run(tiny_dir, tmp_path / "served", nproc=2, batch=2, ga=1, teacher_url=url)
        assert server.requests == 2 * 3  # two ranks, three steps
    for a, b in zip(single_logs, served_logs, strict=True):
        for key in ("loss", "distill_loss", "ce_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    for name, value in single_w.items():
        assert torch.allclose(value, served_w[name], rtol=1e-5, atol=1e-6), name
