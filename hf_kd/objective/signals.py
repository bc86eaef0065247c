"""What each side hands the loss, aligned position by position with the labels (a causal-LM caller has already
dropped the last position: logits at position i predict the token at i + 1).

A teacher hands over one of these *signals*:

* :class:`TeacherLogits` -- full logits ``[..., V]`` (a plain forward, or a ``teacher_forward`` override);
* :class:`TeacherHidden` -- final hidden states ``[..., H]`` and the head that turns them into logits, so that the
  fused loss can build the logits chunk by chunk;
* :class:`TeacherTopK` -- cached top-k log-probabilities (:mod:`hf_kd.teachers.cache`, :mod:`hf_kd.objective.sparse`);
* or a signal of its own kind that computes its terms itself (a ``terms`` method, see :mod:`hf_kd.objective.terms`;
  the cross-tokenizer teacher's :class:`~hf_kd.teachers.cross_tokenizer.loss.TeacherAligned` is one).

The student hands over full logits ``[..., V]`` or a :class:`StudentHidden`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_kd.models.heads import LMHeadSpec


@dataclass(frozen=True)
class TeacherLogits:
    logits: torch.Tensor  # [..., V] full teacher logits, aligned with the labels


@dataclass(frozen=True)
class TeacherHidden:
    hidden: torch.Tensor  # [..., H] final (post-norm) hidden states, aligned with the labels
    head: LMHeadSpec  # how they become logits: softcap(scale * (hidden @ weight.T + bias))


@dataclass(frozen=True)
class TeacherTopK:
    topk_ids: torch.Tensor  # [..., k] the teacher's k most likely ids per position
    topk_logprobs: torch.Tensor  # [..., k] their log-probabilities at T = 1
    tail_logprob: torch.Tensor  # [...] log of the remaining mass (see hf_kd.objective.sparse)


@dataclass(frozen=True)
class StudentHidden:
    hidden: torch.Tensor  # [..., H] final hidden states (receive a gradient), aligned with the labels
    head: LMHeadSpec  # the student's head: its weight (and bias) receive a gradient


TeacherSignal = TeacherLogits | TeacherHidden | TeacherTopK  # or any signal with its own terms() (teachers/)
