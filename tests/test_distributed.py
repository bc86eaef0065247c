"""Data parallel is exact: 2 processes x batch 2 == 1 process x batch 4 (gloo on CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def run(tiny_dir, out, nproc, batch, ga, engine="ddp"):
    env = {**os.environ, "PYTHONPATH": f"{WORKER.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
           tiny_dir["teacher"], tiny_dir["student"], str(out), str(batch), str(ga), engine]
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


def test_bf16_autocast_on_cpu_trains_and_stays_close_to_fp32(tmp_path, tiny_dir):
    from datasets import Dataset
    from test_trainer import make_args

    from conftest import load_model, variable_length_examples
    from hf_kd import DistillationTrainer

    data = Dataset.from_list(variable_length_examples(8, seed=5))
    losses = {}
    for bf16 in (False, True):
        student = load_model(tiny_dir["student"])
        args = make_args(tmp_path / str(bf16), bf16=bf16, max_steps=2, learning_rate=0.1, temperature=2.0, alpha=0.5)
        trainer = DistillationTrainer(model=student, teacher_model=load_model(tiny_dir["teacher"]), args=args,
                                      train_dataset=data)
        trainer.train()
        losses[bf16] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        assert all(torch.isfinite(p).all() for p in student.parameters())
    assert len(losses[True]) == 2
    for low, full in zip(losses[True], losses[False]):
        assert low == pytest.approx(full, rel=3e-2) and low != full  # bf16 autocast: close, not equal
