"""What tokens spell, across two tokenizers: the vocabulary side of cross-tokenizer distillation.

* :func:`token_strings`: each token id -> the bytes (or piece) it spells, or its special role, comparable across
  tokenizers (byte-level BPE and SentencePiece pieces decoded);
* :class:`SharedVocabulary` (:func:`shared_vocabulary`): the tokens both spell alike, the special tokens' counterparts,
  each teacher token spelled as student tokens (``segmentation``: its first column is the *projection* of the teacher's
  distribution onto the student's tokens), and for each side the tokens whose text starts with a token's text
  (:class:`Extensions`);
* :func:`same_ids`: whether a teacher can read the student's ids at all (then none of this is needed).
"""

from __future__ import annotations

import dataclasses
import json
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

import torch

ROLES = ("eos_token", "bos_token", "pad_token", "unk_token")  # special tokens mapped by role, not by content
DEPTH = 4  # student tokens a teacher token may hold before the one predicted inside it (deeper: no signal)


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins -> the bytes they stand for (GPT-2's scheme: printable bytes stand for
    themselves, the other 68 take the code points from 256 on, in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    decoder, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            decoder[chr(byte)] = byte
        else:
            decoder[chr(256 + extra)] = byte
            extra += 1
    return decoder


def _decoder_kinds(tokenizer) -> set[str]:
    """The decoder types of a fast tokenizer's pipeline (``ByteLevel``, ``Metaspace``, ``ByteFallback``, ...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    kinds = {part.get("type") for part in parts}
    if any(
        part.get("type") == "Replace" and "▁" in json.dumps(part.get("pattern", ""), ensure_ascii=False)
        for part in parts
    ):
        kinds.add("Metaspace")  # Llama-2 style: a Replace("▁", " ") step
    return kinds


def token_strings(tokenizer) -> dict[int, object]:
    """Every token id -> what it spells, comparable across tokenizers: the bytes of a text token (byte-level BPE and
    SentencePiece pieces decoded; other schemes keep the piece itself), ``("special", role or content)`` for a special
    token."""
    kinds = _decoder_kinds(tokenizer)
    byte_level = "ByteLevel" in kinds
    table = _byte_decoder() if byte_level else {}
    specials = {}
    for role in ROLES:
        token_id = getattr(tokenizer, f"{role}_id", None)
        if token_id is not None:
            specials.setdefault(token_id, ("special", role))
    for token_id in tokenizer.all_special_ids:
        specials.setdefault(token_id, ("special", tokenizer.convert_ids_to_tokens(token_id)))
    added_text = {}  # added tokens that are text: their content is the text itself, not a model piece
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            specials.setdefault(token_id, ("special", added.content))
        else:
            added_text[token_id] = added.content
    bytes_kind = byte_level or "Metaspace" in kinds  # text tokens are bytes: added ones must be too
    strings: dict[int, object] = {}
    for piece, token_id in tokenizer.get_vocab().items():
        if token_id in specials:
            strings[token_id] = specials[token_id]
        elif token_id in added_text:
            strings[token_id] = added_text[token_id].encode() if bytes_kind else added_text[token_id]
        elif byte_level and all(char in table for char in piece):
            strings[token_id] = bytes(table[char] for char in piece)
        elif "Metaspace" in kinds:
            if "ByteFallback" in kinds and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                strings[token_id] = bytes([int(piece[3:5], 16)])
            else:
                strings[token_id] = piece.replace("▁", " ").encode()
        else:
            strings[token_id] = piece
    return strings


@dataclass(frozen=True)
class SharedVocabulary:
    """Tokens that spell the same string in both vocabularies, as two aligned id lists (``student_ids[i]`` and
    ``teacher_ids[i]`` are the same token), and the special tokens the student's map to (None: no counterpart)."""

    student_ids: torch.Tensor  # [K] int64
    teacher_ids: torch.Tensor  # [K] int64
    special_map: dict[int, int | None]  # student special id -> teacher id
    student_strings: dict[int, object]  # what each student token spells (token_strings), for sampled sequences
    student_size: int  # tokens in the student's tokenizer
    teacher_size: int
    segmentation: torch.Tensor  # [teacher ids, DEPTH + 1] each teacher token's text as student tokens (-1 pads)
    student_extensions: Extensions  # per student token, the tokens whose text starts with its text
    teacher_extensions: Extensions

    def to(self, device) -> SharedVocabulary:
        """A copy whose tensors live on ``device`` (the loss reads them every chunk)."""
        move = lambda ext: Extensions(ext.order.to(device), ext.lo.to(device), ext.hi.to(device))  # noqa: E731
        return dataclasses.replace(
            self,
            student_ids=self.student_ids.to(device),
            teacher_ids=self.teacher_ids.to(device),
            segmentation=self.segmentation.to(device),
            student_extensions=move(self.student_extensions),
            teacher_extensions=move(self.teacher_extensions),
        )

    @property
    def projection(self) -> torch.Tensor:
        """``[teacher ids]`` the student token each teacher token's text starts with (-1: none)."""
        return self.segmentation[:, 0]

    @property
    def overlap(self) -> float:
        """The fraction of the student's tokenizer that the teacher's shares."""
        return len(self.student_ids) / max(self.student_size, 1)


def shared_vocabulary(student_tokenizer, teacher_tokenizer) -> SharedVocabulary:
    """The shared tokens of two tokenizers (one teacher id per student id and back: the first of duplicates wins)."""
    student, teacher = token_strings(student_tokenizer), token_strings(teacher_tokenizer)
    by_string: dict[object, int] = {}
    for token_id in _preferred_order(teacher_tokenizer):
        by_string.setdefault(teacher[token_id], token_id)
    pairs, taken = [], set()
    for token_id in _preferred_order(student_tokenizer):
        partner = by_string.get(student[token_id])
        if partner is not None and partner not in taken:
            pairs.append((token_id, partner))
            taken.add(partner)
    special_map = _special_map(student_tokenizer, teacher_tokenizer, student, by_string)
    ids = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return SharedVocabulary(
        ids[:, 0].contiguous(),
        ids[:, 1].contiguous(),
        special_map,
        student,
        len(student),
        len(teacher),
        _segmentation(student, teacher, student_tokenizer, special_map),
        extensions(student),
        extensions(teacher),
    )


def _special_map(
    student_tokenizer, teacher_tokenizer, student: dict[int, object], by_string: dict
) -> dict[int, int | None]:
    """Each student special token -> the teacher's special token of the same content (SmolLM2's ``<|im_start|>`` is
    Qwen3's, though SmolLM2 calls it BOS and Qwen3 has no BOS), else of the same role (Qwen's EOS ``<|im_end|>`` is
    Llama 3's ``<|eot_id|>``), else None (the teacher has no counterpart). ``by_string``: the teacher's
    :func:`token_strings` inverted, where a role token is keyed by its role only."""
    teacher_specials = set(teacher_tokenizer.all_special_ids) | {
        token_id for token_id, added in getattr(teacher_tokenizer, "added_tokens_decoder", {}).items() if added.special
    }
    teacher_specials |= {getattr(teacher_tokenizer, f"{role}_id", None) for role in ROLES} - {None}
    by_content: dict[str, int] = {}
    for token_id in sorted(teacher_specials):
        by_content.setdefault(teacher_tokenizer.convert_ids_to_tokens(token_id), token_id)
    return {
        token_id: by_content.get(student_tokenizer.convert_ids_to_tokens(token_id), by_string.get(string))
        for token_id, string in student.items()
        if isinstance(string, tuple)
    }


@dataclass(frozen=True)
class Extensions:
    """The tokens whose text starts with a token's text (itself included), as a range of one sorted order: token
    ``u``'s extensions are ``order[lo[u]:hi[u]]`` (sorting by text puts every extension of a text right after it)."""

    order: torch.Tensor  # [V] token ids sorted by their text
    lo: torch.Tensor  # [V] where each token's extensions start in ``order``
    hi: torch.Tensor  # [V] where they end


def extensions(strings: dict[int, object]) -> Extensions:
    """:class:`Extensions` of a vocabulary (:func:`token_strings`); a special token extends nothing and has no
    extension but itself."""
    as_bytes = lambda key: key if isinstance(key, bytes) else key.encode()  # noqa: E731 -- one order for every text
    texts = sorted((as_bytes(key), token_id) for token_id, key in strings.items() if not isinstance(key, tuple))
    specials = sorted(token_id for token_id, key in strings.items() if isinstance(key, tuple))
    size = max(strings, default=-1) + 1
    order = [token_id for _, token_id in texts] + specials
    lo = torch.arange(size)
    hi = lo + 1
    keys = [key for key, _ in texts]
    longest = max((len(k) for k in keys), default=0)
    for position, (key, token_id) in enumerate(texts):
        top = key + b"\xff" * (longest + 1)  # above every extension of key
        lo[token_id], hi[token_id] = bisect_left(keys, key), bisect_right(keys, top, lo=position)  # duplicates too
    for position, token_id in enumerate(specials, start=len(texts)):
        lo[token_id], hi[token_id] = position, position + 1
    return Extensions(torch.tensor(order, dtype=torch.long), lo, hi)


def _segmentation(
    student: dict[int, object], teacher: dict[int, object], student_tokenizer, special_map: dict[int, int | None]
) -> torch.Tensor:
    """``[teacher ids, DEPTH + 1]``: each teacher token's text spelled with student tokens, longest first (a special
    token: the student's that ``special_map`` maps to it, else the student's of the same role or content), -1 past
    its end or where nothing matches. Column 0 is the
    student token the text starts with: a teacher token that spells several (" the cat") credits its probability to
    the first (" the"), the event the student's next token is about -- "the text goes on with this token"; the next
    columns say what it spells after that, for targets inside a teacher token."""
    by_string: dict[object, int] = {}
    for token_id in _preferred_order(student_tokenizer):
        by_string.setdefault(student[token_id], token_id)
    counterpart: dict[int, int] = {}  # teacher special id -> the first student special id mapped to it
    for student_id in sorted(special_map):
        if special_map[student_id] is not None:
            counterpart.setdefault(special_map[student_id], student_id)
    longest = max((len(k) for k in by_string if not isinstance(k, tuple)), default=0)
    table = torch.full((max(teacher, default=-1) + 1, DEPTH + 1), -1, dtype=torch.long)
    for token_id, string in teacher.items():
        if isinstance(string, tuple):  # a special token: only its counterpart
            table[token_id, 0] = counterpart.get(token_id, by_string.get(string, -1))
            continue
        rest = string
        for column in range(DEPTH + 1):
            match = next(
                (by_string[rest[:cut]] for cut in range(min(len(rest), longest), 0, -1) if rest[:cut] in by_string),
                None,
            )
            if match is None:
                break
            table[token_id, column] = match
            rest = rest[len(student[match]) :]
            if not rest:
                break
    return table


def _preferred_order(tokenizer) -> list[int]:
    """Token ids, byte-fallback pieces (``<0x61>``) after the text pieces that spell the same ("a"): the model writes
    text with the latter, so they are the ones paired."""
    fallback = lambda piece: len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")  # noqa: E731
    return [token_id for piece, token_id in sorted(tokenizer.get_vocab().items(), key=lambda p: (fallback(p[0]), p[1]))]


def same_ids(student_tokenizer, teacher_tokenizer) -> bool:
    """Whether the teacher can read the student's ids: both have the same text tokens at the same ids (special and
    added tokens may differ: Qwen2 -> Qwen2.5 added some, Llama 3 -> 3.1 renamed reserved ones). A teacher with more
    text tokens (more merges) tokenizes text otherwise, so it is not the same tokenizer."""

    def text_tokens(tokenizer) -> dict[str, int]:
        added = set(getattr(tokenizer, "added_tokens_decoder", {})) | set(tokenizer.all_special_ids)
        return {token: token_id for token, token_id in tokenizer.get_vocab().items() if token_id not in added}

    return text_tokens(student_tokenizer) == text_tokens(teacher_tokenizer)
