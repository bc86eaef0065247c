"""The kinds of teacher behind one interface (:mod:`hf_kd.teachers.registry`), one module each: ``model``,
``own_base`` (``self``), ``cache/``, ``cross_tokenizer/``, ``served/`` (a teacher in another process), ``mixture`` (several at once). Importing this package registers the built-in kinds."""

from hf_kd.teachers.cache.teacher import CachedTeacher
from hf_kd.teachers.cross_tokenizer.teacher import CrossTokenizerTeacher
from hf_kd.teachers.mixture import MixtureTeacher
from hf_kd.teachers.model import ModelTeacher, shared_vocab_size
from hf_kd.teachers.own_base import SelfTeacher
from hf_kd.teachers.registry import TEACHERS, Teacher, make_teacher, register_teacher, teacher_kind
from hf_kd.teachers.served.teacher import ServedTeacher
from hf_kd.teachers.served.vllm import VLLMTeacher

__all__ = [
    "TEACHERS",
    "CachedTeacher",
    "CrossTokenizerTeacher",
    "MixtureTeacher",
    "ModelTeacher",
    "SelfTeacher",
    "ServedTeacher",
    "VLLMTeacher",
    "Teacher",
    "make_teacher",
    "register_teacher",
    "shared_vocab_size",
    "teacher_kind",
]
