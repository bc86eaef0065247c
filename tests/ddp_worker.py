"""Worker for test_distributed.py: train a tiny pair for a few steps, then rank 0 saves weights and logs.

Run as `torchrun --standalone --nproc_per_node N tests/ddp_worker.py TEACHER STUDENT OUT PER_DEVICE_BATCH GA`.
"""

import json
import sys

import torch
from datasets import Dataset

from conftest import load_model, variable_length_examples
from hf_kd import DistillationConfig, DistillationTrainer


def main(teacher, student, out, batch, ga):
    args = DistillationConfig(
        output_dir=out, per_device_train_batch_size=int(batch), gradient_accumulation_steps=int(ga), max_steps=3,
        learning_rate=0.3, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
        train_sampling_strategy="sequential",  # the same examples in the same step, whatever the world size
        loss_type={"forward_kl": 0.5, "reverse_kl": 0.5}, temperature=2.0, alpha=0.6,
        report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, seed=0, disable_tqdm=True,
    )
    model = load_model(student)
    trainer = DistillationTrainer(model=model, teacher_model=load_model(teacher), args=args,
                                  train_dataset=Dataset.from_list(variable_length_examples(12, seed=7, max_len=16)))
    # the teacher is a plain frozen replica: no DDP wrapper, no gradient buckets
    assert not isinstance(trainer.teacher, torch.nn.parallel.DistributedDataParallel)
    trainer.train()
    if trainer.accelerator.is_main_process:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, f"{out}/weights.pt")
        with open(f"{out}/logs.json", "w") as f:
            json.dump(trainer.state.log_history, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
