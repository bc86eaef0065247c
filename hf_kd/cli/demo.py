"""`hf-kd demo`: distillation end to end on a CPU, no downloads, a few minutes.

The data come from a known random process -- an order-2 Markov chain over a few dozen symbols whose next-symbol
distributions are sparse Dirichlet draws (~1.4 nats of genuine uncertainty per token) -- so the best achievable
held-out perplexity is known exactly, soft targets carry real information, and the samples a model writes can be scored
exactly (:func:`sample_quality`). A teacher is trained with CE on plenty of data; students of one smaller size are then
trained on a small transfer set with an equal budget (same prompts, steps, learning rate, initialization) and different
objectives: CE only, forward KL, reverse KL and logit MSE (a miniature of Kim et al. 2021's KL-vs-MSE comparison), and
on-policy reverse KL (lmbda 1: the student's own completions, scored by the teacher). Everything goes through the real
pipeline: a `tokenizers` tokenizer saved and reloaded, jsonl -> hf_kd.data (prompt_completion, completion-only labels)
-> DistillationTrainer.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time

import numpy as np
import torch

from hf_kd.cli.demo_report import format_table, plot, y_range  # noqa: F401 (y_range: tests)
from hf_kd.cli.synthetic import (  # noqa: F401 (the demo's task, also imported from here by the benchmarks and tests)
    FAST,
    IMPOSSIBLE_NATS,
    SPECIALS,
    SYMBOL,
    Settings,
    build_tokenizer,
    make_chain,
    process_nll,
    sample,
    sample_quality,
    token_nll,
    true_process_metrics,
    write_jsonl,
)
from hf_kd.recipe.schema import DataSection

OBJECTIVES = {  # name -> DistillationConfig settings; alpha = 0 leaves only the CE on the sampled tokens
    "CE only": {"loss_type": "forward_kl", "alpha": 0.0},
    "forward KL": {"loss_type": "forward_kl", "alpha": 1.0},
    "reverse KL": {"loss_type": "reverse_kl", "alpha": 1.0},
    "logit MSE": {"loss_type": "mse", "alpha": 1.0},
    # lmbda 1: every batch's completions are the student's own samples, scored by the teacher (GKD / on-policy KD)
    "on-policy reverse KL": {"loss_type": "reverse_kl", "alpha": 1.0, "lmbda": 1.0},
}


def generation_args(s: Settings) -> dict:
    """What a generating run (lmbda > 0 or seq_kd) needs on this task: completions as long as the data's (the sequence
    length less the two prompt symbols) and no stop at <eos>, which the data never contain; so a generated batch has
    exactly as many target tokens as a dataset batch, and the step budgets compare. The EOS list is empty, not None:
    transformers 5's generate fills a None from the model's own generation config and would stop at <eos> anyway."""
    return {"max_new_tokens": s.seq_len - 2, "generation_kwargs": {"eos_token_id": []}}


# ---- models, training, evaluation -----------------------------------------------------------------------------------


def build_model(vocab: int, size: tuple[int, int], seq_len: int, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, layers = size
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=seq_len,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


@torch.no_grad()
def evaluate(model, dataset, batch_size: int = 64) -> tuple[float, float]:
    """Held-out perplexity and top-1 accuracy over the target tokens (labels != -100)."""
    from hf_kd.data import DistillationCollator

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
    from hf_kd.config import DistillationConfig

    return DistillationConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=s.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=s.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.0,
        logging_steps=max(1, steps // 20),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **extra,
    )


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

    from hf_kd.data import DistillationCollator, load_raw_dataset, tokenize_dataset
    from hf_kd.training.trainer import DistillationTrainer

    started = time.time()
    s = FAST if fast else Settings()
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()  # tiny jsonl files: the training bars are the progress worth showing
    os.makedirs(os.path.join(output_dir, "data"), exist_ok=True)
    rng = np.random.default_rng(seed)

    # 1. the process, its samples and the tokenizer (saved and reloaded: the from_pretrained path)
    chain = make_chain(s, rng)
    splits = {
        name: sample(chain, n, s.seq_len, rng)
        for name, n in (
            ("teacher", s.teacher_seqs),
            ("student", s.student_seqs),
            ("valid", s.valid_seqs),
            ("test", s.test_seqs),
        )
    }
    for name, seqs in splits.items():
        write_jsonl(os.path.join(output_dir, "data", f"{name}.jsonl"), seqs)
    build_tokenizer(s.symbols).save_pretrained(os.path.join(output_dir, "tokenizer"))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(output_dir, "tokenizer"))
    with open(os.path.join(output_dir, "data", "process.json"), "w", encoding="utf-8") as f:
        json.dump({"next_symbol_probs": chain.tolist()}, f)  # [a][b][c] = P(c | a, b): recompute the floor from it
    floor_ppl, floor_acc = true_process_metrics(chain, splits["test"])
    entropy = math.log(floor_ppl)
    print(
        f"process: order-2 Markov chain, {s.symbols} symbols, {s.successors} successors per context, "
        f"{entropy:.3f} nats/token of irreducible uncertainty on the test set"
    )

    # prompt = the first two symbols (masked), completion = the chain's output (the targets); no EOS: length is arbitrary
    spec = DataSection(dataset="", format="prompt_completion", add_eos=False, max_length=s.seq_len)
    data = {
        name: tokenize_dataset(
            load_raw_dataset(os.path.join(output_dir, "data", f"{name}.jsonl")),
            tokenizer,
            spec,
            desc=f"Tokenizing {name}",
        )
        for name in splits
    }
    vocab = len(tokenizer)
    # the process's own samples are the test set: their NLL is the floor, their KL to the process 0
    own = process_nll(chain, splits["test"] + len(SPECIALS))
    rows = [_row("true process (floor)", None, floor_ppl, floor_acc, sample={**own, "self_nll": entropy, "kl": 0.0})]
    prompts = splits["test"][:, :2]  # every model completes the same test prompts, with the same sampling seed

    # 2. the teacher: CE on the big set
    teacher = build_model(vocab, s.teacher_size, s.seq_len, seed)
    teacher_args = _args(os.path.join(output_dir, "runs", "teacher"), s, s.teacher_steps, seed)
    _train(
        Trainer,
        f"teacher (CE, {s.teacher_seqs} seqs)",
        s.teacher_steps,
        model=teacher,
        args=teacher_args,
        train_dataset=data["teacher"],
        data_collator=DistillationCollator(),
    )
    rows.append(
        _row(
            f"teacher (CE, {s.teacher_seqs} seqs)",
            teacher,
            *evaluate(teacher, data["test"]),
            sample=sample_quality(teacher, chain, prompts, s.seq_len, seed),
        )
    )

    # 3. the students: one size, one init, one transfer set, one budget; only the objective differs
    curves, students = {}, {}
    eval_steps = max(1, s.student_steps // s.evals)
    for name, settings in OBJECTIVES.items():
        student = build_model(vocab, s.student_size, s.seq_len, seed + 1)  # the same init for every student
        generates = settings.get("lmbda", 0) > 0 or settings.get("seq_kd", False)
        args = _args(
            os.path.join(output_dir, "runs", name.replace(" ", "_")),
            s,
            s.student_steps,
            seed,
            temperature=s.temperature,
            eval_strategy="steps",
            eval_steps=eval_steps,
            **settings,
            **(generation_args(s) if generates else {}),
        )
        clock = time.time()
        trainer = _train(
            DistillationTrainer,
            f"student: {name}",
            s.student_steps,
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=data["student"],
            eval_dataset=data["valid"],
            processing_class=tokenizer,
        )
        seconds = time.time() - clock
        logs = trainer.state.log_history
        curves[name] = [(e["step"], math.exp(e["eval_ce_loss"])) for e in logs if "eval_ce_loss" in e]
        students[name] = (student, evaluate(student, data["valid"])[0])  # the final model's validation perplexity
        best_valid = min(p for _, p in curves[name]) if curves[name] else None
        shares = [e["generation_time_share"] for e in logs if "generation_time_share" in e]
        rows.append(
            _row(
                f"student: {name}",
                student,
                *evaluate(student, data["test"]),
                best_valid,
                sample_quality(student, chain, prompts, s.seq_len, seed),
                seconds,
                statistics.fmean(shares) if shares else None,
            )
        )

    # 4. report, save the best student
    best = min(students, key=lambda name: students[name][1])  # chosen on validation, never on the test set
    best_dir = os.path.join(output_dir, "best_student")
    students[best][0].save_pretrained(best_dir)
    tokenizer.save_pretrained(best_dir)
    print(format_table(rows, entropy, s))
    print(
        f"best student (lowest validation perplexity): {best} -> {best_dir} (loads with "
        "AutoModelForCausalLM.from_pretrained)"
    )
    print(plot(curves, floor_ppl, rows[1]["ppl"], os.path.join(output_dir, "valid_ppl.png")))
    results = {
        "settings": {k: v for k, v in vars(s).items()},
        "entropy_nats": entropy,
        "impossible_nats": IMPOSSIBLE_NATS,
        "rows": [{k: v for k, v in row.items() if k != "module"} for row in rows],
        "valid_curves": curves,
        "best_student": best,
        "seconds": round(time.time() - started, 1),
    }
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print(f"demo finished in {results['seconds']:.0f} s; results in {os.path.join(output_dir, 'results.json')}")
    return results


def _row(name, model, ppl, accuracy, best_valid=None, sample=None, seconds=None, generation_share=None) -> dict:
    """One line of the table and of results.json (``module`` is the model itself, left out of the JSON)."""
    return {
        "model": name,
        "module": model,
        "params": _params(model),
        "ppl": ppl,
        "accuracy": accuracy,
        "best_valid_ppl": best_valid,
        "sample_nll": sample["nll"],
        "sample_kl": sample["kl"],
        "sample": sample,
        "train_seconds": seconds,
        "generation_time_share": generation_share,
    }


def _params(model) -> int | None:
    return None if model is None else sum(p.numel() for p in model.parameters())
