"""hf_kd: exact, memory-lean knowledge distillation on the Hugging Face stack.

The public names are imported on first use (``from hf_kd import DistillationTrainer`` works as usual), so that
``import hf_kd.cli`` answers ``hf-kd --help`` and a recipe's typo without importing torch or transformers.
"""

import importlib

_PUBLIC = {  # name -> the module that defines it
    "DistillationConfig": ".config",
    "TeacherCache": ".cache",
    "build_teacher_cache": ".cache",
    "DistillationCollator": ".data",
    "fused_distillation_loss": ".fused",
    "fused_sparse_distillation_loss": ".fused",
    "LOSS_TYPES": ".losses",
    "Objective": ".losses",
    "distillation_loss": ".losses",
    "sparse_distillation_loss": ".sparse",
    "DistillationTrainer": ".trainer",
}

__all__ = [  # the keys of _PUBLIC (a test keeps them equal)
    "LOSS_TYPES",
    "DistillationCollator",
    "DistillationConfig",
    "DistillationTrainer",
    "Objective",
    "TeacherCache",
    "build_teacher_cache",
    "distillation_loss",
    "fused_distillation_loss",
    "fused_sparse_distillation_loss",
    "sparse_distillation_loss",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value  # imported once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
