"""The demo's synthetic task: a known order-2 Markov chain over a few dozen symbols, so that every quality is measurable
exactly -- the held-out perplexity floor of the true process, and the true process's likelihood of a model's own free
samples (how good on-policy distillation makes them) -- plus its tokenizer and data files."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch

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


FAST = Settings(
    symbols=12,
    successors=4,
    seq_len=32,
    teacher_seqs=600,
    student_seqs=80,
    valid_seqs=40,
    test_seqs=100,
    teacher_size=(48, 2),
    student_size=(32, 1),
    teacher_steps=60,
    student_steps=30,
    batch_size=16,
    evals=2,
)


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


# A token the process cannot emit (a special such as <eos>, a symbol outside its context's successors, or any token
# whose two-token context holds a special) has probability 0: its true NLL is infinite. It is charged this many nats
# instead -- as if the process gave it probability 1e-4, ~6x the NLL of a likely token -- and counted apart.
IMPOSSIBLE_NATS = math.log(1e4)


def process_nll(chain: torch.Tensor, tokens: torch.Tensor, prompt_len: int = 2) -> dict:
    """Score token sequences under the true process: NLL per token of positions ``prompt_len..``.

    ``tokens`` is ``[n, L]`` token ids (symbol k is token ``k + len(SPECIALS)``). Returns ``nll`` (mean NLL per
    scored token, an impossible token charged :data:`IMPOSSIBLE_NATS`), ``impossible`` and ``specials`` (counts of
    such tokens), ``tokens`` (the count scored) and ``mode_bound``: the mean over the same positions of the least NLL
    any token could have had there (``-log max_c P(c | context)``, or the charge where the context is impossible).
    ``nll >= mode_bound`` holds for every sample, while ``nll`` itself can fall below the process entropy: a sampler
    sharper than the process (greedy, low temperature, mode-seeking) scores better than the process's own samples.
    """
    k = chain.shape[0]
    symbols = tokens.long() - len(SPECIALS)  # [n, L]; < 0 or >= K: not a symbol of the chain
    valid = (symbols >= 0) & (symbols < k)
    sym = symbols.clamp(0, k - 1)
    probs = chain.double()[sym[:, prompt_len - 2 : -2], sym[:, prompt_len - 1 : -1]]  # [n, L - p, K]: P(x_t | t-2, t-1)
    target, context_ok = sym[:, prompt_len:], valid[:, prompt_len - 2 : -2] & valid[:, prompt_len - 1 : -1]
    p = probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    possible = context_ok & valid[:, prompt_len:] & (p > 0)
    nll = torch.where(possible, -p.clamp_min(1e-300).log(), torch.full_like(p, IMPOSSIBLE_NATS))
    best = torch.where(context_ok, -probs.max(-1).values.log(), torch.full_like(p, IMPOSSIBLE_NATS))
    return {
        "nll": nll.mean().item(),
        "impossible": int((~possible).sum()),
        "specials": int((~valid[:, prompt_len:]).sum()),
        "tokens": nll.numel(),
        "mode_bound": best.mean().item(),
    }


@torch.no_grad()
def token_nll(model, tokens: torch.Tensor, prompt_len: int = 2, batch_size: int = 256) -> float:
    """A model's mean NLL per token of ``tokens[:, prompt_len:]`` (teacher-forced, T = 1)."""
    model.eval()
    total = 0.0
    for start in range(0, tokens.shape[0], batch_size):
        ids = tokens[start : start + batch_size]
        logp = torch.log_softmax(model(input_ids=ids).logits.double(), dim=-1)
        # logits at position i predict the token at i + 1: positions prompt_len - 1 .. L - 2 score prompt_len .. L - 1
        total -= logp[:, prompt_len - 1 : -1].gather(-1, ids[:, prompt_len:].unsqueeze(-1)).sum().item()
    return total / (tokens.shape[0] * (tokens.shape[1] - prompt_len))


@torch.no_grad()
def sample_quality(
    model, chain: torch.Tensor, prompts: torch.Tensor, seq_len: int, seed: int = 0, teacher=None, batch_size: int = 256
) -> dict:
    """How good a model's free-running samples are, scored by the process that made the data.

    Each prompt (``[n, 2]`` symbol ids: a test sequence's first two symbols) is completed to ``seq_len`` tokens by
    ``model.generate`` at temperature 1 (no top-k / top-p, seeded, EOS not a stop: whatever the model emits, <eos>
    included, stays in the sample and is scored). Returns :func:`process_nll`'s fields for the completions, plus
    ``self_nll`` (the model's own NLL of them: its per-token entropy, estimated), ``kl`` = ``nll - self_nll`` (an
    estimate of KL(model || process) per token, >= 0 in expectation and 0 only for the process itself, so unlike
    ``nll`` it cannot be gamed by a sharper sampler), and ``teacher_nll`` when a teacher is given.
    """
    from transformers import GenerationConfig

    # eos_token_id=[]: no stop (None would be refilled with the model's <eos> by generate, which then pads after it)
    config = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=seq_len - 2, eos_token_id=[], pad_token_id=0
    )
    model.eval()
    ids = prompts.long() + len(SPECIALS)
    samples = []
    with torch.random.fork_rng(devices=[]):  # seeded, without moving the caller's random stream
        torch.manual_seed(seed)
        for start in range(0, ids.shape[0], batch_size):
            chunk = ids[start : start + batch_size]
            mask = torch.ones_like(chunk)
            samples.append(model.generate(input_ids=chunk, attention_mask=mask, generation_config=config))
    samples = torch.cat(samples)  # [n, seq_len]
    result = process_nll(chain, samples)
    result["self_nll"] = token_nll(model, samples, batch_size=batch_size)
    result["kl"] = result["nll"] - result["self_nll"]
    if teacher is not None:
        result["teacher_nll"] = token_nll(teacher, samples, batch_size=batch_size)
    return result


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
