"""How much of the same-tokenizer KD gain does cross-tokenizer KD keep? The demo's synthetic task (hf_kd/cli/demo.py) with
a teacher that reads the same text through a coarser tokenizer.

    python benchmarks/cross_tokenizer.py            # 3 seeds, ~4.5 minutes on one core (one torch thread)
    python benchmarks/cross_tokenizer.py --quick    # the demo's FAST settings, 1 seed, seconds; writes nothing
    python benchmarks/cross_tokenizer.py --seeds 5 --merges 300

The text is the demo's (an order-2 Markov chain over symbols written as words; the first two symbols are the prompt)
with a leading space, " s3 s5 s1 ...", so that every symbol is one token wherever it stands: a byte-level BPE spells
"s3" and " s3" with different tokens, and the first symbol's own token would be seen once per sequence. Two byte-level
BPE tokenizers (tokenizers' models.BPE, ByteLevel pre-tokenizer without the GPT-2 regex, which would split "s15" into
"s" "15", and ByteLevel decoder; saved with save_pretrained, reloaded with AutoTokenizer) read it:

* the student's: one token per symbol (the merges that spell " s0" .. " s15" and nothing else);
* the teacher's (coarse): the same merges, then ``--merges`` more learned by BPE over the symbol sequences of the
  teacher's training texts, so its tokens are runs of whole symbols (" s3 s2", " s1 s8 s11"): each of its boundaries is
  one of the student's, ~0.5 tokens per symbol with 200 merges. The merges are learned with one character per symbol
  and spelled back in bytes (BPE on the raw bytes would also merge across word boundaries, "5 s": this measures
  coarseness, not boundaries that disagree), and its ids differ from the student's, as a tokenizer of its own would.

Models are the demo's tiny Llamas. Teacher A (the student's tokenizer) and teacher B (the coarse one) train with CE on
the same texts, steps and batches of sequences: 500 steps, not the demo's 250, after which a teacher's quality still
hangs on its initialization (4.4-5.9 ppl across the inits and vocabulary sizes tried; 4.18-4.20 after 500). Then, per
seed, students with the same init, transfer set and budget (the demo's) differ only in the objective:

* CE only (alpha 0);
* same-tokenizer KD from teacher A (forward KL, T = 1, alpha 1: the demo's best student);
* cross-tokenizer KD from teacher B (forward KL, T = 1, alpha 1, the default weights: exact 1, ULD 0);
* the same with ULD weight 1, and with alpha 0.5 (half CE).

Tokenizations differ, so every model is scored in nats per *symbol*: a test sequence's total NLL over its completion
(prompt and completion are tokenized apart, as hf_kd.data does) divided by its number of completion symbols; ppl per
symbol is its exp. The headline is the share of the same-tokenizer gain kept, per seed (CE - cross) / (CE - same), then
mean and sample std over seeds. Also reported: the first training step's logged ``aligned_fraction`` (one-to-one
targets / all targets) and ``shared_mass`` (teacher B's mass on shared tokens per aligned target), and what the exact
term takes from teacher B against what teacher B knows (:func:`teacher_signal`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing hf_kd

RESULTS = Path(__file__).resolve().parent / "results"
SPECIALS = ["<pad>", "<eos>"]  # ids 0 and 1: the demo's models use pad_token_id 0 and eos_token_id 1
ALPHABET = ["Ġ", "s", *"0123456789"]  # byte-level BPE's stand-in for a space is "Ġ"
MERGES = 200  # learned coarse merges: ~0.5 teacher tokens per symbol on the demo's task
TEACHER_STEPS = 500  # the demo's 250 leave the teacher's quality to its init (4.4-5.9 ppl); 500: 4.2 either way
CE, SAME, CROSS = "CE only", "same-tokenizer KD (A)", "cross-tokenizer KD (B)"
METHODS = {  # name -> (teacher, DistillationConfig settings); alpha = 0 leaves only the CE on the sampled tokens
    CE: ("A", {"loss_type": "forward_kl", "alpha": 0.0}),
    SAME: ("A", {"loss_type": "forward_kl", "alpha": 1.0}),
    CROSS: ("B", {"loss_type": "forward_kl", "alpha": 1.0}),
    "cross-tokenizer, ULD weight 1 (B)": (
        "B",
        {"loss_type": "forward_kl", "alpha": 1.0, "cross_tokenizer_uld_weight": 1.0},
    ),
    "cross-tokenizer + CE, alpha 0.5 (B)": ("B", {"loss_type": "forward_kl", "alpha": 0.5}),
}


# ---- tokenizers -----------------------------------------------------------------------------------------------------


def word_merges(symbols: int) -> list[tuple[str, str]]:
    """Merges that spell every symbol word with its leading space ("Ġs5", "Ġs15") and nothing more. "Ġ" + "s" ranks
    first, so that "Ġs15" becomes "Ġs" "1" "5", then "Ġs1" "5", then "Ġs15"."""
    merges = [("Ġ", "s")] + [("Ġs", str(k)) for k in range(min(symbols, 10))]
    return merges + [("Ġs" + str(k)[:-1], str(k)[-1]) for k in range(10, symbols)]  # "Ġs1" + "5" -> "Ġs15"


def coarse_merges(seqs: torch.Tensor, symbols: int, count: int) -> list[tuple[str, str]]:
    """``count`` BPE merges learned over the word sequences of ``seqs`` ``[n, L]`` (each word one character for the
    trainer), spelled back in bytes: "Ġs3Ġs2", then "Ġs3Ġs2Ġs7" or "Ġs3Ġs2" + "Ġs1Ġs8", ..."""
    from tokenizers import Tokenizer, models, trainers

    chars = [chr(0x4E00 + k) for k in range(symbols)]  # symbol k -> one CJK character
    core = Tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=len(chars) + count, initial_alphabet=chars, limit_alphabet=len(chars), show_progress=False
    )
    core.train_from_iterator(["".join(chars[k] for k in row) for row in seqs.tolist()], trainer)
    merges = json.loads(core.to_str())["model"]["merges"]
    spell = lambda piece: "".join(f"Ġs{chars.index(c)}" for c in piece)
    return [(spell(a), spell(b)) for a, b in (m.split(" ") if isinstance(m, str) else m for m in merges)]


def save_tokenizer(merges: list[tuple[str, str]], path: str, reverse_ids: bool = False):
    """A byte-level BPE with these merges, saved to ``path`` and reloaded through ``AutoTokenizer``. Token ids follow
    the merges (``reverse_ids``: the last merge's token first, after the specials and the alphabet)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokens = [a + b for a, b in merges]
    pieces = dict.fromkeys(SPECIALS + ALPHABET + (tokens[::-1] if reverse_ids else tokens))
    core = Tokenizer(models.BPE(vocab={piece: i for i, piece in enumerate(pieces)}, merges=merges))
    # no GPT-2 regex: it would split "s15" into "s" and "15"; the coarse merges cross spaces
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>").save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def tokenized(seqs: torch.Tensor, tokenizer, folder: str, name: str):
    """Symbol sequences ``[n, L]`` -> the demo's dataset through a jsonl file and hf_kd.data: prompt = the first two
    symbols, tokenized apart from the completion; completion-only labels; no EOS. Unlike the demo's text the prompt
    starts with a space too, " s3 s5", so that every symbol is the same token wherever it stands (a byte-level BPE
    spells "s3" and " s3" with different tokens; the first symbol's own token would be seen once per sequence)."""
    from hf_kd.data import load_raw_dataset, tokenize_dataset
    from hf_kd.recipe.recipe import DataSection

    path = os.path.join(folder, f"{name}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for row in seqs.tolist():
            words = [f" s{k}" for k in row]
            f.write(json.dumps({"prompt": "".join(words[:2]), "completion": "".join(words[2:])}) + "\n")
    spec = DataSection(dataset=path, format="prompt_completion", add_eos=False, max_length=seqs.shape[1])
    return tokenize_dataset(load_raw_dataset(path), tokenizer, spec, desc=f"Tokenizing {name}")


# ---- scoring --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def nll_per_symbol(model, dataset, symbols: int, batch_size: int = 64) -> list[float]:
    """Each sequence's total NLL (nats) over its target tokens (labels != -100), divided by ``symbols``, the number of
    symbols its completion spells: comparable across tokenizations."""
    from hf_kd.data import DistillationCollator

    model.eval()
    collate, totals = DistillationCollator(), []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        logits, labels = logits[:, :-1], batch["labels"][:, 1:]  # logits at i predict the token at i + 1
        mask = labels != -100
        logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        totals += (-(logp * mask).sum(-1) / symbols).tolist()
    return totals


def tokens_per_symbol(dataset, symbols: int) -> float:
    """Mean target tokens per completion symbol."""
    return statistics.fmean(sum(label != -100 for label in row) for row in dataset["labels"]) / symbols


@torch.no_grad()
def teacher_signal(teacher, student_tok, teacher_tok, dataset, rows: int = 64) -> dict[str, float]:
    """What the exact term takes from a teacher of another tokenizer, against what the teacher knows, on the first
    ``rows`` examples of ``dataset`` (the student's tokens), where every student token is a shared token:

    * ``nll_shared`` / ``nll_marginal``: at common boundaries (one-to-one targets and the starts of merged spans, where
      both models have read the same text), the NLL of the actual next student token under the teacher's distribution
      over shared tokens renormalized (what comparing shared tokens alone would teach), and under its first-token
      marginal (each teacher token's probability credited to the student token it starts with: the teacher's own
      belief about the next symbol, and what hf_kd's exact term teaches);
    * ``span_gap``: on merged spans spelled by one teacher token, log P(any teacher token that starts with the span's
      text) - log P(that token), mean over spans: how far the chain-rule term's teacher probability falls short of the
      text's (0 where no longer token starts with it)."""
    from hf_kd.data import DistillationCollator
    from hf_kd.teachers.cross_tokenizer.alignment import align_batch
    from hf_kd.teachers.cross_tokenizer.vocabulary import shared_vocabulary

    shared = shared_vocabulary(student_tok, teacher_tok)
    batch = DistillationCollator()([dataset[i] for i in range(min(rows, len(dataset)))])
    labels = batch["labels"][:, 1:]  # aligned with the logits: labels[:, i] is the token position i predicts
    alignment = align_batch(batch["input_ids"], batch["attention_mask"], labels, student_tok, teacher_tok, shared)
    teacher.eval()
    logits = teacher(**alignment.teacher_inputs).logits[:, :-1]  # teacher position j predicts its token j + 1
    probs = torch.softmax(logits.double(), -1).reshape(-1, logits.shape[-1])
    spells = [tuple(teacher_tok.decode([v]).split()) for v in range(len(teacher_tok))]  # each teacher token's words
    student_of = {student_tok.decode([i]).strip(): i for i in range(len(student_tok))}
    starts_with = torch.zeros(len(teacher_tok), len(student_tok), dtype=torch.float64)  # [V_t, V_s]
    for v, words in enumerate(spells):
        if words and words[0] in student_of:
            starts_with[v, student_of[words[0]]] = 1.0
    s_rows, t_rows = torch.cat([alignment.pairs, alignment.span_starts], dim=1)
    targets = labels.reshape(-1)[s_rows]
    partner = torch.full((len(student_tok),), -1, dtype=torch.long)
    partner[shared.student_ids] = torch.arange(len(shared.student_ids))
    on_shared = probs[t_rows][:, shared.teacher_ids]
    renormalized = on_shared.gather(-1, partner[targets].unsqueeze(-1)).squeeze(-1) / on_shared.sum(-1)
    marginal = (probs[t_rows] @ starts_with).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    gaps = []
    rows_t, tokens_t, groups_t = alignment.span_teacher
    single = torch.bincount(groups_t)[groups_t] == 1
    for row, token in zip(rows_t[single].tolist(), tokens_t[single].tolist()):
        longer = [v for v, words in enumerate(spells) if words[: len(spells[token])] == spells[token]]
        gaps.append(math.log(probs[row, longer].sum()) - math.log(probs[row, token]))
    return {
        "boundaries": len(targets),
        "nll_shared": -renormalized.log().mean().item(),
        "nll_marginal": -marginal.log().mean().item(),
        "spans": len(gaps),
        "span_gap": statistics.fmean(gaps),
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def gain_kept(ce: float, same: float, cross: float) -> float:
    """The share of the same-tokenizer KD gain over CE that cross-tokenizer KD keeps (1: all of it, 0: none)."""
    return (ce - cross) / (ce - same)


# ---- the run --------------------------------------------------------------------------------------------------------


def run(s, seeds: list[int], out_dir: Path | None, merges: int = MERGES, command: str = "") -> dict:
    """Train both teachers, then every method x seed; print the tables and write them to ``out_dir`` (unless None) as
    ``cross_tokenizer.md``, the numbers as ``cross_tokenizer.json``; return the JSON."""
    import datasets
    from transformers import Trainer
    from transformers.utils import logging as hf_logging

    from benchmarks.machine import machine
    from hf_kd import DistillationCollator, DistillationTrainer, demo

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    started, cpu_started = time.time(), time.process_time()
    rng = np.random.default_rng(0)  # the process, the data and the teachers are fixed; seeds vary the students
    chain = demo.make_chain(s, rng)
    sizes = {"teacher": s.teacher_seqs, "student": s.student_seqs, "test": s.test_seqs}
    splits = {name: demo.sample(chain, n, s.seq_len, rng) for name, n in sizes.items()}
    symbols = s.seq_len - 2  # completion symbols per sequence
    entropy = math.log(demo.true_process_metrics(chain, splits["test"])[0])  # the true process's nats per symbol

    with tempfile.TemporaryDirectory() as tmp:
        # reversed ids: with the student's ids and more tokens after them, hf_kd would take the coarse tokenizer for
        # the student's vocabulary extended (alignment.same_ids) and feed teacher B the student's tokens
        coarse = word_merges(s.symbols) + coarse_merges(splits["teacher"], s.symbols, merges)
        toks = {
            "A": save_tokenizer(word_merges(s.symbols), os.path.join(tmp, "tok_A")),
            "B": save_tokenizer(coarse, os.path.join(tmp, "tok_B"), reverse_ids=True),
        }
        data = {(t, name): tokenized(seqs, toks[t], tmp, f"{name}_{t}") for t in toks for name, seqs in splits.items()}
        teachers, tokenizers = {}, {}
        for t, tok in toks.items():
            teachers[t] = demo.build_model(len(tok), s.teacher_size, s.seq_len, seed=0)
            clock = time.time()
            demo._train(
                Trainer,
                f"teacher {t} (CE)",
                s.teacher_steps,
                model=teachers[t],
                train_dataset=data[t, "teacher"],
                args=demo._args(tmp, s, s.teacher_steps, 0),
                data_collator=DistillationCollator(),
            )
            tokenizers[t] = {
                "vocab": len(tok),
                "tokens_per_symbol": tokens_per_symbol(data[t, "test"], symbols),
                "params": sum(p.numel() for p in teachers[t].parameters()),
                "train_s": time.time() - clock,
                "nll": statistics.fmean(nll_per_symbol(teachers[t], data[t, "test"], symbols)),
            }
        signal = teacher_signal(teachers["B"], toks["A"], toks["B"], data["A", "student"])

        runs: dict[str, list[dict]] = {name: [] for name in METHODS}
        for seed in seeds:
            for name, (t, settings) in METHODS.items():
                student = demo.build_model(len(toks["A"]), s.student_size, s.seq_len, seed=1000 + seed)  # one init
                cross = {"teacher_tokenizer_name_or_path": os.path.join(tmp, "tok_B")} if t == "B" else {}
                args = demo._args(
                    tmp, s, s.student_steps, seed, temperature=1.0, logging_first_step=True, **settings, **cross
                )
                clock, cpu = time.time(), time.process_time()
                trainer = demo._train(
                    DistillationTrainer,
                    f"seed {seed}, {name}",
                    s.student_steps,
                    model=student,
                    teacher_model=teachers[t],
                    args=args,
                    train_dataset=data["A", "student"],
                    processing_class=toks["A"],
                )
                assert (type(trainer.teacher).__name__ == "CrossTokenizerTeacher") == (t == "B")
                logs = [e for e in trainer.state.log_history if "loss" in e]  # logs[0]: the first step alone
                fractions = [e["aligned_fraction"] for e in logs if "aligned_fraction" in e]
                runs[name].append(
                    {
                        "nll": statistics.fmean(nll_per_symbol(student, data["A", "test"], symbols)),
                        "train_s": time.time() - clock,
                        "train_cpu_s": time.process_time() - cpu,
                        "first_step": {
                            k: logs[0][k] for k in ("aligned_fraction", "shared_mass", "distill_loss") if k in logs[0]
                        },
                        "mean_aligned_fraction": statistics.fmean(fractions) if fractions else None,
                    }
                )

    methods = {name: {"nll": mean_std([r["nll"] for r in values]), "runs": values} for name, values in runs.items()}
    for name in [name for name, (t, _) in METHODS.items() if t == "B"]:
        kept = [gain_kept(ce["nll"], same["nll"], x["nll"]) for ce, same, x in zip(runs[CE], runs[SAME], runs[name])]
        methods[name]["gain_kept"] = {"per_seed": kept, "mean_std": mean_std(kept)}
    results = {
        "settings": asdict(s),
        "seeds": seeds,
        "merges": merges,
        "entropy_nats_per_symbol": entropy,
        "tokenizers": tokenizers,
        "teacher_signal": signal,
        "methods": methods,
        "threads": torch.get_num_threads(),
        "machine": machine(),
        "command": command,
        "wall_s": round(time.time() - started, 1),
        "cpu_s": round(time.process_time() - cpu_started, 1),
    }
    text = markdown(results)
    print(text)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "cross_tokenizer.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
        (out_dir / "cross_tokenizer.md").write_text(text + "\n", encoding="utf-8")
    return results


# ---- the tables -----------------------------------------------------------------------------------------------------


def _pct(pair) -> str:
    return f"{100 * pair[0]:.0f}% ± {100 * pair[1]:.0f}%"


def _verdict(kept: list[float]) -> str:
    if all(k < 0 for k in kept):
        return "worse than CE alone on every seed"
    if all(k > 0 for k in kept):
        return "better than CE alone on every seed"
    return "better than CE alone on some seeds, worse on others"


def markdown(results: dict) -> str:
    """The README section (the headline table and what it shows), then the details."""
    s, seeds, tok, m, sig = (results[k] for k in ("settings", "seeds", "tokenizers", "methods", "teacher_signal"))
    kept = m[CROSS]["gain_kept"]
    variants = [name for name in m if "gain_kept" in m[name] and name != CROSS]
    aligned = statistics.fmean(r["first_step"]["aligned_fraction"] for r in m[CROSS]["runs"])
    floor = results["entropy_nats_per_symbol"]
    mixed = "some" in _verdict(kept["per_seed"])
    sure = "not even the sign is sure" if mixed else "the default objective's sign holds on every seed"
    readme = [
        "## README section",
        "",
        (
            f"**Cross-tokenizer KD** (`benchmarks/cross_tokenizer.py`, the demo's task): teacher B reads the text with a "
            f"coarser byte-level BPE ({tok['B']['tokens_per_symbol']:.2f} tokens per symbol, {tok['B']['vocab']} tokens) "
            f"than the student ({tok['A']['tokens_per_symbol']:.2f}, {tok['A']['vocab']}); teacher A uses the student's. "
            f"Held-out NLL per symbol (floor {floor:.3f}), mean ± std over {len(seeds)} student seeds; gain kept = "
            "(CE - x) / (CE - same-tokenizer KD), per seed:"
        ),
        "",
        "| model | NLL / symbol | ppl / symbol | gain kept |",
        "|---|---|---|---|",
        *(
            f"| teacher {t} ({what} tokenizer) | {tok[t]['nll']:.3f} | {math.exp(tok[t]['nll']):.2f} | |"
            for t, what in (("A", "student's"), ("B", "coarse"))
        ),
        *(
            f"| student: {name} | {v['nll'][0]:.3f} ± {v['nll'][1]:.3f} | {math.exp(v['nll'][0]):.2f} | "
            f"{_pct(v['gain_kept']['mean_std']) if 'gain_kept' in v else ''} |"
            for name, v in m.items()
        ),
        "",
        (
            f"Teacher B, trained on the same texts and budget, is {tok['B']['nll'] - tok['A']['nll']:.2f} nats per symbol "
            f"behind teacher A and {m[CE]['nll'][0] - tok['B']['nll']:.2f} ahead of the CE-only student; cross-tokenizer KD "
            f"with the default objective keeps {_pct(kept['mean_std'])} of the same-tokenizer gain (per seed "
            f"{', '.join(f'{100 * k:.0f}%' for k in kept['per_seed'])}: {_verdict(kept['per_seed'])}); "
            + "; ".join(
                f"{name.removesuffix(' (B)')}: {_pct(m[name]['gain_kept']['mean_std'])}, "
                f"{_verdict(m[name]['gain_kept']['per_seed'])}"
                for name in variants
            )
            + ". "
            f"Only {100 * aligned:.0f}% of the targets align one to one. Where both have read the same text the student "
            f"learns teacher B's next-token probabilities credited to the symbol each of its tokens starts with (its own "
            f"belief: NLL of the next symbol {sig['nll_marginal']:.2f} nats, against {sig['nll_shared']:.2f} for its "
            "probabilities of the shared one-symbol tokens alone, which exclude every longer token), targets inside a "
            "teacher token learn what its tokens spell next, and a merged span's chain rule ends with every token that "
            f"goes on with the span's text (the last token alone falls {sig['span_gap']:.2f} nats short on average). "
            f"Teacher B itself, not A, bounds what it can teach. "
            f"One task, one tokenizer pair, {len(seeds)} seeds: "
            f"{sure}, its size is rough."
        ),
    ]
    details = [
        "",
        "## Details",
        "",
        (
            f"Order-2 Markov chain, {s['symbols']} symbols, {s['successors']} successors per context; test set "
            f"{s['test_seqs']} sequences x {s['seq_len'] - 2} completion symbols. Teachers h={s['teacher_size'][0]} "
            f"L={s['teacher_size'][1]}, {s['teacher_seqs']} sequences, {s['teacher_steps']} steps x batch {s['batch_size']}; "
            f"students h={s['student_size'][0]} L={s['student_size'][1]}, {s['student_seqs']} transfer sequences, "
            f"{s['student_steps']} steps x batch {s['batch_size']}, lr {s['learning_rate']:g} cosine, T = 1; seeds "
            f"{seeds}; coarse tokenizer: {results['merges']} learned merges."
        ),
        "",
        "| tokenizer | vocabulary | tokens / symbol | teacher params | teacher train s | teacher NLL / symbol |",
        "|---|---|---|---|---|---|",
        *(
            f"| {t} | {v['vocab']} | {v['tokens_per_symbol']:.3f} | {v['params']:,} | {v['train_s']:.0f} | {v['nll']:.4f} |"
            for t, v in (("A (student's)", tok["A"]), ("B (coarse)", tok["B"]))
        ),
        "",
        "| student | NLL / symbol, per seed | s/run wall (CPU) | first step: aligned fraction, shared mass, distill loss |",
        "|---|---|---|---|",
        *(
            f"| {name} | {', '.join(format(r['nll'], '.4f') for r in v['runs'])} | "
            f"{statistics.fmean(r['train_s'] for r in v['runs']):.1f} "
            f"({statistics.fmean(r['train_cpu_s'] for r in v['runs']):.1f}) | "
            f"{'; '.join(', '.join(f'{x:.3g}' for x in r['first_step'].values()) for r in v['runs'])} |"
            for name, v in m.items()
        ),
    ]
    cross = [r for name in [CROSS, *variants] for r in m[name]["runs"]]
    plain = [r for name in (CE, SAME) for r in m[name]["runs"]]
    slower = statistics.fmean(r["train_cpu_s"] for r in cross) / statistics.fmean(r["train_cpu_s"] for r in plain)
    details += [
        "",
        (
            f"Teacher signal ({sig['boundaries']} common boundaries, {sig['spans']} one-token spans in the first 64 "
            f"transfer sequences): next-symbol NLL {sig['nll_shared']:.3f} (shared tokens, renormalized) vs "
            f"{sig['nll_marginal']:.3f} (first-symbol marginal); span gap {sig['span_gap']:.3f} nats. "
            f"Mean aligned fraction over a cross run: {statistics.fmean(r['mean_aligned_fraction'] for r in cross):.3f}. "
            f"A cross-tokenizer run takes {slower:.1f}x the CPU time of a same-tokenizer one (alignment in Python, every "
            "batch)."
        ),
        "",
        (
            f"Machine: {results['machine']}; {results['threads']} torch thread(s). Command: `{results['command']}`. "
            f"Wall {results['wall_s']:.0f} s, CPU {results['cpu_s']:.0f} s."
        ),
    ]
    return "\n".join(readme + details)


def main() -> None:
    from hf_kd.cli.demo import FAST, Settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the demo's FAST settings and one seed: seconds")
    parser.add_argument("--seeds", type=int, default=3, help="student seeds per method")
    parser.add_argument("--merges", type=int, default=MERGES, help="learned merges of the coarse tokenizer")
    parser.add_argument("--out", type=Path, help=f"JSON and markdown go here (default: {RESULTS.name}/; --quick: none)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models gain nothing from more)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = list(range(1 if args.quick else args.seeds))
    s = FAST if args.quick else replace(Settings(), teacher_steps=TEACHER_STEPS)
    command = " ".join(["python benchmarks/cross_tokenizer.py", *sys.argv[1:]])
    run(s, seeds, args.out or (None if args.quick else RESULTS), args.merges, command)


if __name__ == "__main__":
    main()
