"""How several teachers' signals become one target, per batch: mixed by weights, or routed one teacher per example.

* **Weights**: the target is ``m = sum_i w_i p_i`` with ``p_i = softmax(z_i / T)`` (exact: the log of the weighted sum
  of probabilities, never a mix of logits). The loss's divergences read a teacher through ``log_softmax(x / T)``, so
  the mixture hands them ``x = T log m``, whose ``log_softmax(x / T)`` is ``log m`` itself: every divergence on
  log-probabilities, on every path (dense, and the fused driver chunk by chunk, never ``[tokens, vocab]`` at once).
  ``mse`` compares raw logits, which a mixture does not have: refused.
* **Routing**: ``route`` ``[B]`` names each example's teacher (a member index); every target position of the example
  is distilled from that member's own logits, so every divergence works (``mse`` too). Each row's teacher head runs
  once (the fused path computes a member's logits for its own rows only); every member's forward (or request to
  its server) still runs on every example, so routing saves head matmuls, not teacher forwards.

Per-teacher logs (``teacher/<name>/divergence``, and with routing ``teacher/<name>/token_share``), normalized like
the loss and summed like any logged component (:mod:`hf_kd.training.accounting`):

* routing: the objective's divergence summed over the member's target rows, and their number, each divided by the
  step's count; the accounting divides the first by the second, which makes it the member's mean divergence per
  routed token (the shares sum to 1, the divergences weighted by them to ``distill_loss``). Cost: the divergence of
  each chunk evaluated once more without a graph (no matmul);
* weights: the objective's divergence of the student against each member alone over every target (its weight is
  known: no share). Cost: per member and chunk one more divergence evaluation without a graph (no matmul; the members'
  logits are computed for the mixture anyway) and, on the fused path, one ``[chunk, V]`` buffer per member.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hf_kd.objective.chunking import SOURCES, ChunkTeacher
from hf_kd.objective.losses import Objective, distillation_loss, normalizer, target_rows
from hf_kd.objective.signals import StudentHidden, TeacherLogits
from hf_kd.objective.terms import full_logits


def mixed_log_probs(logits: Sequence[torch.Tensor], weights: Sequence[float], temperature: float) -> torch.Tensor:
    """``[N, V]`` logits of each member -> ``log sum_i w_i softmax(z_i / T)`` ``[N, V]`` (weights summing to 1)."""
    parts = [
        torch.log_softmax(z / temperature if temperature != 1 else z, -1) + math.log(w)
        for z, w in zip(logits, weights)
        if w > 0
    ]
    return torch.logsumexp(torch.stack(parts), dim=0)


def routed_logits(logits: Sequence[torch.Tensor], route: torch.Tensor) -> torch.Tensor:
    """``[B, ..., V]`` logits of each member and ``route`` ``[B]`` member indices -> each example's member's logits."""
    out = logits[0].clone()
    for index, z in enumerate(logits[1:], start=1):
        rows = route == index
        out[rows] = z[rows]
    return out


def divergence_key(name: str) -> str:
    return f"teacher/{name}/divergence"


def share_key(name: str) -> str:
    return f"teacher/{name}/token_share"


@dataclass(frozen=True)
class TeacherMixture:
    """The members' signals for one batch (each ``[B, ..., V]`` aligned with the targets), their names, and either
    their weights or ``route`` ``[B]`` (each example's member index)."""

    signals: tuple
    weights: tuple[float, ...]
    names: tuple[str, ...]
    route: torch.Tensor | None = None

    def terms(
        self,
        student,
        labels,
        objective: Objective,
        *,
        num_items_in_batch=None,
        chunk_size: int = 256,
        vocab_size: int | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """:func:`hf_kd.objective.terms.objective_terms` for several teachers, with the per-teacher logs: the fused
        driver with this signal as its source (hidden-state students), or the dense loss on the full target."""
        raw = [d.name for d in objective.divergences.values() if not d.uses_log_probs]
        if raw and self.route is None:  # also for a MixtureTeacher made in Python (not set up by make_teacher)
            raise ValueError(
                f"loss_type: {', '.join(raw)} compares raw logits, which a mixture of teachers does not have"
            )
        names = ("loss", "distill_loss", "ce_loss")
        if isinstance(student, StudentHidden):
            from hf_kd.objective.fused import fused_objective

            *values, sums = fused_objective(
                student,
                self,
                labels,
                objective,
                num_items_in_batch=num_items_in_batch,
                chunk_size=chunk_size,
                vocab_size=vocab_size,
                return_components=True,
                return_extras=True,
            )
            # a micro-batch without a target row runs no chunk and so no sum: every key all the same, for the logs
            # of every process must hold the same keys (they are all-reduced as one vector)
            zero = values[0].detach() * 0
            return {**dict(zip(names, values)), **{key: zero for key in self.log_keys()}, **sums}
        members = [s.logits if isinstance(s, TeacherLogits) else full_logits(s.hidden, s.head) for s in self.signals]
        members = [z[..., :vocab_size].float() for z in members]
        if self.route is None:
            teacher = objective.temperature * mixed_log_probs(members, self.weights, objective.temperature)
        else:
            teacher = routed_logits(members, self.route)
        values = distillation_loss(
            student[..., :vocab_size],
            teacher,
            labels,
            objective=objective,
            num_items_in_batch=num_items_in_batch,
            return_components=True,
        )
        sums = self._dense_sums(student[..., :vocab_size], teacher, members, labels, objective, num_items_in_batch)
        return {**dict(zip(names, values)), **sums}

    def log_keys(self) -> list[str]:
        """The per-teacher log keys of every batch: each member's divergence, and with routing its token share."""
        keys = [divergence_key(name) for name in self.names]
        return keys + ([share_key(name) for name in self.names] if self.route is not None else [])

    def _dense_sums(self, student, teacher, members, labels, objective, num_items_in_batch) -> dict:
        """The per-teacher logs on full logits (the module docstring)."""
        vocab = student.shape[-1]
        flat, keep = target_rows(labels, objective.ignore_index)

        def pick(x: torch.Tensor) -> torch.Tensor:  # [..., V] -> the target rows [n, V]
            return x.reshape(-1, vocab) if keep is None else x.reshape(-1, vocab)[keep]

        with torch.no_grad():
            student = pick(student.detach()).to(torch.promote_types(student.dtype, torch.float32))
            denominator = normalizer(student.shape[0], num_items_in_batch, device=student.device, dtype=student.dtype)
            if self.route is not None:
                rows = self.route.view(-1, *[1] * (teacher.dim() - 2)).expand(teacher.shape[:-1]).reshape(-1)
                rows = rows if keep is None else rows[keep]
                per_row = objective.divergence(student, pick(teacher).to(student.dtype), flat)
                return _routed_sums(per_row, rows, self.names, denominator)
            return {
                divergence_key(name): objective.divergence(student, pick(z).to(student.dtype), flat).sum() / denominator
                for name, z in zip(self.names, members)
            }

    def check_against(self, student_hidden: torch.Tensor, objective: Objective) -> tuple[str, int]:
        """What :func:`hf_kd.objective.fused.check_teacher` checks of each member; the vocabulary is the members'
        smallest."""
        from hf_kd.objective.fused import check_teacher

        rows = [check_teacher(signal, student_hidden, objective)[1] for signal in self.signals]
        return "teacher_weight", min(rows)

    @staticmethod
    def chunk_source(mixture: TeacherMixture, keep, plan):
        """The driver's source: each chunk's target (mixed ``T log m``, or each row's member's logits) in the buffer
        the divergence may overwrite, with the per-teacher sums (:attr:`ChunkTeacher.sums`)."""
        if mixture.route is not None:
            return _routed_source(mixture, keep, plan)
        members = [SOURCES[type(signal)](signal, keep, plan) for signal in mixture.signals]
        objective, temperature = plan.objective, plan.objective.temperature

        def chunk(rows: slice, scratch) -> ChunkTeacher:
            mixed, kept = None, []
            for index, (member, weight) in enumerate(zip(members, mixture.weights)):
                values = member(rows, scratch).values  # [chunk, V] in the "teacher" buffer, overwritten next member
                kept.append(scratch(f"member {index}", values.shape[0]).copy_(values))  # for its own log
                if weight <= 0:
                    continue
                part = torch.log_softmax(values / temperature if temperature != 1 else values, -1).add_(
                    math.log(weight)
                )
                mixed = part if mixed is None else torch.logaddexp(mixed, part, out=mixed)
            out = scratch("teacher", mixed.shape[0]).copy_(mixed)

            def sums(student: torch.Tensor, labels) -> dict[str, torch.Tensor]:
                names = mixture.names
                return {divergence_key(n): objective.divergence(student, z, labels).sum() for n, z in zip(names, kept)}

            return ChunkTeacher(out.mul_(temperature) if temperature != 1 else out, sums=sums)

        return chunk


def _routed_sums(per_row: torch.Tensor, rows: torch.Tensor, names, denominator) -> dict[str, torch.Tensor]:
    """Per member: its rows' divergence and their number, each divided by the loss's ``denominator``."""
    sums = {}
    for index, name in enumerate(names):
        mine = rows == index
        sums[divergence_key(name)] = per_row[mine].sum() / denominator
        sums[share_key(name)] = mine.sum().to(per_row.dtype) / denominator
    return sums


def _routed_source(mixture: TeacherMixture, keep, plan):
    """Each member's source over its own kept rows only; a chunk's rows of member ``m`` are the contiguous run
    ``[before_m[start], before_m[stop])`` of its rows (the kept order is kept), scattered back into the chunk."""
    route, first = mixture.route, mixture.signals[0]
    positions = (first.logits if isinstance(first, TeacherLogits) else first.hidden).shape[:-1]
    per_position = route.view(-1, *[1] * (len(positions) - 1)).expand(positions).reshape(-1)
    kept_mask = torch.ones_like(per_position, dtype=torch.bool) if keep is None else keep
    rows = per_position[kept_mask]  # [n] each kept row's member
    members, before = [], []
    for index, signal in enumerate(mixture.signals):
        mine = rows == index
        members.append(SOURCES[type(signal)](signal, kept_mask & (per_position == index), plan))
        before.append(torch.cat([mine.new_zeros(1, dtype=torch.long), mine.long().cumsum(0)]).tolist())
    count, objective = rows.shape[0], plan.objective

    def chunk(chunk_rows: slice, scratch) -> ChunkTeacher:
        start, stop = chunk_rows.start, min(chunk_rows.stop, count)
        here = rows[start:stop]
        out = scratch("routed", stop - start)
        for index, member in enumerate(members):
            a, b = before[index][start], before[index][stop]
            if b > a:  # the member's values land in the "teacher" buffer: copied out before the next member runs
                out[here == index] = member(slice(a, b), scratch).values

        def sums(student: torch.Tensor, labels) -> dict[str, torch.Tensor]:
            return _routed_sums(objective.divergence(student, out, labels), here, mixture.names, 1)

        return ChunkTeacher(out, sums=sums)

    return chunk
