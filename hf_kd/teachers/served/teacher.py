"""The ``served`` teacher: a teacher that lives in another process (``hf-kd serve-teacher``), asked over HTTP for the
final hidden states of each micro-batch. With its head (fetched once) the loss is the same as a local teacher's:
the fused loss builds the teacher's logits chunk by chunk from them, exactly as for a model in this process.

The request for a micro-batch is sent as soon as the batch exists (:meth:`ServedTeacher.prefetch`, from
``get_batch_samples``) and answered while the student runs its forward; :meth:`run` waits for it.
"""

from __future__ import annotations

import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from hf_kd.errors import SetupError
from hf_kd.models.heads import LMHeadSpec
from hf_kd.models.loading import num_outputs
from hf_kd.objective.signals import TeacherHidden
from hf_kd.teachers.model import shared_vocab_size, student_tokenizer
from hf_kd.teachers.registry import Teacher, register_teacher
from hf_kd.teachers.served.wire import DTYPES, TOKEN_HEADER, digest, head_metadata, pack, unpack

logger = logging.getLogger(__name__)
RETRIES = 5  # a busy (503) or unreachable server is retried this often, 1, 2, 4, ... s apart
AHEAD = 2  # micro-batches asked for ahead of the loss: each answer is [B, S, H] held in host memory until its turn


class TeacherUnavailable(RuntimeError):
    """The teacher server failed during training (unreachable after every retry, or now serving another model): the
    run stops at this step; nothing of the step is applied."""


class TeacherClient:
    """The HTTP side: ``/info``, ``/head`` and ``/hidden`` of a teacher server, with the token and retries."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 600.0):
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout
        self.head_hash: str | None = None  # set by head(): every answer must come from that head's model

    def _call(self, path: str, body: bytes | None = None) -> bytes:
        data, headers = self._exchange(path, body)
        sent = headers.get("X-Head-Hash")
        if path.startswith("/hidden") and self.head_hash is not None and sent != self.head_hash:
            raise TeacherUnavailable(
                f"teacher server {self.url} now serves another model (head {str(sent)[:12]}, "
                f"not {self.head_hash[:12]}); restart it with the teacher this run started "
                "with"
            )
        return data

    def _exchange(self, path: str, body: bytes | None, json_body: bool = False) -> tuple[bytes, dict]:
        request = urllib.request.Request(self.url + path, data=body, method="POST" if body is not None else "GET")
        if json_body:
            request.add_header("Content-Type", "application/json")
        if self.token is not None:
            request.add_header(TOKEN_HEADER, f"Bearer {self.token}")
        for attempt in range(RETRIES + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read(), dict(response.headers)
            except urllib.error.HTTPError as err:
                message = err.read().decode(errors="replace")
                if err.code != 503 or attempt == RETRIES:
                    raise SetupError(
                        "teacher_options", f"teacher server {self.url}{path}: HTTP {err.code}: {message}"
                    ) from None
            # an answer cut short (IncompleteRead, a bad status line) is a server that went away mid-answer: retried
            except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as err:
                if attempt == RETRIES:
                    reason = getattr(err, "reason", err)
                    raise SetupError(
                        "teacher_options",
                        f"teacher server {self.url} cannot be reached ({reason}); "
                        "start it with hf-kd serve-teacher, or check url",
                    ) from None
            time.sleep(2**attempt)
        raise AssertionError("unreachable")

    def info(self) -> dict:
        import json

        return json.loads(self._call("/info"))

    def head(self, expected_hash: str) -> LMHeadSpec:
        """The head; its bytes must hash to what ``/info`` said (a server restarted with another model is refused)."""
        import json

        data = self._call("/head")
        if digest(data) != expected_hash:
            raise SetupError("teacher_options", f"teacher server {self.url}: the head changed since /info; restart")
        self.head_hash = expected_hash
        tensors, metadata = unpack(data), head_metadata(data)
        return LMHeadSpec(
            tensors["weight"], tensors.get("bias"), json.loads(metadata["softcap"]), json.loads(metadata["logit_scale"])
        )

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, dtype: str) -> torch.Tensor:
        """``[B, S, H]`` final hidden states of the teacher for a batch, in ``dtype``."""
        body = pack({"input_ids": input_ids.long(), "attention_mask": attention_mask.long()})
        return unpack(self._call(f"/hidden?dtype={dtype}", body))["hidden"]


@register_teacher
class ServedTeacher(Teacher):
    """``teacher_options``: ``url`` (required), ``token_file`` (the server's token), ``dtype`` of the hidden states
    sent (default: the server's). Recipes: ``teacher: {url: http://host:8600, token_file: ...}``."""

    kind = "served"

    def __init__(self, client: TeacherClient, info: dict, head: LMHeadSpec, dtype: str, vocab_size: int | None):
        self.client, self.info, self.head, self.dtype = client, info, head, dtype
        self.name, self.vocab_size = info["model"], vocab_size
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hf_kd-served")
        self._heads_on: dict[str, LMHeadSpec] = {}  # the head per device, moved once
        self._waiting: list = []  # prefetched batches not asked for yet (at most AHEAD asked at a time)
        self._asked = 0

    @classmethod
    def check_setup(cls, trainer, source) -> None:
        options = trainer.args.teacher_options or {}
        if not trainer.task_spec.language_model:
            raise SetupError("teacher_kind", f"served teachers are causal LMs, not task {trainer.task!r}")
        if not str(options.get("url", "")).startswith(("http://", "https://")):
            raise SetupError("teacher_options", "a served teacher needs url: http://host:port (hf-kd serve-teacher)")
        if options.get("dtype") is not None and options["dtype"] not in DTYPES:
            raise SetupError("teacher_options", f"dtype must be one of {', '.join(DTYPES)}")

    @classmethod
    def build(cls, trainer, source) -> Teacher:
        options = trainer.args.teacher_options or {}
        token = None
        if options.get("token_file"):
            with open(os.path.expanduser(options["token_file"]), encoding="utf-8") as f:
                token = f.read().strip()
        client = TeacherClient(options["url"], token)
        info = client.info()
        tokenizer = student_tokenizer(trainer)
        from hf_kd.teachers.cache.store import tokenizer_hash

        head = client.head(info["head"])
        if info.get("tokenizer_hash") and tokenizer is not None and tokenizer_hash(tokenizer) != info["tokenizer_hash"]:
            return cls._across_tokenizers(trainer, client, info, head, options)
        vocab = shared_vocab_size(num_outputs(trainer.model, trainer.task), info["vocab_size"], trainer.task, tokenizer)
        logger.info(
            "served teacher %s at %s: vocab %d, hidden %d, %s",
            info["model"],
            client.url,
            info["vocab_size"],
            info["hidden_size"],
            info["dtype"],
        )
        return cls(client, info, head, options.get("dtype") or info["dtype"], vocab)

    @classmethod
    def _across_tokenizers(cls, trainer, client, info, head, options) -> Teacher:
        """A served teacher of another tokenizer: a cross-tokenizer teacher whose teacher-side ids go to the server
        (the teacher's tokenizer: teacher_tokenizer_name_or_path, recipes teacher.tokenizer)."""
        from hf_kd.teachers.cache.store import tokenizer_hash
        from hf_kd.teachers.cross_tokenizer.teacher import CrossTokenizerTeacher
        from hf_kd.teachers.model import load_teacher_tokenizer

        teacher_tokenizer = load_teacher_tokenizer(trainer.args, None)
        if teacher_tokenizer is None or tokenizer_hash(teacher_tokenizer) != info["tokenizer_hash"]:
            raise SetupError(
                "teacher_tokenizer_name_or_path",
                f"the served teacher {info['model']} reads another "
                "tokenizer than the student's: name that tokenizer (recipes: teacher.tokenizer) to "
                "distill across tokenizers",
            )
        CrossTokenizerTeacher.check_setup(trainer, info["model"])
        remote = cls(client, info, head, options.get("dtype") or info["dtype"], None)
        return CrossTokenizerTeacher.from_model(trainer, None, info["model"], teacher_tokenizer, remote=remote)

    def aligned_hidden(self, inputs) -> TeacherHidden:
        """The teacher's hidden states for ``inputs`` (its own ids), aligned: position i predicts token i + 1."""
        try:
            hidden = self._ask(inputs["input_ids"], inputs.get("attention_mask"))
        except SetupError as err:
            raise TeacherUnavailable(err.problem) from None
        return TeacherHidden(hidden[:, :-1].to(inputs["input_ids"].device), self._head_on(inputs["input_ids"].device))

    def _head_on(self, device) -> LMHeadSpec:
        if str(device) not in self._heads_on:
            head = self.head
            self._heads_on[str(device)] = LMHeadSpec(
                head.weight.to(device),
                None if head.bias is None else head.bias.to(device),
                head.softcap,
                head.logit_scale,
            )
        return self._heads_on[str(device)]

    def prefetch(self, batch) -> None:
        """Ask for the batch's hidden states ahead of the loss (at most AHEAD micro-batches at a time): the answer
        arrives while the student runs its forward."""
        self._waiting.append(batch)
        self._ask_ahead()

    def _ask_ahead(self) -> None:
        while self._asked < AHEAD and self._waiting:
            batch = self._waiting.pop(0)
            ids, mask = batch["input_ids"], batch.get("attention_mask")
            batch.teacher_answers[id(self)] = self._pool.submit(self._ask, ids, mask)
            self._asked += 1

    def _ask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return self.client.hidden(input_ids.cpu(), mask.cpu(), self.dtype)

    def run(self, inputs, forward, targets):
        answers = getattr(inputs, "teacher_answers", {})
        answer: Future | None = answers.pop(id(self), None)
        if answer is not None:
            self._asked -= 1
        else:  # not asked for ahead (evaluation, or its turn came first): asked now, and never again
            self._waiting = [batch for batch in self._waiting if batch.teacher_answers is not answers]
        self._ask_ahead()
        try:
            hidden = (
                answer.result() if answer is not None else self._ask(inputs["input_ids"], inputs.get("attention_mask"))
            )
        except SetupError as err:  # at setup a refusal; in training the step cannot be computed: the run stops
            raise TeacherUnavailable(err.problem) from None
        device = inputs["input_ids"].device
        # logits at position i predict the token at i + 1: the last position has no target
        return TeacherHidden(hidden[:, :-1].to(device), self._head_on(device))

    def describe(self) -> dict[str, str]:
        return {"teacher kind": f"served ({self.info['model']} at {self.client.url}, hidden states in {self.dtype})"}
