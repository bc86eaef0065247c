"""``hf-kd serve-teacher``: a frozen causal-LM teacher behind an HTTP API that answers with final hidden states.

Why hidden states: the fused loss already builds the teacher's logits chunk by chunk from its final hidden states and
its head, so a client that has both computes the exact full-vocabulary objective. A hidden state is ``2 H`` bytes per
token in bf16 (8 KB at H = 4096) against ``2 V`` for dense logits (300 KB at V = 152k); vLLM-style servers return at
most ~20 log-probabilities per position.

Why aiohttp: one well-kept package is the async server, its test client, and nothing else to install (FastAPI would
add uvicorn, starlette and pydantic for the same four routes). One worker coroutine owns the model: requests from
many clients (DDP ranks) wait in a bounded queue and are batched together up to ``max_batch_tokens``; the forward runs
in a thread so that the event loop keeps answering (health checks, new requests, refusals).

Routes (``wire.py`` has the formats):

* ``GET /health`` -> ``{"status": "ok"}`` (no token needed: for load balancers and launch scripts);
* ``GET /info`` -> the model, vocabulary and hidden sizes, dtype, the tokenizer's hash, the head's hash, the limits;
* ``GET /head`` -> the head as safetensors (``weight``, ``bias``; ``logit_scale`` and ``softcap`` in the metadata);
* ``POST /hidden?dtype=float32|bfloat16|float16`` with ``{input_ids, attention_mask}`` -> ``{hidden}``.

A request over ``max_request_tokens`` is refused (413), a full queue answers 503 with ``Retry-After``, a wrong or
missing token 401.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from hf_kd.errors import SetupError
from hf_kd.models.heads import lm_head_spec
from hf_kd.models.loading import capture_final_hidden, freeze
from hf_kd.teachers.served.wire import DTYPES, TOKEN_HEADER, digest, pack, unpack

logger = logging.getLogger(__name__)


@dataclass
class Limits:
    max_request_tokens: int = 65536  # B * S of one request (a micro-batch of a DDP rank)
    max_batch_tokens: int = 65536  # B * S of one forward, over the requests batched together
    max_queue: int = 64  # requests waiting; more are answered 503


@dataclass
class _Pending:
    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S]
    dtype: torch.dtype
    answer: asyncio.Future


def fits(rows: int, width: int, shape: torch.Size, max_batch_tokens: int) -> bool:
    """Whether a request of ``shape`` ``[B, S]`` joins a forward of ``rows`` x ``width`` within the limit: the forward
    is right-padded to its widest request, so its size is all the rows times the widest width (not the sum)."""
    return (rows + shape[0]) * max(width, shape[1]) <= max_batch_tokens


class HiddenStateServer:
    """The teacher, its head (packed once), the queue and the worker. :meth:`app` is the aiohttp application."""

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        tokenizer_hash: str | None = None,
        token: str | None = None,
        limits: Limits | None = None,
    ):
        spec, why = lm_head_spec(model)
        if spec is None:
            raise SetupError("teacher", f"cannot be served as hidden states: {why}")
        self.model, self.name, self.tokenizer_hash = freeze(model), name, tokenizer_hash
        self.token, self.limits = token, limits or Limits()
        self.device = next(model.parameters()).device
        head = {"weight": spec.weight} | ({"bias": spec.bias} if spec.bias is not None else {})
        metadata = {"logit_scale": json.dumps(spec.logit_scale), "softcap": json.dumps(spec.softcap)}
        self.head_bytes = pack(head, metadata)
        self.head_hash = digest(self.head_bytes)
        self.info = {
            "model": name,
            "vocab_size": int(spec.weight.shape[0]),
            "hidden_size": int(spec.weight.shape[1]),
            "dtype": str(spec.weight.dtype).removeprefix("torch."),
            "tokenizer_hash": tokenizer_hash,
            "head": self.head_hash,
            "max_request_tokens": self.limits.max_request_tokens,
        }
        self._queue: asyncio.Queue | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_kd-teacher")  # one forward at a time
        self.requests = self.forwards = 0  # answered requests, and batched forwards (concurrent requests share one)

    def app(self):
        from aiohttp import web

        app = web.Application(middlewares=[self._auth], client_max_size=64 * 1024 * 1024)
        app.add_routes(
            [
                web.get("/health", self._health),
                web.get("/info", self._info),
                web.get("/head", self._head),
                web.post("/hidden", self._hidden),
            ]
        )
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    # ---- the routes -----------------------------------------------------------------------------------------------

    async def _start(self, _app) -> None:
        self._queue = asyncio.Queue(maxsize=self.limits.max_queue)
        self._worker_task = asyncio.create_task(self._worker())

    async def _stop(self, _app) -> None:
        self._worker_task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _refusal(status: int, message: str, **headers):
        from aiohttp import web

        return web.json_response({"error": message}, status=status, headers=headers)

    async def _auth(self, app, handler):
        async def checked(request):
            if self.token is not None and request.path != "/health":
                sent = request.headers.get(TOKEN_HEADER, "")
                if not hmac.compare_digest(sent.encode(), f"Bearer {self.token}".encode()):
                    return self._refusal(401, "missing or wrong token (Authorization: Bearer <token>)")
            return await handler(request)

        return checked

    async def _health(self, _request):
        from aiohttp import web

        return web.json_response({"status": "ok"})

    async def _info(self, _request):
        from aiohttp import web

        return web.json_response(self.info)

    async def _head(self, _request):
        from aiohttp import web

        return web.Response(
            body=self.head_bytes, content_type="application/octet-stream", headers={"X-Head-Hash": self.head_hash}
        )

    async def _hidden(self, request):
        from aiohttp import web

        dtype = DTYPES.get(request.query.get("dtype", self.info["dtype"]))
        if dtype is None:
            return self._refusal(400, f"dtype must be one of {', '.join(DTYPES)}")
        try:
            tensors = unpack(await request.read())
            ids, mask = tensors["input_ids"].long(), tensors["attention_mask"].long()
        except Exception as err:  # not safetensors, or missing a tensor: the client's mistake, said in one line
            return self._refusal(400, f"expected safetensors with input_ids and attention_mask ({type(err).__name__})")
        if ids.dim() != 2 or mask.shape != ids.shape:
            return self._refusal(
                400,
                f"input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must "
                "be the same [batch, sequence]",
            )
        if ids.numel() == 0:
            return self._refusal(400, "an empty batch: send at least one token")
        if ids.numel() > self.limits.max_request_tokens:
            return self._refusal(
                413,
                f"{ids.numel()} tokens in one request; this server takes at most "
                f"{self.limits.max_request_tokens} (send smaller micro-batches)",
            )
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.info["vocab_size"]):
            return self._refusal(400, f"token ids must be in [0, {self.info['vocab_size']})")
        pending = _Pending(ids, mask, dtype, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            return self._refusal(503, "the queue is full; retry", **{"Retry-After": "1"})
        hidden = await pending.answer
        self.requests += 1
        return web.Response(
            body=pack({"hidden": hidden}),
            content_type="application/octet-stream",
            headers={"X-Head-Hash": self.head_hash},
        )

    # ---- the worker: batches what waits, one forward at a time ---------------------------------------------------

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        carried: _Pending | None = None
        while True:
            batch = [carried or await self._queue.get()]
            carried = None
            rows, width = batch[0].input_ids.shape
            while not self._queue.empty():
                item = self._queue.get_nowait()
                more_rows, more_width = item.input_ids.shape
                if not fits(rows, width, item.input_ids.shape, self.limits.max_batch_tokens):
                    carried = item  # the next forward starts with it
                    break
                batch.append(item)
                rows, width = rows + more_rows, max(width, more_width)
            try:
                answers = await loop.run_in_executor(self._pool, self._forward, batch)
            except Exception as err:  # a fault of the model: every waiting client is told, the server goes on
                logger.exception("teacher forward failed")
                for item in batch:
                    if not item.answer.done():  # a client that went away
                        item.answer.set_exception(err)
                continue
            for item, hidden in zip(batch, answers):
                if not item.answer.done():  # a client that went away
                    item.answer.set_result(hidden)

    @torch.no_grad()
    def _forward(self, batch: list[_Pending]) -> list[torch.Tensor]:
        """One forward over the requests (right-padded to the longest; padding is masked out and cut away again):
        each request's final hidden states ``[B, S, H]`` in its dtype."""
        width = max(item.input_ids.shape[1] for item in batch)
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
        ids = torch.cat([pad(item.input_ids) for item in batch]).to(self.device)
        mask = torch.cat([pad(item.attention_mask) for item in batch]).to(self.device)
        with capture_final_hidden(self.model) as box:
            self.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
        self.forwards += 1
        hidden, answers, start = box[-1], [], 0
        for item in batch:
            rows, length = item.input_ids.shape
            answers.append(hidden[start : start + rows, :length].to(item.dtype).cpu())
            start += rows
        return answers
