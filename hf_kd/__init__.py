"""hf_kd: exact, memory-lean knowledge distillation on the Hugging Face stack."""

from .config import DistillationConfig
from .data import DistillationCollator
from .losses import LOSS_TYPES, distillation_loss
from .trainer import DistillationTrainer

__all__ = ["LOSS_TYPES", "DistillationCollator", "DistillationConfig", "DistillationTrainer", "distillation_loss"]
__version__ = "0.1.0"
