"""Cross-tokenizer alignment: what a teacher with its own tokenizer says about each of the student's target tokens.

Both models read the same text. Per example, the student's token ids are decoded to text, the teacher's tokenizer
tokenizes that text, and each side's token boundaries (character offsets of where each token ends) are compared:

* a **common boundary** is a character position where both tokenizations end a token;
* a **group** is the stretch between two consecutive common boundaries: ``s`` student tokens and ``t`` teacher tokens
  that spell exactly the same characters;
* a **one-to-one group** (``s = t = 1``) pairs a student target with a teacher target; any other group (one side
  splits what the other keeps whole, or both split differently) is a **span group**. At the first target of any group
  both models have read the same text; a student target that starts inside a teacher token is recorded with the
  student tokens read since that token began (``Alignment.inner``). What the loss makes of each is in
  :mod:`hf_kd.teachers.cross_tokenizer.loss`; what each token spells, in :mod:`hf_kd.teachers.cross_tokenizer.vocabulary`.

Special tokens are never text: one whose content the teacher also has as a special token maps to it, else the
student's EOS (BOS, PAD, UNK) becomes the teacher's token of the same role, and any other one (a chat-template marker
the teacher does not know) is left out of the teacher's input and aligns with nothing
(``SharedVocabulary.special_map``). Prompt masking carries over: a group is used only if every student token in it is
a target (``labels != -100``), so a teacher position counts only if its characters are in the student's targets. Tokens whose character span cannot be placed (a byte-level token that ends
inside a multi-byte character) have no boundary of their own and join the next token's group.
"""

from __future__ import annotations

import codecs
from bisect import bisect_left
from dataclasses import dataclass

import torch

from hf_kd.objective.losses import IGNORE_INDEX
from hf_kd.teachers.cross_tokenizer.vocabulary import DEPTH, SharedVocabulary, shared_vocabulary

# ---- boundaries and groups -------------------------------------------------------------------------------------------


def _ends_from_offsets(offsets: list[tuple[int, int]]) -> list[int | None]:
    """Where each token ends in the text; ``None`` for a token that ends inside a character: a byte-level piece of a
    multi-byte character, whose offsets run to the end of that character, and the next token starts inside it."""
    return [None if i + 1 < len(offsets) and offsets[i + 1][0] < end else end for i, (_, end) in enumerate(offsets)]


def _whole_characters(offsets: list[tuple[int, int]]) -> list[int]:
    """Where the whole characters each token has completed end: its end, or for a token that ends inside a character
    the start of that character (Python strings count characters, so one position before the offsets' end)."""
    ends = _ends_from_offsets(offsets)
    return [end if end is not None else offsets[i][1] - 1 for i, end in enumerate(ends)]


def student_text(tokenizer, ids: list[int], strings: dict[int, object] | None = None) -> tuple[str, list[int | None]]:
    """The text a run of (non-special) student tokens spells, and where each token ends in it.

    Canonical tokenizations (what the tokenizer itself makes from the text) take the tokenizer's offsets; any other id
    sequence (a sampled completion) counts each token's bytes when ``strings`` (:func:`token_strings`) holds them
    (byte-level BPE), else decodes prefix by prefix, a token ending where its prefix's text ends."""
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) == list(ids):
        return text, _ends_from_offsets(encoded["offset_mapping"])
    pieces = [strings.get(token) for token in ids] if strings is not None else None
    if pieces is not None and all(isinstance(piece, bytes) for piece in pieces):
        ends = _ends_from_bytes(text, pieces)
        if ends is not None:
            return text, ends
    ends = []
    for count in range(1, len(ids) + 1):
        prefix = tokenizer.decode(ids[:count], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        ends.append(len(prefix) if text.startswith(prefix) else None)  # a partial character decodes to U+FFFD
    return text, ends


def _ends_from_bytes(text: str, pieces: list[bytes]) -> list[int | None] | None:
    """Where each token ends in ``text`` (characters), from the bytes each spells, decoded incrementally as
    ``decode`` does (an incomplete character becomes U+FFFD at the end); ``None`` inside a character. A decoder that
    strips the text's leading space (SentencePiece) shifts every end by one. ``None`` if the bytes do not spell
    ``text`` (then the caller decodes prefix by prefix)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    ends, written = [], 0
    for piece in pieces:
        held = decoder.getstate()[0]  # bytes of a character not complete yet
        out = decoder.decode(piece)
        if held and out.startswith("\ufffd") and ends and (piece[:1] and piece[0] & 0xC0 != 0x80):
            ends[-1] = written + 1  # the held bytes were no character: their U+FFFD ends with the last of them
        written += len(out)
        ends.append(None if decoder.getstate()[0] else written)
    tail = decoder.decode(b"", final=True)
    if tail:  # an incomplete character at the very end: U+FFFD, ending with the last token
        written += len(tail)
        ends[-1] = written
    spelled = written
    if spelled == len(text):
        return ends
    if spelled == len(text) + 1:  # the leading space SentencePiece's decoder strips
        return [None if end is None else max(end - 1, 0) for end in ends]
    return None


def teacher_tokens(tokenizer, text: str) -> tuple[list[int], list[int | None], list[int]]:
    """The teacher's tokens of ``text``, where each ends in it (``None``: inside a character), and where the whole
    characters each has completed end (:func:`_whole_characters`)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    return list(encoded["input_ids"]), _ends_from_offsets(offsets), _whole_characters(offsets)


def group_tokens(student_ends: list[int | None], teacher_ends: list[int | None]) -> list[tuple[list[int], list[int]]]:
    """Split two tokenizations of one text into groups between common boundaries: ``[(student tokens, teacher
    tokens)]`` by index, in order. Tokens after the last common boundary form no group (they spell different text)."""
    common = sorted({end for end in student_ends if end is not None} & {end for end in teacher_ends if end is not None})
    groups: list[tuple[list[int], list[int]]] = [([], []) for _ in common]
    for side, ends in enumerate((student_ends, teacher_ends)):
        pending: list[int] = []  # tokens without a boundary of their own join the next one's group
        for index, end in enumerate(ends):
            pending.append(index)
            if end is None:
                continue
            slot = bisect_left(common, end)
            if slot < len(common):
                groups[slot][side].extend(pending)
            pending = []
    return [(s, t) for s, t in groups if s and t]


def _inside_teacher_tokens(
    student: list[int], teacher: list[int], student_ends: list[int | None], teacher_ends: list[int | None]
) -> list[tuple[int, int, list[int]]]:
    """In one group: ``(k, j, prefix)`` for each student token ``k`` that starts inside teacher token ``j``, where
    ``prefix`` are the student tokens from ``j``'s start to ``k`` (at most :data:`DEPTH`; ``j`` must start where a
    student token does, and ``k`` end within ``j``). The teacher's distribution at ``j`` says what ``k`` is: the mass of its tokens that spell
    ``prefix`` and then ``k`` (:func:`hf_kd.teachers.cross_tokenizer.loss.inner_log_probs`)."""
    s_start = {k: (student_ends[k - 1] if k > 0 else 0) for k in student}
    t_span = [(j, teacher_ends[j - 1] if j > 0 else 0, teacher_ends[j]) for j in teacher]
    found = []
    for k in student[1:]:
        begin = s_start[k]
        holder = (
            next((j for j, lo, hi in t_span if lo is not None and hi is not None and lo < begin < hi), None)
            if begin is not None
            else None
        )
        if holder is None:
            continue
        token_start, token_end = next((lo, hi) for j, lo, hi in t_span if j == holder)
        if student_ends[k] is None or student_ends[k] > token_end:
            continue  # k runs past the teacher token: no teacher token spells it whole (the span term covers it)
        prefix = [m for m in student if m < k and s_start[m] is not None and s_start[m] >= token_start]
        if (
            prefix
            and s_start[prefix[0]] == token_start
            and prefix == list(range(prefix[0], k))
            and len(prefix) <= DEPTH
        ):
            found.append((k, holder, prefix))
    return found


# ---- a batch ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alignment:
    """One student batch aligned with the teacher's tokenization of it. Rows are flat indices into the *aligned*
    positions of each side (``[B, S - 1]`` flattened: the position before a token is the one that predicts it)."""

    teacher_inputs: dict[str, torch.Tensor]  # input_ids / attention_mask [B, S_t], right-padded
    pairs: torch.Tensor  # [2, P] one-to-one targets: student row, teacher row
    span_student: torch.Tensor  # [3, M] span groups' student targets: row, token id, group
    span_teacher: torch.Tensor  # [3, M_t] span groups' teacher targets: row, token id, group
    span_starts: torch.Tensor  # [2, G] the student and teacher rows where each span group starts
    span_start_fits: torch.Tensor  # [G] whether the student's first token ends within the teacher's first
    inner: torch.Tensor  # [2 + DEPTH, I] span targets inside a teacher token: student row, the teacher row that
    #                      predicts that token, then the student ids from the token's start to the target (-1 pads)
    targets: int  # student target positions in the batch (labels != -100)


def align_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    student_tokenizer,
    teacher_tokenizer,
    shared: SharedVocabulary,
) -> Alignment:
    """Align a student batch: ``input_ids`` / ``attention_mask`` ``[B, S]`` (any padding side) and ``labels``
    ``[B, S - 1]`` already aligned with the logits (``labels[b, i]`` is the target predicted at position ``i``)."""
    batch, width = input_ids.shape
    device = input_ids.device
    input_ids, labels = input_ids.cpu(), labels.cpu()  # read token by token below: one copy, not a sync per token
    mask = attention_mask.cpu() if attention_mask is not None else torch.ones_like(input_ids)
    bos = _teacher_bos(teacher_tokenizer)
    sequences, pairs, span_student, span_teacher, starts, inner, fits = [], [], [], [], [], [], []
    for row in range(batch):
        positions = mask[row].nonzero().flatten().tolist()  # the real tokens' positions in the padded row
        ids = input_ids[row, positions].tolist()
        row_labels = labels[row].tolist()
        is_target = [p > 0 and row_labels[p - 1] != IGNORE_INDEX for p in positions]
        teacher_ids, groups, ends, t_whole = _align_example(ids, student_tokenizer, teacher_tokenizer, shared, bos)
        sequences.append(teacher_ids)
        for student_tokens, teacher_tokens_, inside in groups:
            if not all(is_target[k] for k in student_tokens) or min(teacher_tokens_) == 0:
                continue  # a prompt character in the group, or a teacher token with nothing before it to predict it
            for k, j, prefix in inside:  # read part of teacher token j: its rest, given what the student read
                ids_before = [ids[m] for m in prefix] + [-1] * (DEPTH - len(prefix))
                inner.append((row * (width - 1) + positions[k] - 1, (row, j - 1), ids_before))
            student_rows = [row * (width - 1) + positions[k] - 1 for k in student_tokens]
            teacher_rows = [(row, j - 1) for j in teacher_tokens_]  # made flat once the teacher width is known
            if len(student_tokens) == 1 and len(teacher_tokens_) == 1:
                pairs.append((student_rows[0], teacher_rows[0]))
                continue
            group = len(starts)
            starts.append((student_rows[0], teacher_rows[0]))
            # the projection credits teacher tokens to student tokens their text starts with: it can speak for the
            # student's first token only if that token ends within the teacher's first (else the span term does); a
            # teacher token that ends inside a character holds the characters before that one whole
            first_end = ends[student_tokens[0]]
            fits.append(first_end is not None and first_end <= t_whole[teacher_tokens_[0]])
            span_student.extend((r, ids[k], group) for r, k in zip(student_rows, student_tokens))
            span_teacher.extend((r, teacher_ids[j], group) for r, j in zip(teacher_rows, teacher_tokens_))
    teacher_width = max(max((len(s) for s in sequences), default=1), 2)
    flat = lambda pos: pos[0] * (teacher_width - 1) + pos[1]  # (row, position) -> aligned flat row
    pad = teacher_tokenizer.pad_token_id if teacher_tokenizer.pad_token_id is not None else 0
    teacher_input_ids = torch.full((batch, teacher_width), pad, dtype=torch.long)
    teacher_mask = torch.zeros((batch, teacher_width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        teacher_input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        teacher_mask[row, : len(sequence)] = 1
    as_tensor = lambda rows, n: torch.tensor(rows, dtype=torch.long).reshape(-1, n).T.contiguous().to(device)
    return Alignment(
        teacher_inputs={"input_ids": teacher_input_ids.to(device), "attention_mask": teacher_mask.to(device)},
        pairs=as_tensor([(s, flat(t)) for s, t in pairs], 2),
        span_student=as_tensor(span_student, 3),
        span_teacher=as_tensor([(flat(t), token, g) for t, token, g in span_teacher], 3),
        span_starts=as_tensor([(s, flat(t)) for s, t in starts], 2),
        span_start_fits=torch.tensor(fits, dtype=torch.bool, device=device),
        inner=as_tensor([(s, flat(t), *before) for s, t, before in inner], 2 + DEPTH),
        targets=int((labels != IGNORE_INDEX).sum()),
    )


def _teacher_bos(tokenizer) -> int | None:
    """The BOS the teacher's tokenizer puts before a text of its own, if it does (Llama-3 does, Qwen2 does not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    encoded = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if encoded and encoded[0] == bos else None


def _align_example(
    ids: list[int], student_tokenizer, teacher_tokenizer, shared: SharedVocabulary, bos: int | None
) -> tuple[list[int], list[tuple[list[int], list[int], list]], list, list]:
    """One example's teacher ids, its groups (student token indices, teacher token indices, and the student tokens
    that start inside a teacher token: :func:`_inside_teacher_tokens`), where each student token ends in the example's
    text (``None``: a special token, or inside a character), and where the whole characters each teacher token has
    completed end (``None``: a special token)."""
    teacher_ids: list[int] = [] if bos is None or shared.special_map.get(ids[0] if ids else -1) == bos else [bos]
    groups: list[tuple[list[int], list[int], list]] = []
    ends: list[int | None] = [None] * len(ids)
    t_whole: list[int | None] = [None] * len(teacher_ids)
    chars = 0  # the text before this segment (segments' offsets are their own)
    start = 0
    while start < len(ids):
        if ids[start] in shared.special_map:  # a special token: its own group, if the teacher has a counterpart
            partner = shared.special_map[ids[start]]
            if partner is not None:
                groups.append(([start], [len(teacher_ids)], []))
                teacher_ids.append(partner)
                t_whole.append(None)
            start += 1
            continue
        stop = start
        while stop < len(ids) and ids[stop] not in shared.special_map:
            stop += 1
        text, student_ends = student_text(student_tokenizer, ids[start:stop], shared.student_strings)
        segment, teacher_ends, teacher_whole = teacher_tokens(teacher_tokenizer, text)
        for s, t in group_tokens(student_ends, teacher_ends):
            inside = [
                (start + k, len(teacher_ids) + j, [start + m for m in prefix])
                for k, j, prefix in _inside_teacher_tokens(s, t, student_ends, teacher_ends)
            ]
            groups.append(([start + k for k in s], [len(teacher_ids) + j for j in t], inside))
        ends[start:stop] = [None if end is None else chars + end for end in student_ends]
        t_whole.extend(chars + end for end in teacher_whole)
        teacher_ids.extend(segment)
        chars += len(text) + 1
        start = stop
    return teacher_ids, groups, ends, t_whole


def alignment_summary(student_tokenizer, teacher_tokenizer, examples: list[dict]) -> dict[str, float]:
    """What `hf-kd check` reports for a pair with different tokenizers, on tokenized examples (``input_ids`` and
    unshifted ``labels``): the vocabulary overlap, the share of target positions aligned one to one and in span groups,
    and the share of the teacher's target tokens that are shared tokens (the probability mass a teacher that fits the
    data puts on them; training logs the teacher's own as ``shared_mass``)."""
    shared = shared_vocabulary(student_tokenizer, teacher_tokenizer)
    shared_teacher_ids = set(shared.teacher_ids.tolist())
    targets = one_to_one = in_spans = teacher_targets = teacher_shared = 0
    for example in examples:
        ids, labels = example["input_ids"], example["labels"]
        if len(ids) < 2:
            continue
        alignment = align_batch(
            torch.tensor([ids]), None, torch.tensor([labels[1:]]), student_tokenizer, teacher_tokenizer, shared
        )
        teacher_ids = alignment.teacher_inputs["input_ids"].flatten()
        # a teacher row predicts the token after it
        predicted = [*(teacher_ids[alignment.pairs[1] + 1].tolist()), *alignment.span_teacher[1].tolist()]
        targets += alignment.targets
        one_to_one += alignment.pairs.shape[1]
        in_spans += alignment.span_student.shape[1]
        teacher_targets += len(predicted)
        teacher_shared += sum(token in shared_teacher_ids for token in predicted)
    return {
        "overlap": shared.overlap,
        "shared_tokens": float(len(shared.student_ids)),
        "student_tokens": float(shared.student_size),
        "teacher_tokens": float(shared.teacher_size),
        "targets": float(targets),
        "one_to_one": one_to_one / max(targets, 1),
        "in_spans": in_spans / max(targets, 1),
        "teacher_shared": teacher_shared / max(teacher_targets, 1),
    }
