"""Worker for test_distributed.py: train 3 steps (logging only at the end), then evaluate an uneven set; rank 0 writes
the summary and the eval metrics. `torchrun --nproc_per_node N tests/ddp_eval_worker.py TEACHER STUDENT OUT BATCH`."""

import json
import sys

from conftest import load_model, variable_length_examples
from datasets import Dataset
from ddp_worker import leave

from hf_kd import DistillationConfig, DistillationTrainer


def main(teacher, student, out, batch):
    args = DistillationConfig(
        output_dir=out,
        per_device_train_batch_size=int(batch),
        per_device_eval_batch_size=2,
        max_steps=3,
        learning_rate=0.3,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        train_sampling_strategy="sequential",
        loss_type="forward_kl",
        temperature=2.0,
        alpha=0.6,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=10,
        seed=0,
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=load_model(student),
        teacher_model=load_model(teacher),
        args=args,
        train_dataset=Dataset.from_list(variable_length_examples(12, seed=7, max_len=16)),
    )
    trainer.train()
    summary = trainer.state.log_history[-1]
    # 5 examples over 2 processes x batch 2: the last global batch is padded with repeats on some process
    metrics = trainer.evaluate(Dataset.from_list(variable_length_examples(5, seed=8, max_len=16)))
    accelerator = trainer.accelerator
    if accelerator.is_main_process:
        with open(f"{out}/result.json", "w") as f:
            json.dump({"summary": summary, "eval": metrics}, f)
    del trainer
    leave(accelerator)  # no gloo abort at exit (see ddp_worker.leave)


if __name__ == "__main__":
    main(*sys.argv[1:])
