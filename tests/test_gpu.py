"""FSDP2 and DeepSpeed ZeRO-3 on CUDA: the teacher is sharded like the student, training matches a plain run, and the
saved student (gathered to a full state dict) reloads with from_pretrained.

Skipped without CUDA (CPU FSDP is not something Accelerate offers); DeepSpeed tests also need `deepspeed` installed.
Run on a GPU machine with `python -m pytest tests/test_gpu.py -q`.
"""

import importlib.util
import json

import pytest
import torch
from test_distributed import run

from conftest import load_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _gpus() -> int:
    return min(torch.cuda.device_count(), 2)


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_sharded_engines_match_a_plain_run_and_save_a_full_student(tmp_path, tiny_dir, engine):
    if engine == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    n = _gpus()
    plain_w, plain_logs = run(tiny_dir, tmp_path / "plain", nproc=1, batch=4, ga=1, engine="gpu")
    _, logs = run(tiny_dir, tmp_path / engine, nproc=n, batch=4 // n, ga=1, engine=engine)
    for a, b in zip(plain_logs, logs, strict=True):
        for key in ("loss", "distill_loss", "ce_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-3), key
    info = json.loads((tmp_path / engine / "teacher.json").read_text())
    assert info["world"] == n and not info["fused"]  # a sharded lm_head: full logits, with a logged reason
    if n > 1:  # each rank holds about 1/n of the teacher
        assert info["local"] <= info["full"] / n * 1.1, info
    saved = load_model(str(tmp_path / engine / "student"))
    for name, value in plain_w.items():  # the gathered student is the plain run's student
        torch.testing.assert_close(saved.state_dict()[name].float(), value.float(), rtol=1e-3, atol=1e-4, msg=name)
