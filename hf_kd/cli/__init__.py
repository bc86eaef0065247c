"""`hf-kd train | check | demo` (also `python -m hf_kd ...` and `accelerate launch -m hf_kd train ...`).

Exit codes: 0 success; 1 `check` found a problem; 2 the recipe, its data or the command line is wrong (one line on
stderr, ``error: <file>: <key>: <problem>``, no traceback).

One module per command: ``train``, ``check``, ``cache`` (cache-teacher), ``demo``; this one parses the command line
and dispatches. The output directory of `train` is described by OUTPUT_DIR_HELP.

Importing this module imports nothing heavy: `hf-kd --help`, a bad command line and a recipe's typo answer in a
fraction of a second; torch, transformers, peft and datasets are imported by the commands that use them.
"""

from __future__ import annotations

import argparse
import sys

from hf_kd.recipe.recipe import RecipeError, load_recipe

COMPLETE_MARKER = "training_complete.json"
OUTPUT_DIR_HELP = (
    "output_dir: checkpoints go to output_dir/checkpoint-* while training; the final student (weights, config, "
    "tokenizer) is written to output_dir after the last step, and only then output_dir/training_complete.json "
    "(recipe, metrics, versions). A directory without that file is not a finished run. A finished output_dir is "
    "never trained over (--overwrite_output_dir); an unfinished one is resumed with --resume_from_checkpoint true. "
    "output_dir/hf_kd_recipe.yaml is the recipe as the command resolved it (overrides applied): Ctrl-C prints the "
    "command that resumes from it."
)

# ---- entry point ----------------------------------------------------------------------------------------------------

OVERRIDES_HELP = (
    "Any DistillationConfig / TrainingArguments field overrides the recipe's training section, e.g. "
    "--max_steps 10 --output_dir out --learning_rate 1e-5 --loss_type reverse_kl --bf16 false; any other recipe key "
    "by its dotted name, e.g. --data.max_samples 100 --teacher.dtype float32 --peft.r 16."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-kd",
        description="Knowledge distillation for Hugging Face causal LMs (and text classifiers).",
        epilog="Multi-GPU: accelerate launch [--config_file recipes/accelerate/fsdp.yaml] -m hf_kd train RECIPE",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{init,train,check,demo,cache-teacher,serve-teacher}"
    )
    init = sub.add_parser(
        "init",
        help="write a starter recipe for your own teacher, student and jsonl data",
        allow_abbrev=False,
    )
    init.add_argument("recipe", help="the recipe file to write, e.g. my-kd.yaml")
    init.add_argument("--teacher", required=True, help="the teacher: a Hub id or a local model directory")
    init.add_argument("--student", required=True, help="the student: a Hub id or a local model directory")
    init.add_argument("--data", required=True, help="a local .jsonl/.json file: messages, prompt+completion or text")
    init.add_argument("--output_dir", help="where train writes the student (default: <recipe name>_output)")
    init.add_argument("--loss_type", default="forward_kl", help="the divergence (default forward_kl)")
    init.add_argument("--force", action="store_true", help="overwrite the recipe file if it exists")
    train = sub.add_parser(
        "train",
        help="distill a student as a recipe says",
        description=OVERRIDES_HELP,
        allow_abbrev=False,
        epilog=OUTPUT_DIR_HELP,
    )
    train.add_argument("recipe", help="a recipe YAML file (see recipes/)")
    train.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="delete the completion marker and checkpoints of a previous run in output_dir first",
    )
    check = sub.add_parser(
        "check",
        help="validate a recipe; inspect configs, tokenizers and memory without weights",
        description=OVERRIDES_HELP,
        allow_abbrev=False,
    )
    check.add_argument("recipe")
    demo = sub.add_parser(
        "demo",
        help="distill SmolLM2-135M-Instruct into a student pruned from it, on a CPU (a few minutes); --synthetic: a "
        "task with a known floor, no model needed",
        allow_abbrev=False,
    )
    demo.add_argument("--output_dir", default="hf_kd_demo_output", help="where the results and best student go")
    demo.add_argument(
        "--teacher",
        help="the SmolLM2-135M-Instruct directory (default: where `python scripts/real_models.py` caches it)",
    )
    demo.add_argument("--synthetic", action="store_true", help="the synthetic demo (an order-2 Markov chain)")
    demo.add_argument("--fast", action="store_true", help="a much smaller setting (seconds; used by the tests)")
    demo.add_argument("--seed", type=int, default=0)
    cache = sub.add_parser(
        "cache-teacher",
        help="run the recipe's teacher over its data once and store its top-k "
        "log-probs (then train with --teacher_cache PATH)",
        description=OVERRIDES_HELP,
        allow_abbrev=False,
    )
    cache.add_argument("recipe")
    cache.add_argument(
        "--output",
        help="the cache directory (default: the recipe's teacher.cache; an unfinished build there is resumed)",
    )
    cache.add_argument(
        "--k",
        type=int,
        default=64,
        help="ids kept per position: 8k + 4 bytes each; the loss is exact at k = vocab size",
    )
    cache.add_argument("--batch_size", type=int, default=8, help="examples per teacher forward")
    cache.add_argument("--shard_size", type=int, default=1000, help="examples per shard: the unit of resumption")
    serve = sub.add_parser(
        "serve-teacher",
        help="serve a teacher's final hidden states over HTTP (train with teacher: {url: http://HOST:PORT})",
        allow_abbrev=False,
    )
    serve.add_argument("model", help="a causal LM directory or Hub id, or a recipe whose teacher to serve")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8600)
    serve.add_argument("--token-file", help="a file holding the token clients must send (Bearer); default: none")
    serve.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="the teacher's weights' dtype (default: bfloat16 on GPU, float32 on CPU)",
    )
    serve.add_argument("--max-request-tokens", type=int, default=65536, help="batch x sequence of one request")
    serve.add_argument("--max-batch-tokens", type=int, default=65536, help="tokens of one batched forward")
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting; more are answered 503")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.synthetic:
            from hf_kd.cli.demo import run_demo

            run_demo(output_dir=args.output_dir, fast=args.fast, seed=args.seed)
            return 0
        from hf_kd.cli.real_demo import run_real_demo

        try:
            run_real_demo(args.teacher, output_dir=args.output_dir, fast=args.fast, seed=args.seed)
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command == "init":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from hf_kd.cli.init import run_init

        try:
            return run_init(args)
        except RecipeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if args.command == "serve-teacher":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from hf_kd.cli.serve import run_serve_teacher

        try:
            return run_serve_teacher(args)
        except RecipeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    try:
        recipe = load_recipe(args.recipe, rest)
        if args.command == "check":
            from hf_kd.cli.check import run_check

            return run_check(recipe)
        if args.command == "cache-teacher":
            from hf_kd.cli.cache import run_cache_teacher

            return run_cache_teacher(recipe, args)
        from hf_kd.cli.train import train_command

        return train_command(recipe, args.overwrite_output_dir)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        data = sys.modules.get("hf_kd.data")  # a DataError comes from hf_kd.data (torch): imported if one was raised
        if data is None or not isinstance(err, data.DataError):
            raise
        print(f"error: {args.recipe}: {err}", file=sys.stderr)
        return 2
