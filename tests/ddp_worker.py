"""Worker for test_distributed.py / test_gpu.py: train a tiny pair for a few steps; rank 0 writes weights and logs.

Run as `torchrun --standalone --nproc_per_node N tests/ddp_worker.py TEACHER STUDENT OUT PER_DEVICE_BATCH GA [ENGINE]`
with ENGINE one of ``ddp`` (default; CPU gloo), ``onpolicy`` (CPU gloo, lmbda 1 with greedy completions), ``gpu`` (plain DDP on CUDA), ``fsdp`` (FSDP2 on CUDA), ``zero3``
(DeepSpeed ZeRO-3 on CUDA). Sharded engines also save the student with save_model (gathered to a full state dict)
and report how much of the teacher each rank holds.
"""

import json
import sys

import torch
from datasets import Dataset

from conftest import load_model, variable_length_examples
from hf_kd import DistillationConfig, DistillationTrainer

ENGINES = {
    "ddp": dict(use_cpu=True),
    "onpolicy": dict(use_cpu=True, lmbda=1.0, max_new_tokens=5),
    "gpu": dict(use_cpu=False),
    "fsdp": dict(use_cpu=False, fsdp="full_shard",
                 fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                              "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT"}),  # fmt: skip
    "zero3": dict(use_cpu=False,
                  deepspeed={"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
                             "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                             "gradient_clipping": "auto", "train_batch_size": "auto"}),  # fmt: skip
}


def _local_numel(param) -> int:
    if hasattr(param, "ds_numel"):  # ZeRO-3: the rank's partition
        return int(param.ds_tensor.numel())
    local = getattr(param, "to_local", None)  # FSDP2: a DTensor shard
    return int(local().numel()) if local is not None else int(param.numel())


def early_eos(student, rows) -> int:
    """A token that ends some greedy completions early and not others (random tiny models rarely emit EOS)."""
    completions = []
    for row in rows:
        prompt = torch.tensor([row["input_ids"][:2]])
        completions.append(student.generate(prompt, do_sample=False, max_new_tokens=5, pad_token_id=0)[0, 2:].tolist())
    counts = {t: sum(t in c[:4] for c in completions) for c in completions for t in c[:4]}
    return max((n, t) for t, n in counts.items() if n < len(completions))[1]


def main(teacher, student, out, batch, ga, engine="ddp"):
    rows = variable_length_examples(12, seed=7, max_len=16)
    settings = dict(ENGINES[engine])
    if engine == "onpolicy":
        settings["generation_kwargs"] = {"do_sample": False, "eos_token_id": early_eos(load_model(student), rows)}
    args = DistillationConfig(
        output_dir=out, per_device_train_batch_size=int(batch), gradient_accumulation_steps=int(ga), max_steps=3,
        learning_rate=0.3, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
        train_sampling_strategy="sequential",  # the same examples in the same step, whatever the world size
        loss_type={"forward_kl": 0.5, "reverse_kl": 0.5}, temperature=2.0, alpha=0.6,
        report_to="none", save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True, **settings,
    )
    model = load_model(student)
    teacher_model = load_model(teacher)
    full_teacher = sum(p.numel() for p in teacher_model.parameters())
    trainer = DistillationTrainer(model=model, teacher_model=teacher_model, args=args,
                                  train_dataset=Dataset.from_list(rows))
    # the teacher is never wrapped for gradients: no DDP wrapper, no gradient buckets
    assert not isinstance(trainer.teacher_model, torch.nn.parallel.DistributedDataParallel)
    local_teacher = sum(_local_numel(p) for p in trainer.teacher_model.parameters())
    trainer.train()
    sharded = engine in ("fsdp", "zero3")
    if sharded:
        trainer.save_model(f"{out}/student")  # FSDP / ZeRO-3: every rank takes part in gathering the full state dict
    if trainer.accelerator.is_main_process:
        if not sharded:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, f"{out}/weights.pt")
        with open(f"{out}/logs.json", "w") as f:
            json.dump(trainer.state.log_history, f)
        with open(f"{out}/teacher.json", "w") as f:
            json.dump({"full": full_teacher, "local": local_teacher, "fused": trainer.use_fused_loss,
                       "world": trainer.accelerator.num_processes}, f)  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:])
