"""Token accounting: target counts, the logged loss components and the evaluation sums, exact across gradient
accumulation and processes.

* **Counts**: :meth:`Accounting.count_step` takes the global number of target positions of one optimizer step from the
  micro-batches the loss will actually see (after any rewrite, e.g. generation); every loss divides by it.
* **Training components** (``distill_loss``, ``ce_loss``, any ``*_loss`` a subclass adds): each micro-batch's value is
  already normalized by the step's global count, so their sum over micro-batches and processes is the step's global
  mean; a logging window reports the mean over the steps *in that window* (not since step 0, which after a resume
  would divide by steps this run never took), and the end of training reports the mean over the whole run.
* **Throughput**: ``target_tokens_per_second`` in each training log, the window's target positions (all processes)
  over its wall time (from the first step after the previous log to this log, evaluations excluded); the end of
  training reports ``train_target_tokens_per_second`` over the run the same way.
* **Evaluation**: per-batch means weighted back by their target counts, so ``eval_loss`` and every component are
  token-weighted over the whole evaluation set (``eval_loss == alpha * eval_distill_loss + (1 - alpha) *
  eval_ce_loss``), plus the teacher-agreement sums of :mod:`hf_kd.objective.metrics`, reduced in one collective.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from transformers import TrainerCallback

from hf_kd.objective.metrics import HEALTH_TOP_K, add_sums, finalize_metrics

RATES = (
    "aligned_fraction",
    "shared_mass",
)  # cross-tokenizer terms, normalized like the loss (hf_kd.teachers.cross_tokenizer.loss)


def component_names(terms: Mapping[str, torch.Tensor | None]) -> list[str]:
    """The logged components of a ``distillation_terms`` result: every ``*_loss`` key but the total ``loss``, the
    cross-tokenizer rates and the per-teacher ``teacher/<name>/...`` sums of several teachers."""
    return [
        name
        for name, value in terms.items()
        if name != "loss"
        and (name.endswith("_loss") or name in RATES or name.startswith("teacher/"))
        and value is not None
    ]


def per_aligned_target(logs: dict[str, float], prefix: str = "") -> dict[str, float]:
    """``shared_mass`` comes summed over one-to-one targets and divided like the loss: divided by
    ``aligned_fraction`` it is the teacher's mean mass on shared tokens per aligned target. Likewise a routed
    teacher's ``teacher/<name>/divergence`` (summed over its tokens) divided by its ``token_share`` is its mean
    divergence per routed token (:mod:`hf_kd.teachers.mixing`); left out of a window that routed it no token."""
    pairs = [(f"{prefix}shared_mass", f"{prefix}aligned_fraction")]
    pairs += [
        (key[: -len("token_share")] + "divergence", key)
        for key in logs
        if key.startswith(f"{prefix}teacher/") and key.endswith("/token_share")
    ]
    for value, fraction in pairs:
        if value not in logs or fraction not in logs:
            continue
        if logs[fraction] > 0:
            logs[value] = logs[value] / logs[fraction]
        elif value.endswith("/divergence"):  # a teacher routed no token in the window: its mean is undefined, not 0
            del logs[value]
        else:
            logs[value] = 0.0
    return logs


def reduce_sums(sums: Mapping[str, torch.Tensor], reduce, device) -> dict[str, float | list[float]]:
    """Sum every tensor of ``sums`` over processes in one collective; each comes back in its own shape (a 0-dim sum
    as a float, a vector of calibration bins as a list), whatever its name."""
    names = sorted(sums)
    values = [torch.as_tensor(sums[name], dtype=torch.float64, device=device) for name in names]
    flat = reduce(torch.cat([value.reshape(-1) for value in values]))
    totals, offset = {}, 0
    for name, value in zip(names, values):
        totals[name] = flat[offset : offset + value.numel()].reshape(value.shape).tolist()
        offset += value.numel()
    return totals


class Accounting(TrainerCallback):
    """Owned by the trainer (and one of its callbacks: the clocks start when training does); ``reduce`` sums a float64
    tensor over processes (identity on one process)."""

    def __init__(self, reduce, device, language_model: bool):
        self._reduce_sum, self._device, self._language_model = reduce, device, language_model
        self.tokens_trained = 0  # target positions of this run's optimizer steps, all processes (for the model card)
        self.steps_counted = 0  # optimizer steps in tokens_trained (fewer than global_step after a resume)
        self._window: dict[str, torch.Tensor] = {}  # training components since the last training log
        self._window_steps = 0
        self._run: dict[str, torch.Tensor] = {}  # training components of this whole run
        self._uncounted: dict[str, torch.Tensor] = {}  # training terms without a step count (token-weighted)
        self._generation: dict[str, torch.Tensor] = {}  # generated completions since the last training log
        self._window_started = time.perf_counter()
        self._clock = _Clock()  # throughput: this window's target tokens over its wall time
        self._run_clock = _Clock()  # ... and the whole run's
        self._eval_started: float | None = None
        self._eval: dict[str, torch.Tensor] = {}  # evaluation: loss and components weighted by tokens, + "tokens"
        self._agreement: dict[str, torch.Tensor] = {}  # evaluation: hf_kd.objective.metrics sums

    # ---- counts -------------------------------------------------------------------------------------------------

    def on_step_end(self, args, state, control, **kwargs):
        """The last step logs its window even when it is shorter than ``logging_steps`` (a short run has logs, and
        its card the losses)."""
        if state.global_step >= state.max_steps > 0 and self._window_steps:
            control.should_log = True
        return control

    def on_train_begin(self, args, state, control, **kwargs):
        """Training starts (before its first batch is fetched or generated): the clocks start here."""
        self._clock.start()
        self._run_clock.start()
        self._window_started = time.perf_counter()

    def count_step(self, local_count: torch.Tensor) -> torch.Tensor:
        """One optimizer step's target count on this process -> the global count (what every loss divides by)."""
        count = self._reduce_sum(local_count)
        self.tokens_trained = self.tokens_trained + count.detach()  # a tensor: no device sync per step
        self._clock.add(count.detach())
        self._run_clock.add(count.detach())
        self.steps_counted += 1
        self._window_steps += 1
        return count

    # ---- recording ----------------------------------------------------------------------------------------------

    def record_train(self, terms: Mapping[str, torch.Tensor | None], tokens: torch.Tensor | None) -> None:
        """A training micro-batch's components; ``tokens`` only when they were not normalized by a step count."""
        if tokens is not None:  # e.g. compute_loss called by hand in training mode: weight by this batch's targets
            self._add(self._uncounted, terms, ["loss", *component_names(terms)], tokens)
            return
        names = component_names(terms)
        self._add(self._window, terms, names, None)
        self._add(self._run, terms, ["loss", *names], None)  # the run's loss too: the exact train_loss

    def record_generation(self, stats: Mapping[str, float] | None, seconds: float = 0.0) -> None:
        """A micro-batch of a run that generates: its :func:`~hf_kd.training.generation.completion_stats` if it was
        generated, else None."""
        add = {"micro_batches": 1.0, "generated_batches": 0.0 if stats is None else 1.0, "seconds": seconds}
        for name, value in {**add, **(stats or {})}.items():
            self._generation[name] = self._generation.get(name, 0.0) + value

    def record_health(self, sums: Mapping[str, torch.Tensor]) -> None:
        """On-policy health sums of a student-written micro-batch (:func:`hf_kd.objective.terms.sample_health`)."""
        for name, value in sums.items():
            self._generation[f"health_{name}"] = self._generation.get(f"health_{name}", 0.0) + float(value)

    def record_eval(
        self,
        terms: Mapping[str, torch.Tensor | None],
        tokens: torch.Tensor,
        agreement: Mapping[str, torch.Tensor] | None,
    ) -> None:
        """An evaluation batch: its per-batch means weighted back by its ``tokens`` target positions."""
        self._add(self._eval, terms, ["loss", *component_names(terms)], tokens)
        if agreement:
            add_sums(self._agreement, dict(agreement))

    @staticmethod
    def _add(bucket: dict, terms, names, tokens) -> None:
        if tokens is not None:
            tokens = torch.as_tensor(tokens, dtype=torch.float64)
            bucket["tokens"] = bucket.get("tokens", 0) + tokens
        for name in names:
            value = terms[name].detach().to(torch.float64)
            bucket[name] = bucket.get(name, 0) + (value if tokens is None else value * tokens.to(value.device))

    # ---- reporting ----------------------------------------------------------------------------------------------

    def train_logs(self) -> dict[str, float]:
        """The components of the steps since the last call, each the mean of its steps' global means; with generated
        completions also their mean length, the fraction that ended with EOS, the fraction of micro-batches generated
        and the share of the window's wall time spent generating."""
        logs = per_aligned_target(self._means(self._window, self._window_steps))
        self._window_steps = 0
        logs.update({k: v for k, v in self._means(self._uncounted, None).items() if k != "loss"})
        if self._generation:
            logs.update(self._generation_logs(time.perf_counter() - self._window_started))
        self._window_started = time.perf_counter()
        rate = self._clock.rate()
        if rate is not None:
            logs["target_tokens_per_second"] = rate
        self._clock = _Clock(started=time.perf_counter())  # the next window starts now, generation included
        return logs

    def _generation_logs(self, wall_seconds: float) -> dict[str, float]:
        names = sorted(self._generation)
        values = torch.tensor([self._generation[n] for n in names], dtype=torch.float64, device=self._device)
        processes = self._reduce_sum(torch.ones((), dtype=torch.float64, device=self._device)).item()
        totals = dict(zip(names, self._reduce_sum(values).tolist()))
        self._generation = {}
        logs = {
            "generated_fraction": totals["generated_batches"] / max(totals["micro_batches"], 1.0),
            "generation_time_share": totals["seconds"] / processes / max(wall_seconds, 1e-9),
        }
        if totals.get("completions"):
            logs["completion_length"] = totals["tokens"] / totals["completions"]
            logs["completion_eos_fraction"] = totals["ended"] / totals["completions"]
            logs["completion_truncated_fraction"] = totals["truncated"] / totals["completions"]
            logs["completion_repeated_4gram_fraction"] = totals["repeated_ngrams"] / max(totals["ngrams"], 1.0)
        if totals.get("health_count"):  # the student's own samples: entropy and the teacher's mass on its top-k
            count = totals["health_count"]
            logs["onpolicy_student_entropy"] = totals["health_entropy"] / count
            if "health_teacher_mass" in totals:
                logs[f"onpolicy_teacher_mass_on_student_top{HEALTH_TOP_K}"] = totals["health_teacher_mass"] / count
        return logs

    def run_logs(self, prefix: str = "train_") -> dict[str, float]:
        """The components over every step this run counted (the end-of-training summary, like ``train_loss``)."""
        logs = {f"{prefix}{name}": value for name, value in self._means(self._run, self.steps_counted).items()}
        per_aligned_target(logs, prefix)
        rate = self._run_clock.rate()
        if rate is not None:
            logs[f"{prefix}target_tokens_per_second"] = rate
        return logs

    def reset_eval(self) -> None:
        """The start of an evaluation loop (its time is left out of the training throughput)."""
        self._eval, self._agreement = {}, {}
        self._eval_started = time.perf_counter()

    def eval_metrics(self, prefix: str) -> dict[str, float]:
        """Token-weighted ``{prefix}_loss`` and components, and the agreement metrics; clears the sums."""
        metrics = {f"{prefix}_{name}": value for name, value in self._means(self._eval, None).items()}
        per_aligned_target(metrics, f"{prefix}_")
        if self._agreement:
            totals = reduce_sums(self._agreement, self._reduce_sum, self._device)
            rates = finalize_metrics(totals, language_model=self._language_model)
            metrics.update({f"{prefix}_{name}": value for name, value in rates.items()})
        self._eval, self._agreement = {}, {}
        if self._eval_started is not None:
            for clock in (self._clock, self._run_clock):
                clock.pause(time.perf_counter() - self._eval_started)
            self._eval_started = None
        return metrics

    def _means(self, bucket: dict, steps: int | None) -> dict[str, float]:
        """Sum ``bucket`` over processes and normalize: by its token count if it keeps one, else per step."""
        if not bucket:
            return {}
        names = sorted(bucket)
        values = torch.stack([torch.as_tensor(bucket[n], dtype=torch.float64, device=self._device) for n in names])
        totals = dict(zip(names, self._reduce_sum(values).tolist()))
        bucket.clear()
        tokens = totals.pop("tokens", None)
        divisor = max(tokens, 1.0) if tokens is not None else max(steps or 1, 1)
        return {name: value / divisor for name, value in totals.items()}


class _Clock:
    """Target tokens over the wall time since the window (or the run) started, less the pauses (evaluations).

    A window starts where the last one ended (the log), not at its first counted step: a step's generated completions
    are made before its targets are counted, and their time belongs to the window's throughput."""

    def __init__(self, started: float | None = None):
        self.tokens, self.started, self.paused = 0, started, 0.0

    def start(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def add(self, tokens: torch.Tensor) -> None:
        if self.started is None:
            self.started = time.perf_counter()
        self.tokens = self.tokens + tokens  # a tensor: read once, at the log

    def pause(self, seconds: float) -> None:
        if self.started is not None:
            self.paused += seconds

    def rate(self) -> float | None:
        if self.started is None:
            return None
        seconds = time.perf_counter() - self.started - self.paused
        return float(self.tokens) / max(seconds, 1e-9)
