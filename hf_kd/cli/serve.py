"""`hf-kd serve-teacher MODEL_OR_RECIPE`: run a frozen teacher behind the hidden-state API of
:mod:`hf_kd.teachers.served.server` until interrupted."""

from __future__ import annotations

import logging
import os
import sys

from hf_kd.recipe.recipe import RecipeError, load_recipe

logger = logging.getLogger("hf_kd")


def run_serve_teacher(args) -> int:
    """Load the teacher (a model directory or id, or a recipe's teacher section) and serve it; returns on Ctrl-C."""
    from aiohttp import web

    from hf_kd.models.loading import load_model
    from hf_kd.teachers.served.server import HiddenStateServer, Limits

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    name, init_kwargs = args.model, {}
    if args.model.endswith((".yaml", ".yml")):
        teacher = load_recipe(args.model).teacher
        name, init_kwargs = teacher.name_or_path, dict(teacher.init_kwargs)
        if teacher.dtype is not None:
            init_kwargs["dtype"] = teacher.dtype
    if args.dtype is not None:
        init_kwargs["dtype"] = args.dtype
    if args.token_file is None and not _loopback(args.host):
        raise RecipeError(
            args.model,
            "--token-file",
            f"serving on {args.host} (beyond this machine) needs a token: "
            "write one to a file and pass --token-file FILE (clients set teacher.token_file)",
        )
    token = None
    if args.token_file is not None:
        if not os.path.isfile(args.token_file):
            raise RecipeError(args.model, "--token-file", f"no such file: {os.path.abspath(args.token_file)}")
        with open(args.token_file, encoding="utf-8") as f:
            token = f.read().strip()
    model = load_model(name, "causal_lm", init_kwargs)
    server = HiddenStateServer(
        model,
        name=name,
        tokenizer_hash=_tokenizer_hash(name),
        token=token,
        limits=Limits(args.max_request_tokens, args.max_batch_tokens, args.max_queue),
    )
    print(
        f"serving {name} at http://{args.host}:{args.port} (hidden states; Ctrl-C stops)", file=sys.stderr, flush=True
    )
    web.run_app(server.app(), host=args.host, port=args.port, print=None)
    return 0


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _tokenizer_hash(name: str) -> str | None:
    """The teacher's tokenizer's hash, when its directory (or Hub id) has one: clients check it is theirs."""
    from transformers import AutoTokenizer

    from hf_kd.teachers.cache.store import tokenizer_hash

    try:
        return tokenizer_hash(AutoTokenizer.from_pretrained(name))
    except (OSError, ValueError):
        return None
