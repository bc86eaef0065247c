"""hf_kd: exact, memory-lean knowledge distillation on the Hugging Face stack."""

from .config import DistillationConfig
from .cache import TeacherCache, build_teacher_cache
from .data import DistillationCollator
from .fused import fused_distillation_loss, fused_sparse_distillation_loss
from .losses import LOSS_TYPES, Objective, distillation_loss
from .sparse import sparse_distillation_loss
from .trainer import DistillationTrainer

__all__ = [
    "LOSS_TYPES",
    "Objective",
    "DistillationCollator",
    "DistillationConfig",
    "DistillationTrainer",
    "TeacherCache",
    "build_teacher_cache",
    "distillation_loss",
    "fused_distillation_loss",
    "fused_sparse_distillation_loss",
    "sparse_distillation_loss",
]
__version__ = "0.1.0"
