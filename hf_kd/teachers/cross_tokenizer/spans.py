"""The cross-tokenizer loss's span term: on a group of tokens that the two tokenizers split differently, the two
models' probabilities that the text goes on with the group's text (the chain rule over each side's tokens), compared
as two buckets ``{the text, anything else}``."""

from __future__ import annotations

import torch

from hf_kd.objective.chunking import LogitRows
from hf_kd.objective.losses import Objective
from hf_kd.objective.sparse import EMPTY_TAIL
from hf_kd.teachers.cross_tokenizer.alignment import Alignment
from hf_kd.teachers.cross_tokenizer.vocabulary import Extensions, SharedVocabulary


def span_log_probs(token_log_probs: torch.Tensor, groups: torch.Tensor, count: int) -> torch.Tensor:
    """``[M]`` log-probabilities of the tokens of span groups and ``[M]`` their group index -> ``[count]`` the log
    probability of each group's text, by the chain rule (the sum of its tokens' log-probabilities)."""
    return token_log_probs.new_zeros(count).index_add(0, groups, token_log_probs)


def two_buckets(log_prob: torch.Tensor) -> torch.Tensor:
    """``[G]`` log P(text) -> ``[G, 2]`` log-probabilities of ``{the text, anything else}`` (an empty bucket is
    :data:`EMPTY_TAIL`, as in the sparse loss)."""
    log_prob = log_prob.clamp_max(0.0)
    rest = torch.log(-torch.expm1(log_prob.clamp_max(-1e-30)))  # log(1 - P), stable for P near 0 and near 1
    return torch.stack([log_prob.clamp_min(EMPTY_TAIL), rest.clamp_min(EMPTY_TAIL)], dim=-1)


def span_term(
    student: LogitRows,
    teacher: LogitRows,
    alignment: Alignment,
    shared: SharedVocabulary,
    objective: Objective,
    chunk: int,
):
    """The span groups' term and, per flat student row, the weight of its factor's log-probability in its gradient.

    Each side's probability that the text goes on with the span's text: the chain rule over its tokens in the span,
    the last factor summed over every token whose text starts with the last token's (" s5 s3" goes on with " s5" as
    well as " s5" itself does; :func:`last_log_probs`). The term is a function of sums across chunks: it is evaluated
    here without a graph, and its derivative with respect to every factor becomes a fixed weight, so that the chunk
    pass adds the exact gradient while holding one chunk at a time."""
    weight = torch.zeros(student.rows.shape[0], device=student.rows.device, dtype=student.dtype)
    groups = alignment.span_starts.shape[1]
    if not groups:
        return student.rows.new_zeros((), dtype=torch.float32), weight
    s_rows, s_tokens, s_groups = alignment.span_student
    t_rows, t_tokens, t_groups = alignment.span_teacher
    with torch.no_grad():
        s_token_lp = factor_log_probs(
            student, s_rows, s_tokens, last_in_group(s_groups), shared.student_extensions, chunk
        )
        t_token_lp = factor_log_probs(
            teacher, t_rows, t_tokens, last_in_group(t_groups), shared.teacher_extensions, chunk
        )
    with torch.enable_grad():
        leaf = s_token_lp.detach().requires_grad_(True)
        s_span = span_log_probs(leaf, s_groups, groups)
        t_span = span_log_probs(t_token_lp, t_groups, groups)
        value = objective.divergence(two_buckets(s_span), two_buckets(t_span)).sum()
        (grad,) = torch.autograd.grad(value, leaf)
    weight[s_rows] = grad.to(weight.dtype)
    return value.detach(), weight


def last_in_group(groups: torch.Tensor) -> torch.Tensor:
    """``[M]`` group index of each token, in order -> ``[M]`` whether it is its group's last."""
    return torch.cat([groups[1:] != groups[:-1], groups.new_ones(min(groups.numel(), 1), dtype=torch.bool)])


def last_log_probs(log_probs: torch.Tensor, tokens: torch.Tensor, extensions: Extensions) -> torch.Tensor:
    """``[N, V]`` log-probabilities and ``[N]`` tokens -> ``[N]`` log of the probability of every token whose text
    starts with the token's (itself included): that the text goes on with the token's text."""
    order = extensions.order.to(log_probs.device)
    width = order.numel()
    ranked = log_probs[:, order]  # sorted by text: a token's extensions are one range
    position = torch.arange(width, device=log_probs.device)
    lo, hi = extensions.lo.to(log_probs.device)[tokens], extensions.hi.to(log_probs.device)[tokens]
    inside = (position >= lo.unsqueeze(-1)) & (position < hi.unsqueeze(-1))
    return torch.logsumexp(ranked.masked_fill(~inside, -torch.inf), dim=-1)


def factor_log_probs(
    side: LogitRows, rows: torch.Tensor, tokens: torch.Tensor, last: torch.Tensor, extensions: Extensions, chunk: int
) -> torch.Tensor:
    """``[M]`` each span token's factor at its row (T = 1): log p(token), or for the last of a span
    :func:`last_log_probs`; ``chunk`` rows at a time, without a graph."""
    parts = []
    for i in range(0, rows.numel(), chunk):
        log_p = torch.log_softmax(side.logits(rows[i : i + chunk]), -1)
        factor = log_p.gather(-1, tokens[i : i + chunk].unsqueeze(-1)).squeeze(-1)
        ends = last[i : i + chunk]
        if ends.any():
            factor = factor.masked_scatter(ends, last_log_probs(log_p[ends], tokens[i : i + chunk][ends], extensions))
        parts.append(factor)
    return torch.cat(parts) if parts else side.rows.new_zeros(0, dtype=torch.float32)
