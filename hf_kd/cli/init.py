"""`hf-kd init RECIPE --teacher T --student S --data FILE`: a starter recipe for your own pair and data, in one line.

The data format is read off the file's first example (``messages``; ``prompt`` and ``completion``; ``text``), the
settings suit the machine it runs on (no GPU: float32 on the CPU, a small batch), and every key carries a comment.
`hf-kd check RECIPE` then validates it and `hf-kd train RECIPE` runs it; edit it like any shipped recipe.
"""

from __future__ import annotations

import json
import os

from hf_kd.recipe.recipe import RecipeError

FORMATS = (  # the first example's keys -> the data format that reads them
    ({"messages"}, "messages"),
    ({"prompt", "completion"}, "prompt_completion"),
    ({"text"}, "text"),
)


def data_format(path: str) -> str:
    """The format of a local json/jsonl file, from its first example; a RecipeError naming ``--data`` otherwise."""
    if not os.path.isfile(path) or os.path.splitext(path)[1] not in (".json", ".jsonl"):
        raise RecipeError(path, "--data", "give a local .jsonl or .json file (other sources: write the data: section)")
    with open(path, encoding="utf-8") as f:
        first = f.readline().strip() if path.endswith(".jsonl") else None
        if first is None:
            rows = json.load(f)
            first_row = rows[0] if isinstance(rows, list) and rows else None
        else:
            first_row = json.loads(first) if first else None
    if not isinstance(first_row, dict):
        raise RecipeError(path, "--data", "the first example is not a JSON object")
    for keys, name in FORMATS:
        if keys <= set(first_row):
            return name
    shapes = "; ".join(" + ".join(sorted(keys)) for keys, _ in FORMATS)
    raise RecipeError(path, "--data", f"the first example has keys {sorted(first_row)}; expected one of: {shapes}")


def _gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def recipe_text(teacher: str, student: str, data: str, output_dir: str, loss_type: str, gpu: bool) -> str:
    fmt = data_format(data)
    device = (
        "  bf16: true                               # a GPU with bf16 (Ampere and later); fp16: true on older ones"
        if gpu
        else "  use_cpu: true                            # no GPU here: float32 on the CPU"
    )
    return f"""# A starter recipe written by `hf-kd init`: {teacher} -> {student} on {data}.
# Validate it (no weights loaded):  hf-kd check {{recipe}}
# Train:                            hf-kd train {{recipe}}     (any key can be overridden: --max_steps 10)
teacher:
  name_or_path: {json.dumps(teacher)}
student:
  name_or_path: {json.dumps(student)}
data:
  dataset: {json.dumps(os.path.abspath(data))}
  format: {fmt}                          # read off the first example
  max_length: 512                          # tokens per example; longer ones are truncated
  eval_size: 0.05                          # a share of the data held out for evaluation
training:
  output_dir: {json.dumps(output_dir)}
  loss_type: {loss_type}                       # forward_kl, reverse_kl, jsd, mse, ... (docs/objectives.md)
  temperature: 1.0                         # 2 softens both distributions (T^2-scaled)
  alpha: 0.5                               # half divergence, half the label cross-entropy
  num_train_epochs: 1
  per_device_train_batch_size: {8 if gpu else 2}
  gradient_accumulation_steps: {4 if gpu else 1}
  learning_rate: 5.0e-5
  logging_steps: 10
  eval_strategy: steps
  eval_steps: 100
  save_steps: 100
{device}
"""


def run_init(args) -> int:
    """Write the starter recipe; refuses to overwrite an existing file unless ``--force``."""
    if os.path.exists(args.recipe) and not args.force:
        raise RecipeError(args.recipe, "recipe", "exists already; pass --force to overwrite it")
    output_dir = args.output_dir or os.path.splitext(os.path.basename(args.recipe))[0] + "_output"
    text = recipe_text(args.teacher, args.student, args.data, output_dir, args.loss_type, _gpu())
    text = text.replace("{recipe}", args.recipe)
    os.makedirs(os.path.dirname(os.path.abspath(args.recipe)), exist_ok=True)
    with open(args.recipe + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(args.recipe + ".tmp", args.recipe)  # whole or not at all
    print(f"{args.recipe}: written; next: hf-kd check {args.recipe}, then hf-kd train {args.recipe}")
    return 0
