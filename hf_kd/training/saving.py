"""Saving the student: a final save writes the model card; a PEFT student with ``save_merged`` is saved merged."""

from __future__ import annotations

import os

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from hf_kd.models.adapters import is_peft_model, merged_copy
from hf_kd.training.card import card_from_trainer


def save_student(trainer, output_dir: str, state_dict, final: bool) -> None:
    """``Trainer._save`` for a distilled student. ``final``: not a ``checkpoint-N`` (those keep the adapters, training
    resumes from them, and get no card)."""
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not (final and args.save_merged and is_peft_model(model)):
        Trainer._save(trainer, output_dir, state_dict)
    elif args.should_save:
        os.makedirs(output_dir, exist_ok=True)
        merged_copy(model).save_pretrained(output_dir)  # a copy: the trained model keeps its unmerged adapters
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(output_dir)
        torch.save(args, os.path.join(output_dir, TRAINING_ARGS_NAME))
    if final and args.should_save:
        card_from_trainer(trainer).save(os.path.join(output_dir, "README.md"))
