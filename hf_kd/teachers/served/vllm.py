"""The ``vllm`` teacher: a teacher served by vLLM's OpenAI-compatible server, scored through ``/v1/completions`` with
``prompt_logprobs``: each position's ``top_k`` log-probabilities and the tail bucket, handed to the loss exactly as a
teacher cache's rows (:mod:`hf_kd.objective.sparse`: the ``k + 1``-bucket divergences, fused or not).

The batch's token ids are sent as they are (no re-tokenization); the server must read the student's tokenizer, which
setup checks on a few probe texts (``/tokenize``). vLLM returns at most ``--max-logprobs`` (default 20) per position.
The tail bucket is ``log(1 - sum of the top-k probabilities)`` in float64 (the server sends no more), and exactly
empty when ``top_k`` is the whole vocabulary. ``mse`` needs raw logits: refused, as for a cache.

Start a server: ``python -m vllm.entrypoints.openai.api_server --model DIR --max-logprobs K [--api-key KEY]``.
"""

from __future__ import annotations

import json
import logging
import math
import os

import torch

from hf_kd.errors import SetupError
from hf_kd.models.loading import num_outputs
from hf_kd.objective.signals import TeacherTopK
from hf_kd.objective.sparse import sparse_weights
from hf_kd.teachers.model import student_tokenizer
from hf_kd.teachers.registry import Teacher, register_teacher
from hf_kd.teachers.served.teacher import TeacherClient, TeacherUnavailable

logger = logging.getLogger(__name__)
PROBES = ("Hello world.", "The teacher scores every position of the batch.", "1 + 2 = 3")


class VLLMClient(TeacherClient):
    """JSON calls to a vLLM server (the API key, if any, as the bearer token)."""

    def post(self, path: str, payload: dict) -> dict:
        return json.loads(self._exchange(path, json.dumps(payload).encode(), json_body=True)[0])

    def get(self, path: str) -> dict:
        return json.loads(self._exchange(path, None)[0])


def prompt_top_k(entries: list, length: int, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """vLLM's ``prompt_logprobs`` of one prompt of ``length`` tokens -> per aligned position ``0 .. length - 2`` (the
    position that predicts token ``i + 1``) the ``k`` most likely ids and their log-probabilities, most likely first.
    Entry ``i + 1`` is the distribution of token ``i + 1`` given the tokens before it (entry 0 is ``None``); it holds
    the top ``k`` by rank and the prompt's own token, whatever its rank."""
    ids, values = [], []
    for entry in entries[1:length]:
        ranked = sorted(
            ((int(token), item["rank"], item["logprob"]) for token, item in entry.items()), key=lambda t: t[1]
        )
        top = [t for t in ranked if t[1] <= k][:k]
        if len(top) < k:
            raise TeacherUnavailable(
                f"the vLLM server sent {len(top)} log-probabilities for a position, not {k}; "
                f"start it with --max-logprobs {k} or more"
            )
        ids.append([t[0] for t in top])
        values.append([t[2] for t in top])
    return ids, values


@register_teacher
class VLLMTeacher(Teacher):
    """``teacher_options``: ``url`` (the vLLM server), ``top_k`` (default 20), ``model`` (default: the one the server
    lists), ``token_file`` (its API key). Recipes: ``teacher: {url: ..., server: vllm, top_k: 20}``."""

    kind = "vllm"

    def __init__(self, client: VLLMClient, model: str, top_k: int, vocab: int):
        self.client, self.model_name, self.top_k, self.vocab = client, model, top_k, vocab
        self.name = model

    @classmethod
    def check_setup(cls, trainer, source) -> None:
        options = trainer.args.teacher_options or {}
        if not trainer.task_spec.language_model:
            raise SetupError("teacher_kind", f"vLLM teachers are causal LMs, not task {trainer.task!r}")
        if not str(options.get("url", "")).startswith(("http://", "https://")):
            raise SetupError("teacher_options", "a vLLM teacher needs url: http://host:port (its OpenAI server)")
        top_k = options.get("top_k", 20)
        if not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k > 0):
            raise SetupError("teacher_options", f"top_k must be a positive int, got {top_k!r}")
        try:
            sparse_weights(trainer.objective.weights)
        except ValueError as err:
            raise SetupError("loss_type", str(err).removeprefix("loss_type: ")) from None

    @classmethod
    def build(cls, trainer, source) -> Teacher:
        options = trainer.args.teacher_options or {}
        token = None
        if options.get("token_file"):
            with open(os.path.expanduser(options["token_file"]), encoding="utf-8") as f:
                token = f.read().strip()
        client = VLLMClient(options["url"], token)
        model = options.get("model") or client.get("/v1/models")["data"][0]["id"]
        vocab = num_outputs(trainer.model, trainer.task)
        top_k = min(options.get("top_k", 20), vocab)
        tokenizer = student_tokenizer(trainer)
        if tokenizer is not None:
            specials = set(getattr(tokenizer, "all_special_ids", []))
            own = tokenizer.decode([i for i in range(min(len(tokenizer), 200)) if i not in specials][:50])
            for text in (*PROBES, own):  # the server must read the ids the batch holds
                served = client.post("/tokenize", {"model": model, "prompt": text, "add_special_tokens": False})
                if served.get("tokens") != tokenizer(text, add_special_tokens=False)["input_ids"]:
                    raise SetupError(
                        "teacher_options",
                        f"the vLLM server's {model} tokenizes {text!r} unlike the "
                        "student's tokenizer; serve a model of the student's tokenizer",
                    )
        logger.info("vLLM teacher %s at %s: top-%d log-probabilities per position", model, client.url, top_k)
        return cls(client, model, top_k, vocab)

    def run(self, inputs, forward, targets):
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        rows = [ids[b][mask[b].bool()].tolist() for b in range(ids.shape[0])]
        # a row of fewer than 2 attended tokens (fully masked, or one token) has no position to score: not sent (vLLM
        # refuses an empty prompt); its filler rows stay
        scored = [b for b, row in enumerate(rows) if len(row) >= 2]
        payload = {
            "model": self.model_name,
            "prompt": [rows[b] for b in scored],
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": self.top_k,
        }
        answers = {}
        if scored:
            try:
                choices = self.client.post("/v1/completions", payload)["choices"]
            except SetupError as err:  # in training: the step cannot be computed
                raise TeacherUnavailable(err.problem) from None
            answers = {scored[choice["index"]]: choice for choice in choices}
        batch, width, k = ids.shape[0], ids.shape[1] - 1, self.top_k
        # non-target positions hold a uniform filler the loss never reads (as a cache's rows do)
        top_ids = torch.zeros(batch, width, k, dtype=torch.long)
        top_lp = torch.full((batch, width, k), -math.log(k + 1))
        tail = torch.full((batch, width), -math.log(k + 1))
        for b, choice in answers.items():
            row = rows[b]
            positions = mask[b].bool().nonzero().flatten().tolist()[: len(row) - 1]  # aligned rows of the real tokens
            row_ids, row_lp = prompt_top_k(choice["prompt_logprobs"], len(row), k)
            top_ids[b, positions] = torch.tensor(row_ids, dtype=torch.long)
            values = torch.tensor(row_lp, dtype=torch.float64)
            top_lp[b, positions] = values.float()
            rest = -torch.expm1(torch.logsumexp(values, -1))  # 1 - sum p, no float32 cancellation
            empty = k >= self.vocab
            tail[b, positions] = (torch.full_like(rest, -math.inf) if empty else rest.clamp_min(1e-30).log()).float()
        device = ids.device
        # a target is never read from a filler: a target at aligned position p has tokens p and p + 1 attended (the
        # task masks targets predicted from padding), so p is among the scored positions
        return TeacherTopK(top_ids.to(device), top_lp.to(device), tail.to(device))

    def describe(self) -> dict[str, str]:
        return {"teacher kind": f"vllm ({self.model_name} at {self.client.url}, top-{self.top_k} log-probabilities)"}
