"""A teacher in another process: the hidden-state server, its client teacher kind, and the CLI on both ends."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import load_model, variable_length_examples
from test_cli import prompt_completion_rows, write_jsonl, write_recipe
from test_trainer import make_args

pytest.importorskip("aiohttp", reason="the teacher server needs aiohttp (the serve extra)")

from hf_kd import DistillationCollator, DistillationTrainer  # noqa: E402
from hf_kd.errors import SetupError  # noqa: E402
from hf_kd.teachers.served.server import HiddenStateServer, Limits, _Pending  # noqa: E402
from hf_kd.teachers.served.teacher import TeacherClient  # noqa: E402


@contextlib.contextmanager
def serving(model, port: int = 0, **kwargs):
    """``HiddenStateServer(model, **kwargs)`` on localhost (a free port unless given) in a background thread; yields
    (url, server)."""
    from aiohttp import web

    server = HiddenStateServer(model, name="tiny-teacher", **kwargs)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(server.app())
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


def batch_of(rows):
    return DistillationCollator(pad_token_id=0)(rows)


@pytest.mark.parametrize("chunk", [0, 8])
def test_a_served_teacher_trains_the_student_exactly_as_the_local_teacher(tmp_path, tiny_dir, chunk):
    """Two optimizer steps (GA 2) from the same start: the student's weights after training with the teacher in
    another process equal those after training with it in this one (to float32 rounding: the server may batch the
    step's two requests into one forward of another shape)."""
    from datasets import Dataset

    data = Dataset.from_list(variable_length_examples(16, seed=5))
    hashes, losses = [], []
    with serving(load_model(tiny_dir["teacher"])) as (url, server):
        for teacher in ("local", "served"):
            student = load_model(tiny_dir["student"])
            kwargs = {"teacher_kind": "served", "teacher_options": {"url": url}} if teacher == "served" else {}
            args = make_args(
                tmp_path / teacher,
                max_steps=2,
                gradient_accumulation_steps=2,
                loss_chunk_size=chunk,
                loss_type={"forward_kl": 0.5, "reverse_kl": 0.5},
                temperature=2.0,
                alpha=0.7,
                **kwargs,
            )
            trainer = DistillationTrainer(
                model=student,
                args=args,
                train_dataset=data,
                teacher_model=load_model(tiny_dir["teacher"]) if teacher == "local" else None,
            )
            trainer.train()
            hashes.append([p.detach().clone() for p in student.parameters()])
            losses.append([log["loss"] for log in trainer.state.log_history if "loss" in log])
        assert server.requests == 4  # every micro-batch of the served run went through the server
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for a, b in zip(*hashes):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_the_server_refuses_bad_requests_and_wrong_tokens(tmp_path, tiny_dir):
    with serving(load_model(tiny_dir["teacher"]), token="s3cret", limits=Limits(max_request_tokens=20)) as (url, _):
        with urllib.request.urlopen(url + "/health") as response:  # no token needed
            assert json.load(response) == {"status": "ok"}
        with pytest.raises(SetupError, match="HTTP 401"):
            TeacherClient(url, token="wrong").info()
        client = TeacherClient(url, token="s3cret")
        info = client.info()
        assert (info["vocab_size"], info["hidden_size"], info["dtype"]) == (40, 48, "float32")
        with pytest.raises(SetupError, match="HTTP 413.*at most 20"):
            client.hidden(torch.ones(3, 8, dtype=torch.long), torch.ones(3, 8, dtype=torch.long), "float32")
        with pytest.raises(SetupError, match=r"HTTP 400.*token ids must be in \[0, 40\)"):
            client.hidden(torch.full((1, 4), 40), torch.ones(1, 4, dtype=torch.long), "float32")
        bf16 = client.hidden(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long), "bfloat16")
        assert bf16.dtype == torch.bfloat16 and bf16.shape == (1, 4, 48)


def test_concurrent_clients_get_their_own_answers_and_batching_changes_nothing(tiny_dir):
    """Several ranks at once: each answer equals that request's answer alone; a batched forward of requests of
    different lengths equals their forwards one by one."""
    teacher = load_model(tiny_dir["teacher"])
    batches = [batch_of(variable_length_examples(n, seed=n, max_len=6 + 2 * n)) for n in (1, 2, 3, 4)]
    with serving(teacher) as (url, server):
        client = TeacherClient(url)
        alone = [client.hidden(b["input_ids"], b["attention_mask"], "float32") for b in batches]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda b: client.hidden(b["input_ids"], b["attention_mask"], "float32"), batches))
        pending = [_Pending(b["input_ids"], b["attention_mask"], torch.float32, None) for b in batches]
        batched = server._forward(pending)
    for a, b, c, batch in zip(alone, together, batched, batches):
        mask = batch["attention_mask"].bool()
        assert torch.allclose(a[mask], b[mask], atol=1e-5) and torch.allclose(a[mask], c[mask], atol=1e-5)


def test_a_served_teacher_with_another_tokenizer_or_no_server_is_refused(tmp_path, tiny_dir, tokenizer):
    student = load_model(tiny_dir["student"])
    args = make_args(tmp_path, teacher_kind="served", teacher_options={"url": "http://127.0.0.1:9"})
    with pytest.raises(SetupError, match="cannot be reached"):
        import hf_kd.teachers.served.teacher as served

        served.RETRIES, retries = 0, served.RETRIES
        try:
            DistillationTrainer(model=student, args=args)
        finally:
            served.RETRIES = retries
    with serving(load_model(tiny_dir["teacher"]), tokenizer_hash="not-the-students") as (url, _):
        args = make_args(tmp_path, teacher_kind="served", teacher_options={"url": url})
        with pytest.raises(SetupError, match="reads another tokenizer"):
            DistillationTrainer(model=student, args=args, processing_class=tokenizer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_teacher_and_train_through_the_cli(tmp_path, tiny_dir, capsys):
    """`hf-kd serve-teacher DIR --token-file F` in one process, `hf-kd train` with `teacher: {url, token_file}` in
    another: the run finishes and its card names the served teacher."""
    from hf_kd.cli import COMPLETE_MARKER, main

    token = tmp_path / "token"
    token.write_text("abc123\n")
    port = free_port()
    teacher_dir = tiny_dir["teacher"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    server = subprocess.Popen(
        [sys.executable, "-m", "hf_kd", "serve-teacher", teacher_dir, "--port", str(port), "--token-file", str(token)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(600):  # up to a minute for torch and transformers to import
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()
                time.sleep(0.1)
        section = {"url": f"http://127.0.0.1:{port}", "token_file": str(token)}
        data = {"dataset": write_jsonl(tmp_path / "train.jsonl", prompt_completion_rows(12))}
        path = write_recipe(tmp_path / "recipe.yaml", tiny_dir, data, teacher_section=section, loss_chunk_size=8)
        assert main(["train", str(path)]) == 0, capsys.readouterr().err
        assert (tmp_path / "out" / COMPLETE_MARKER).exists()
        assert f"served ({teacher_dir} at http://127.0.0.1:{port}" in (tmp_path / "out" / "README.md").read_text()
    finally:
        server.terminate()
        server.wait(30)


def test_a_server_restarted_mid_run_is_waited_for_and_another_model_is_refused(tiny_dir, monkeypatch):
    """A client retries with backoff while its server is away (connections refused, then a busy 503: it goes on);
    a server that comes back with another model is refused by the head's hash on its answer."""
    import urllib.error

    import hf_kd.teachers.served.teacher as served

    sleeps = []
    monkeypatch.setattr(served.time, "sleep", sleeps.append)  # the backoff, recorded instead of waited
    ids, mask = torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)
    with serving(load_model(tiny_dir["teacher"])) as (url, _):
        client = TeacherClient(url)
        client.head(client.info()["head"])
        before = client.hidden(ids, mask, "float32")
        real_urlopen, failures = (
            urllib.request.urlopen,
            [
                urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")),
                urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")),
                urllib.error.HTTPError(url, 503, "busy", {}, None),
            ],
        )

        def restarting(request, timeout=None):
            if failures:
                raise failures.pop(0)
            return real_urlopen(request, timeout=timeout)

        monkeypatch.setattr(served.urllib.request, "urlopen", restarting)
        assert torch.equal(client.hidden(ids, mask, "float32"), before) and sleeps == [1, 2, 4]
    with serving(load_model(tiny_dir["teacher_padded"])) as (other_url, _):  # another model at the address
        client.url = other_url
        with pytest.raises(served.TeacherUnavailable, match="now serves another model"):
            client.hidden(ids, mask, "float32")


def test_a_server_gone_for_good_stops_the_run_with_one_line(tmp_path, tiny_dir, files_dir, capsys, monkeypatch):
    """The server stops answering after the first checkpoint: `hf-kd train` exits 1 with one line that names the
    checkpoint and the command that resumes; the step the teacher could not answer is not applied."""
    import hf_kd.teachers.served.teacher as served
    from hf_kd.cli import main

    monkeypatch.setattr(served, "RETRIES", 0)
    stop = threading.Event()
    with serving(load_model(tiny_dir["teacher"])) as (url, server):
        real = served.TeacherClient.hidden

        def hidden(self, *args):
            if stop.is_set():
                raise SetupError("teacher_options", f"teacher server {self.url} cannot be reached (gone)")
            return real(self, *args)

        monkeypatch.setattr(served.TeacherClient, "hidden", hidden)
        from transformers import TrainerCallback

        class StopServer(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                stop.set()

        import hf_kd.training.trainer as trainer_module

        original_init = trainer_module.DistillationTrainer.__init__

        def init(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            self.add_callback(StopServer())

        monkeypatch.setattr(trainer_module.DistillationTrainer, "__init__", init)
        path = write_recipe(
            tmp_path / "recipe.yaml",
            tiny_dir,
            {"dataset": files_dir},
            teacher_section={"url": url},
            max_steps=4,
            save_strategy="steps",
            save_steps=1,
        )
        assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {path}: training stopped: teacher server {url} cannot be reached")
    assert f"the last checkpoint is {tmp_path / 'out' / 'checkpoint-1'}; resume with: hf-kd train" in err[-1]
    assert (
        not (tmp_path / "out" / "checkpoint-2").exists() and not (tmp_path / "out" / "training_complete.json").exists()
    )


@pytest.fixture
def files_dir(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", prompt_completion_rows(16))


def test_a_served_teacher_of_another_tokenizer_distills_across_tokenizers(tmp_path, tiny_dir, tokenizer):
    """The server gets the teacher's own ids: the same loss and gradients as the same teacher in this process."""
    from test_cross_tokenizer import permuted_teacher, permuted_wordlevel
    from transformers import AutoTokenizer

    from hf_kd.teachers.cache.store import tokenizer_hash

    perm_dir, new_id_of = permuted_wordlevel(tmp_path / "perm", seed=3)
    permuted = permuted_teacher(load_model(tiny_dir["teacher"]), new_id_of)
    batch = batch_of(
        [
            {"input_ids": r, "labels": [-100] + r[1:]}
            for r in (tokenizer(t)["input_ids"] for t in ("w3 w5 w7 w9 w2 <eos>", "w4 w4 w10"))
        ]
    )
    results = []
    with serving(permuted, tokenizer_hash=tokenizer_hash(AutoTokenizer.from_pretrained(perm_dir))) as (url, server):
        for where in ("local", "served"):
            student = load_model(tiny_dir["student"])
            kwargs = {"teacher_kind": "served", "teacher_options": {"url": url}} if where == "served" else {}
            args = make_args(tmp_path, loss_chunk_size=8, alpha=0.6, teacher_tokenizer_name_or_path=perm_dir, **kwargs)
            trainer = DistillationTrainer(
                model=student,
                args=args,
                processing_class=tokenizer,
                teacher_model=permuted if where == "local" else None,
            )
            assert type(trainer.teacher).__name__ == "CrossTokenizerTeacher"
            loss = trainer.compute_loss(student, dict(batch))
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
        assert server.requests == 1
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-6)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_review_fixes_batching_limits_empty_requests_token_paths_and_prefetch(tmp_path, tiny_dir, monkeypatch):
    """A forward's size counts its padding; an empty request is refused alone; `~` in token_file; at most AHEAD
    micro-batches asked for ahead of the loss."""
    import hf_kd.teachers.served.teacher as served
    from hf_kd.teachers.served.server import fits
    from hf_kd.training.batch import Batch

    # [32, 256] and [1, 8192] are 8k tokens each, but padded together they are 33 x 8192 = 270k
    assert fits(32, 256, torch.Size([1, 8192]), 65536) is False and fits(32, 256, torch.Size([4, 256]), 65536)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "token").write_text("s3cret\n")
    with serving(load_model(tiny_dir["teacher"]), token="s3cret") as (url, server):
        with pytest.raises(SetupError, match="HTTP 400.*empty batch"):
            TeacherClient(url, token="s3cret").hidden(torch.ones(1, 0, dtype=torch.long), torch.ones(1, 0), "float32")
        args = make_args(tmp_path, teacher_kind="served", teacher_options={"url": url, "token_file": "~/token"})
        trainer = DistillationTrainer(model=load_model(tiny_dir["student"]), args=args)
        teacher = trainer.teacher
        rows = variable_length_examples(2, seed=1)
        batches = [Batch.of(batch_of(rows), trainer.task_spec) for _ in range(5)]
        for batch in batches:
            teacher.prefetch(batch)
        asked = [id(teacher) in batch.teacher_answers for batch in batches]
        assert asked == [True, True, False, False, False] and teacher._asked == served.AHEAD
        teacher.run(batches[0], None, None)  # its turn: the third is asked for now
        assert [id(teacher) in b.teacher_answers for b in batches[1:]] == [True, True, False, False]
        teacher.run(batches[4], None, None)  # run before it was asked for: asked now, never again
        assert all(b is not batches[4] for b in teacher._waiting) and len(teacher._waiting) == 1


def test_a_mixture_object_made_in_python_trains_and_refuses_mse(tmp_path, tiny_dir):
    """A MixtureTeacher made in Python and handed over as teacher_model: the trainer attaches it (its task, its
    refusals); mixed with itself it is that teacher."""
    from hf_kd.teachers import MixtureTeacher, ModelTeacher

    members = [ModelTeacher(load_model(tiny_dir["teacher"]), "a", None) for _ in range(2)]
    student, batch = load_model(tiny_dir["student"]), batch_of(variable_length_examples(2, seed=1))
    with pytest.raises(SetupError, match="mse compares raw logits"):  # refused at setup, as from a recipe
        DistillationTrainer(
            model=student, teacher_model=MixtureTeacher(members), args=make_args(tmp_path, loss_type="mse")
        )
    trainer = DistillationTrainer(model=student, teacher_model=MixtureTeacher(members), args=make_args(tmp_path))
    expected = DistillationTrainer(model=student, teacher_model=members[0].model, args=make_args(tmp_path))
    assert torch.allclose(
        trainer.compute_loss(student, batch), expected.compute_loss(student, batch), rtol=1e-5, atol=1e-7
    )


def test_an_answer_cut_short_is_retried(monkeypatch):
    """http.client.IncompleteRead (the server went away mid-answer) is retried like a refused connection."""
    import http.client

    import hf_kd.teachers.served.teacher as served

    sleeps, calls = [], []
    monkeypatch.setattr(served.time, "sleep", sleeps.append)

    class Answer:
        headers = {"X-Test": "1"}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            calls.append(1)
            if len(calls) == 1:
                raise http.client.IncompleteRead(b"par", 10)
            return b"whole"

    monkeypatch.setattr(served.urllib.request, "urlopen", lambda request, timeout=None: Answer())
    assert TeacherClient("http://127.0.0.1:1")._exchange("/info", None)[0] == b"whole"
    assert len(calls) == 2 and sleeps == [1]


def test_a_vllm_teacher_never_sends_an_empty_prompt():
    """A fully masked row (and a one-token row) has no position to score: it is left out of the request, its rows are
    the filler, and the other rows' answers land on their own rows."""
    from hf_kd.teachers.served.vllm import VLLMTeacher

    sent = []

    class Client:
        url = "http://vllm"

        def post(self, path, payload):
            sent.append(payload["prompt"])
            entry = {str(t): {"rank": r + 1, "logprob": -1.0 - r} for r, t in enumerate((5, 6))}
            return {"choices": [{"index": i, "prompt_logprobs": [None] + [entry] * 9} for i in range(2)][::-1]}

    teacher = VLLMTeacher(Client(), "m", top_k=2, vocab=40)
    ids = torch.arange(24).reshape(4, 6) + 3
    mask = torch.tensor([[1] * 6, [0] * 6, [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    signal = teacher.run({"input_ids": ids, "attention_mask": mask}, None, None)
    assert sent == [[ids[0].tolist(), ids[2, :3].tolist()]]
    assert signal.topk_ids[0].tolist() == [[5, 6]] * 5 and signal.topk_ids[2, :2].tolist() == [[5, 6]] * 2
    assert signal.topk_ids[1].eq(0).all() and signal.topk_ids[3].eq(0).all()  # fillers, never read
    teacher.run({"input_ids": ids[1:2], "attention_mask": mask[1:2]}, None, None)
    assert len(sent) == 1  # nothing to score: no request at all
