"""hf_kd: exact, memory-lean knowledge distillation on the Hugging Face stack.

The public names are imported on first use (``from hf_kd import DistillationTrainer`` works as usual), so that
``import hf_kd.cli`` answers ``hf-kd --help`` and a recipe's typo without importing torch or transformers.

The package is folders by concern (``docs/architecture.md``): ``objective/`` (divergences, the objective, the loss
paths and the chunk driver), ``teachers/`` (one module per kind of teacher), ``training/`` (the trainer and what it
holds), ``models/``, ``recipe/`` and ``cli/``. Modules that lived at the top level before keep working under their
old names (``hf_kd.losses`` is ``hf_kd.objective.losses``): :data:`MOVED`.
"""

import importlib
import importlib.abc
import importlib.util
import sys

_PUBLIC = {  # name -> the module that defines it
    "DistillationConfig": "hf_kd.config",
    "TeacherCache": "hf_kd.teachers.cache.store",
    "build_teacher_cache": "hf_kd.teachers.cache.build",
    "DistillationCollator": "hf_kd.data",
    "fused_distillation_loss": "hf_kd.objective.fused",
    "fused_sparse_distillation_loss": "hf_kd.objective.fused",
    "DIVERGENCES": "hf_kd.objective.divergences",
    "Divergence": "hf_kd.objective.divergences",
    "register_divergence": "hf_kd.objective.divergences",
    "LOSS_TYPES": "hf_kd.objective.losses",
    "Objective": "hf_kd.objective.losses",
    "distillation_loss": "hf_kd.objective.losses",
    "sparse_distillation_loss": "hf_kd.objective.sparse",
    "TEACHERS": "hf_kd.teachers",
    "Teacher": "hf_kd.teachers",
    "register_teacher": "hf_kd.teachers",
    "DistillationTrainer": "hf_kd.training.trainer",
}

__all__ = [  # the keys of _PUBLIC (a test keeps them equal)
    "DIVERGENCES",
    "LOSS_TYPES",
    "TEACHERS",
    "DistillationCollator",
    "DistillationConfig",
    "DistillationTrainer",
    "Divergence",
    "Objective",
    "Teacher",
    "TeacherCache",
    "build_teacher_cache",
    "distillation_loss",
    "fused_distillation_loss",
    "fused_sparse_distillation_loss",
    "register_divergence",
    "register_teacher",
    "sparse_distillation_loss",
]
__version__ = "0.1.0"

MOVED = {  # an old top-level module -> where it lives now (the same module object under both names)
    "hf_kd.losses": "hf_kd.objective.losses",
    "hf_kd.sparse": "hf_kd.objective.sparse",
    "hf_kd.chunking": "hf_kd.objective.chunking",
    "hf_kd.fused": "hf_kd.objective.fused",
    "hf_kd.targets": "hf_kd.objective.terms",
    "hf_kd.metrics": "hf_kd.objective.metrics",
    "hf_kd.adapters": "hf_kd.models.adapters",
    "hf_kd.distributed": "hf_kd.models.sharding",
    "hf_kd.cache": "hf_kd.teachers.cache.build",
    "hf_kd.cache_store": "hf_kd.teachers.cache.store",
    "hf_kd.alignment": "hf_kd.teachers.cross_tokenizer.alignment",
    "hf_kd.vocabulary": "hf_kd.teachers.cross_tokenizer.vocabulary",
    "hf_kd.cross_tokenizer": "hf_kd.teachers.cross_tokenizer.loss",
    "hf_kd.trainer": "hf_kd.training.trainer",
    "hf_kd.generation": "hf_kd.training.generation",
    "hf_kd.accounting": "hf_kd.training.accounting",
    "hf_kd.faults": "hf_kd.training.faults",
    "hf_kd.preflight": "hf_kd.training.preflight",
    "hf_kd.card": "hf_kd.training.card",
    "hf_kd.recipe_training": "hf_kd.recipe.training",
    "hf_kd.check": "hf_kd.cli.check",
    "hf_kd.check_memory": "hf_kd.cli.check_memory",
    "hf_kd.demo": "hf_kd.cli.demo",
    "hf_kd.synthetic": "hf_kd.cli.synthetic",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import hf_kd.<old name>`` imports the module's new home and binds it under the old name as well."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass  # the new home ran already


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # imported once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
