"""`hf-kd demo`: distillation end to end on a CPU, no downloads, a few minutes.

The data come from a known random process -- an order-2 Markov chain over a few dozen symbols whose next-symbol
distributions are sparse Dirichlet draws (~1.4 nats of genuine uncertainty per token) -- so the best achievable
held-out perplexity is known exactly and soft targets carry real information. A teacher is trained with CE on plenty of
data; students of one smaller size are then trained on a small transfer set with an equal budget (same data, steps,
learning rate, initialization) and different objectives: CE only, forward KL, reverse KL and logit MSE (a miniature of
Kim et al. 2021's KL-vs-MSE comparison). Everything goes through the real pipeline: a `tokenizers` tokenizer saved and
reloaded, jsonl -> hf_kd.data (prompt_completion, completion-only labels) -> DistillationTrainer.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from .recipe import DataSection

SYMBOL = "s{}"  # symbol k is the word "s<k>"; prompts are the first two symbols (no order-2 context exists for them)
SPECIALS = ["<pad>", "<eos>", "<unk>"]


@dataclass
class Settings:
    symbols: int = 16  # the chain's alphabet: 16 x 16 = 256 contexts
    successors: int = 6  # non-zero next-symbol probabilities per context (sparse-ish)
    concentration: float = 0.8  # Dirichlet alpha: lower -> peakier next-symbol distributions, lower entropy
    seq_len: int = 48
    teacher_seqs: int = 3000  # the teacher sees 10x more data than the students
    student_seqs: int = 300  # the transfer set every student trains on
    valid_seqs: int = 200  # logged during training (the plot)
    test_seqs: int = 500  # the table
    teacher_size: tuple[int, int] = (128, 2)  # (hidden, layers)
    student_size: tuple[int, int] = (48, 2)
    teacher_steps: int = 250
    student_steps: int = 300
    batch_size: int = 32
    learning_rate: float = 3e-3
    temperature: float = 1.0  # T = 1: the student should match the teacher's actual distribution (perplexity)
    evals: int = 6  # validation evaluations per student run


FAST = Settings(symbols=12, successors=4, seq_len=32, teacher_seqs=600, student_seqs=80, valid_seqs=40, test_seqs=100,
                teacher_size=(48, 2), student_size=(32, 1), teacher_steps=60, student_steps=30, batch_size=16, evals=2)  # fmt: skip

OBJECTIVES = {  # name -> (loss_type, alpha); alpha = 0 leaves only the CE on the sampled tokens
    "CE only": ("forward_kl", 0.0),
    "forward KL": ("forward_kl", 1.0),
    "reverse KL": ("reverse_kl", 1.0),
    "logit MSE": ("mse", 1.0),
}


# ---- the process ----------------------------------------------------------------------------------------------------


def make_chain(s: Settings, rng: np.random.Generator) -> torch.Tensor:
    """``[K, K, K]``: P(next | two previous symbols), each row a Dirichlet draw over ``successors`` random symbols."""
    k = s.symbols
    probs = np.zeros((k * k, k))
    for row in range(k * k):
        support = rng.choice(k, size=s.successors, replace=False)
        probs[row, support] = rng.dirichlet(np.full(s.successors, s.concentration))
    return torch.from_numpy(probs).view(k, k, k)


def sample(chain: torch.Tensor, n: int, length: int, rng: np.random.Generator) -> torch.Tensor:
    """``[n, length]`` symbol ids: two uniform symbols, then the chain."""
    k = chain.shape[0]
    table = chain.numpy().cumsum(-1)
    seqs = np.empty((n, length), dtype=np.int64)
    seqs[:, :2] = rng.integers(0, k, size=(n, 2))
    for t in range(2, length):
        cdf = table[seqs[:, t - 2], seqs[:, t - 1]]  # [n, K]
        seqs[:, t] = np.minimum((cdf < rng.random((n, 1))).sum(-1), k - 1)  # inverse-CDF sampling
    return torch.from_numpy(seqs)


def true_process_metrics(chain: torch.Tensor, seqs: torch.Tensor) -> tuple[float, float]:
    """Perplexity and top-1 accuracy of the process itself on ``seqs`` (targets 2..): the best any model can do."""
    probs = chain[seqs[:, :-2], seqs[:, 1:-1]]  # [n, L - 2, K]: the distribution of seqs[:, 2:]
    targets = seqs[:, 2:]
    nll = -probs.gather(-1, targets.unsqueeze(-1)).log().mean()
    accuracy = (probs.argmax(-1) == targets).double().mean()
    return math.exp(nll.item()), accuracy.item()


def write_jsonl(path: str, seqs: torch.Tensor) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in seqs.tolist():
            words = [SYMBOL.format(x) for x in row]
            f.write(json.dumps({"prompt": " ".join(words[:2]), "completion": " " + " ".join(words[2:])}) + "\n")


def build_tokenizer(symbols: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + [SYMBOL.format(k) for k in range(symbols)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


# ---- models, training, evaluation -----------------------------------------------------------------------------------


def build_model(vocab: int, size: tuple[int, int], seq_len: int, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, layers = size
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq_len, pad_token_id=0,
        eos_token_id=1, bos_token_id=None, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


@torch.no_grad()
def evaluate(model, dataset, batch_size: int = 64) -> tuple[float, float]:
    """Held-out perplexity and top-1 accuracy over the target tokens (labels != -100)."""
    from .data import DistillationCollator

    model.eval()
    nll, correct, count = 0.0, 0, 0
    collate = DistillationCollator()
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        logits, labels = logits[:, :-1], batch["labels"][:, 1:]  # logits at i predict the token at i + 1
        mask = labels != -100
        logp = torch.log_softmax(logits[mask], dim=-1)
        nll -= logp.gather(-1, labels[mask].unsqueeze(-1)).sum().item()
        correct += (logp.argmax(-1) == labels[mask]).sum().item()
        count += int(mask.sum())
    return math.exp(nll / count), correct / count


def _progress_callback(desc: str, total: int):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}")
            if logs and "eval_ce_loss" in logs:
                self.bar.set_postfix(valid_ppl=f"{math.exp(logs['eval_ce_loss']):.3f}")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return Progress()


def _train(trainer_cls, desc: str, steps: int, **kwargs):
    from transformers.trainer_callback import PrinterCallback

    trainer = trainer_cls(**kwargs)
    trainer.remove_callback(PrinterCallback)  # the tqdm bar below replaces the printed log dicts
    trainer.add_callback(_progress_callback(desc, steps))
    trainer.train()
    return trainer


def _args(output_dir: str, s: Settings, steps: int, seed: int, **extra):
    from .config import DistillationConfig

    return DistillationConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=s.batch_size, per_device_eval_batch_size=64,
        learning_rate=s.learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.0,
        logging_steps=max(1, steps // 20), save_strategy="no", report_to="none", use_cpu=True, seed=seed,
        disable_tqdm=True, dataloader_num_workers=0, **extra,
    )  # fmt: skip


# ---- the demo -------------------------------------------------------------------------------------------------------


def run_demo(output_dir: str = "hf_kd_demo_output", fast: bool = False, seed: int = 0) -> dict:
    """Run the demo (see the module docstring); returns what it writes to ``output_dir/results.json``."""
    threads = torch.get_num_threads()
    # one thread: a second one could at best halve a step on an idle 2-core machine, but with another process on the
    # cores two spinning OpenMP threads made a teacher step 4x slower (430 vs 105 ms) and the --fast demo 55 s, not 4 s
    torch.set_num_threads(1)
    try:
        return _run_demo(output_dir, fast, seed)
    finally:
        torch.set_num_threads(threads)


def _run_demo(output_dir: str, fast: bool, seed: int) -> dict:
    import datasets
    from transformers import AutoTokenizer, Trainer
    from transformers.utils import logging as hf_logging

    from .data import DistillationCollator, load_raw_dataset, tokenize_dataset
    from .trainer import DistillationTrainer

    started = time.time()
    s = FAST if fast else Settings()
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()  # tiny jsonl files: the training bars are the progress worth showing
    os.makedirs(os.path.join(output_dir, "data"), exist_ok=True)
    rng = np.random.default_rng(seed)

    # 1. the process, its samples and the tokenizer (saved and reloaded: the from_pretrained path)
    chain = make_chain(s, rng)
    splits = {name: sample(chain, n, s.seq_len, rng) for name, n in
              (("teacher", s.teacher_seqs), ("student", s.student_seqs), ("valid", s.valid_seqs), ("test", s.test_seqs))}  # fmt: skip
    for name, seqs in splits.items():
        write_jsonl(os.path.join(output_dir, "data", f"{name}.jsonl"), seqs)
    build_tokenizer(s.symbols).save_pretrained(os.path.join(output_dir, "tokenizer"))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(output_dir, "tokenizer"))
    with open(os.path.join(output_dir, "data", "process.json"), "w", encoding="utf-8") as f:
        json.dump({"next_symbol_probs": chain.tolist()}, f)  # [a][b][c] = P(c | a, b): recompute the floor from it
    floor_ppl, floor_acc = true_process_metrics(chain, splits["test"])
    entropy = math.log(floor_ppl)
    print(f"process: order-2 Markov chain, {s.symbols} symbols, {s.successors} successors per context, "
          f"{entropy:.3f} nats/token of irreducible uncertainty on the test set")  # fmt: skip

    # prompt = the first two symbols (masked), completion = the chain's output (the targets); no EOS: length is arbitrary
    spec = DataSection(dataset="", format="prompt_completion", add_eos=False, max_length=s.seq_len)
    data = {name: tokenize_dataset(load_raw_dataset(os.path.join(output_dir, "data", f"{name}.jsonl")), tokenizer, spec,
                                   desc=f"Tokenizing {name}") for name in splits}  # fmt: skip
    vocab = len(tokenizer)
    rows = [("true process (floor)", None, floor_ppl, floor_acc, None)]

    # 2. the teacher: CE on the big set
    teacher = build_model(vocab, s.teacher_size, s.seq_len, seed)
    teacher_args = _args(os.path.join(output_dir, "runs", "teacher"), s, s.teacher_steps, seed)
    _train(Trainer, f"teacher (CE, {s.teacher_seqs} seqs)", s.teacher_steps, model=teacher, args=teacher_args,
           train_dataset=data["teacher"], data_collator=DistillationCollator())  # fmt: skip
    rows.append((f"teacher (CE, {s.teacher_seqs} seqs)", teacher, *evaluate(teacher, data["test"]), None))

    # 3. the students: one size, one init, one transfer set, one budget; only the objective differs
    curves, students = {}, {}
    eval_steps = max(1, s.student_steps // s.evals)
    for name, (loss_type, alpha) in OBJECTIVES.items():
        student = build_model(vocab, s.student_size, s.seq_len, seed + 1)  # the same init for every student
        args = _args(os.path.join(output_dir, "runs", name.replace(" ", "_")), s, s.student_steps, seed,
                     loss_type=loss_type, alpha=alpha, temperature=s.temperature, eval_strategy="steps",
                     eval_steps=eval_steps)  # fmt: skip
        trainer = _train(DistillationTrainer, f"student: {name}", s.student_steps, model=student, teacher_model=teacher,
                         args=args, train_dataset=data["student"], eval_dataset=data["valid"],
                         processing_class=tokenizer)  # fmt: skip
        curves[name] = [(e["step"], math.exp(e["eval_ce_loss"])) for e in trainer.state.log_history if "eval_ce_loss" in e]
        students[name] = (student, evaluate(student, data["valid"])[0])  # the final model's validation perplexity
        best_valid = min(p for _, p in curves[name]) if curves[name] else None
        rows.append((f"student: {name}", student, *evaluate(student, data["test"]), best_valid))

    # 4. report, save the best student
    best = min(students, key=lambda name: students[name][1])  # chosen on validation, never on the test set
    best_dir = os.path.join(output_dir, "best_student")
    students[best][0].save_pretrained(best_dir)
    tokenizer.save_pretrained(best_dir)
    table = format_table(rows, entropy, s)
    print(table)
    print(f"best student (lowest validation perplexity): {best} -> {best_dir} (loads with "
          "AutoModelForCausalLM.from_pretrained)")  # fmt: skip
    print(plot(curves, floor_ppl, rows[1][2], os.path.join(output_dir, "valid_ppl.png")))
    results = {
        "settings": {k: v for k, v in vars(s).items()},
        "entropy_nats": entropy,
        "rows": [{"model": r[0], "params": _params(r[1]), "ppl": r[2], "accuracy": r[3], "best_valid_ppl": r[4]}
                 for r in rows],
        "valid_curves": curves,
        "best_student": best,
        "seconds": round(time.time() - started, 1),
    }
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print(f"demo finished in {results['seconds']:.0f} s; results in {os.path.join(output_dir, 'results.json')}")
    return results


def _params(model) -> int | None:
    return None if model is None else sum(p.numel() for p in model.parameters())


def format_table(rows, entropy: float, s: Settings) -> str:
    lines = [f"held-out test set: {s.test_seqs} sequences x {s.seq_len - 2} target tokens; students: "
             f"{s.student_seqs} sequences, {s.student_steps} steps each",
             f"{'model':<28}{'params':>8}{'test ppl':>10}{'accuracy':>10}{'excess nats':>13}{'best valid ppl':>16}"]  # fmt: skip
    for name, model, ppl, acc, best_valid in rows:
        params = "-" if model is None else f"{_params(model) / 1e3:.0f}k"
        valid = "-" if best_valid is None else f"{best_valid:.4f}"
        lines.append(f"{name:<28}{params:>8}{ppl:>10.4f}{acc:>10.4f}{math.log(ppl) - entropy:>13.4f}{valid:>16}")
    return "\n".join(lines)


def plot(curves: dict, floor: float, teacher: float, path: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot: matplotlib is not installed, no PNG written (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.axhline(floor, color="k", linestyle="--", label="true process (floor)")
    ax.axhline(teacher, color="gray", linestyle=":", label="teacher")
    ax.set_xlabel("student step")
    ax.set_ylabel("validation perplexity")
    ax.set_title("hf-kd demo: equal-budget students")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"
