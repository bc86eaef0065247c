"""Worker for test_distributed.py, test_sharded.py and test_gpu.py: train a tiny pair for a few steps under one engine.

Run as `torchrun --standalone --nproc_per_node N tests/ddp_worker.py TEACHER STUDENT OUT BATCH GA [options]`:

* ``--engine``: ``ddp`` (default; a plain replica per process), ``onpolicy`` (DDP, lmbda 1 with greedy completions),
  ``fsdp`` (FSDP2), ``zero3`` (DeepSpeed ZeRO-3);
* ``--device``: ``cpu`` (default; gloo) or ``cuda`` (NCCL);
* ``--tokenizer DIR``: passed as processing_class (needed when the vocabularies are padded differently);
* ``--bf16``: the Trainer's bf16 (autocast; DeepSpeed's bf16 mode under ZeRO-3);
* ``--teacher-url URL``: the teacher served by ``hf-kd serve-teacher`` at URL (every rank asks it) instead of loaded;
* ``--generated onpolicy|seq_kd``: every batch completed greedily by the student (lmbda 1) or the teacher (seq_kd),
  under any engine;
* ``--evaluate``: evaluate on 5 examples after training (its metrics in ``logs.json``);
* ``--peft``: a LoRA student (its adapters train; ``weights.pt`` then holds the PeftModel's state dict).

Rank 0 writes ``logs.json``, and ``weights.pt`` (the student) for DDP; sharded engines save the student with
save_model (gathered to a full state dict) into ``OUT/student``. Every rank writes ``teacher.RANK.json``: how many
teacher parameters it holds before and after training.

FSDP on CPU processes needs a test-only patch of Accelerate (:func:`allow_fsdp_on_cpu`); ZeRO-3 on CPU needs none,
only a gloo state made before the config (:func:`zero3_on_cpu`). The worker fails if either stops taking effect.
"""

import argparse
import json
import os
from pathlib import Path

import torch
import yaml
from conftest import load_model, variable_length_examples
from datasets import Dataset

from hf_kd import DistillationConfig, DistillationTrainer

SHIPPED_FSDP = Path(__file__).parents[1] / "recipes" / "accelerate" / "fsdp.yaml"
# The shipped FSDP2 settings (no layer-class list: each model wraps its own _no_split_modules), as the Trainer's
# fsdp_config (which drops the fsdp_ prefix). Its bf16 mixed precision is for GPUs.
FSDP2 = {"fsdp": True, "fsdp_config": yaml.safe_load(SHIPPED_FSDP.read_text())["fsdp_config"]}
ZERO3 = {
    "deepspeed": {
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,  # shard every tensor: the default (1e5) keeps a tiny model whole
            "stage3_gather_16bit_weights_on_model_save": True,  # save_model gathers a full state dict
        },
        "bf16": {"enabled": "auto"},  # the Trainer's bf16 (--bf16)
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
    }
}
GENERATED = {"onpolicy": dict(lmbda=1.0, max_new_tokens=5), "seq_kd": dict(seq_kd=True, max_new_tokens=5)}
ENGINES = {"ddp": {}, "onpolicy": GENERATED["onpolicy"], "fsdp": FSDP2, "zero3": ZERO3}
SHARDED = ("fsdp", "zero3")


def allow_fsdp_on_cpu() -> None:
    """TEST ONLY: let Accelerate (and so the Trainer) run FSDP on CPU processes over gloo.

    With ``use_cpu`` Accelerate makes a MULTI_CPU state, and ``AcceleratorState.__init__`` switches to FSDP only for
    GPU-like types: it drops the plugin without a word and trains DDP. Switch it back after the original ran, as its
    GPU branch does. ``main`` asserts the teacher really is sharded, so this fails loudly if it stops taking effect.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


def zero3_on_cpu() -> dict:
    """ZeRO-3 on CPU processes: DeepSpeed over gloo, from a state made before the config reads it (Trainer settings).

    DeepSpeed's CPU backend also compiles a shared-memory all-reduce op (g++/ninja, ~1.5 min on first use) that only
    tensor-parallel inference calls; ZeRO-3 never does, and GPU runs never build it. Skipped here (TEST ONLY).
    """
    import importlib

    from accelerate import PartialState

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # the module, not the attribute
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    return {"accelerator_config": {"use_configured_state": True}}


def held(param) -> int:
    """Teacher elements this rank holds in memory for ``param``: its shard, plus the whole tensor while gathered."""
    if hasattr(param, "ds_tensor"):  # ZeRO-3: the partition, and .data is the full tensor while gathered (else empty)
        return int(param.ds_tensor.numel()) + int(param.data.numel())
    if hasattr(param, "to_local"):  # FSDP2: a DTensor shard (a gathered unit shows plain tensors instead)
        return int(param.to_local().numel())
    return int(param.numel())


def full_size(model) -> int:
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())


def early_eos(student, rows) -> int:
    """A token that ends some greedy completions early and not others (random tiny models rarely emit EOS)."""
    completions = []
    for row in rows:
        prompt = torch.tensor([row["input_ids"][:2]])
        completions.append(student.generate(prompt, do_sample=False, max_new_tokens=5, pad_token_id=0)[0, 2:].tolist())
    counts = {t: sum(t in c[:4] for c in completions) for c in completions for t in c[:4]}
    return max((n, t) for t, n in counts.items() if n < len(completions))[1]


def main(argv=None):
    parser = argparse.ArgumentParser()
    for name in ("teacher", "student", "out"):
        parser.add_argument(name)
    parser.add_argument("batch", type=int)
    parser.add_argument("ga", type=int)
    parser.add_argument("--engine", default="ddp", choices=ENGINES)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--tokenizer")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--teacher-url", help="a served teacher (hf-kd serve-teacher) instead of the local one")
    parser.add_argument("--generated", choices=GENERATED, help="every batch completed greedily, under any engine")
    parser.add_argument("--evaluate", action="store_true", help="evaluate on 5 examples after training")
    parser.add_argument("--peft", action="store_true", help="a LoRA student (q_proj, v_proj; the head trains whole)")
    opts = parser.parse_args(argv)

    rows = variable_length_examples(12, seed=7, max_len=16)
    # use_cpu: gloo on CPU; not for ZeRO-3 (Accelerate would drop DeepSpeed), whose gloo state zero3_on_cpu makes
    settings = dict(ENGINES[opts.engine], use_cpu=opts.device == "cpu" and opts.engine != "zero3", bf16=opts.bf16)
    if opts.teacher_url:
        settings.update(teacher_kind="served", teacher_options={"url": opts.teacher_url})
    if opts.device == "cpu" and opts.engine == "fsdp":
        allow_fsdp_on_cpu()
    if opts.device == "cpu" and opts.engine == "zero3":
        settings.update(zero3_on_cpu())
    if opts.generated:
        settings.update(GENERATED[opts.generated])
    if opts.engine == "onpolicy" or opts.generated:
        settings["generation_kwargs"] = {"do_sample": False, "eos_token_id": early_eos(load_model(opts.student), rows)}
    args = DistillationConfig(
        output_dir=opts.out,
        per_device_train_batch_size=opts.batch,
        gradient_accumulation_steps=opts.ga,
        max_steps=3,
        learning_rate=0.3,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        train_sampling_strategy="sequential",  # the same examples in the same step, whatever the world size
        loss_type={"forward_kl": 0.5, "reverse_kl": 0.5},
        temperature=2.0,
        alpha=0.6,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        **settings,
    )
    # after the config: under ZeRO-3 from_pretrained now loads each model already partitioned
    model = load_model(opts.student)
    teacher_model = None if opts.teacher_url else load_model(opts.teacher)
    full_teacher = full_size(teacher_model) if teacher_model is not None else 0
    tokenizer = None
    if opts.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(opts.tokenizer)
    peft_config = None
    if opts.peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = DistillationTrainer(
        peft_config=peft_config,
        model=model,
        teacher_model=teacher_model,
        args=args,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(rows),
    )
    # the teacher is never wrapped for gradients: no DDP wrapper, no gradient buckets
    assert not isinstance(trainer.teacher_model, torch.nn.parallel.DistributedDataParallel)
    if opts.engine in SHARDED:  # the engine really is the one asked for (a CPU patch that stopped working fails here)
        expected = {"fsdp": "FSDP", "zero3": "DEEPSPEED"}[opts.engine]
        assert trainer.accelerator.distributed_type.name == expected, trainer.accelerator.distributed_type
        assert trainer.accelerator.num_processes == int(os.environ.get("WORLD_SIZE", "1"))
    before = teacher_params_held(trainer)
    if opts.engine in SHARDED and trainer.accelerator.num_processes > 1:
        assert before < full_teacher, f"the teacher is not sharded: {before} of {full_teacher} parameters on one rank"
    trainer.train()
    if opts.evaluate:  # after training: the heads gathered without a gradient (sharded), 5 rows on 2 processes
        trainer.evaluate(Dataset.from_list(rows[:5]))
    after = teacher_params_held(trainer)
    if opts.engine in SHARDED:
        trainer.save_model(f"{opts.out}/student")  # every rank takes part in gathering the full state dict
    accelerator = trainer.accelerator
    with open(f"{opts.out}/teacher.{accelerator.process_index}.json", "w") as f:
        json.dump(
            {
                "full": full_teacher,
                "before": before,
                "after": after,
                "fused": trainer.use_fused_loss,
                "world": accelerator.num_processes,
                "vocab_size": trainer.vocab_size,
            },
            f,
        )
    if accelerator.is_main_process:
        if opts.engine not in SHARDED:
            student = trainer.model  # the PeftModel with --peft
            torch.save({k: v.detach().cpu() for k, v in student.state_dict().items()}, f"{opts.out}/weights.pt")
        with open(f"{opts.out}/logs.json", "w") as f:
            json.dump(trainer.state.log_history, f)
    del trainer, model, teacher_model
    leave(accelerator)


def teacher_params_held(trainer) -> int:
    """The teacher parameters this rank holds (0 for a served teacher: it holds none)."""
    return sum(held(p) for p in trainer.teacher_model.parameters()) if trainer.teacher_model is not None else 0


def leave(accelerator) -> None:
    """Free the wrapped models, then the process group. A DDP / FSDP / DeepSpeed module still alive when the interpreter
    exits makes gloo abort now and then ("terminate called without an active exception", exit code -6, in ~1 of 10
    two-process runs here), after everything was written."""
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # the prepared models it keeps; gc.collect() after
    accelerator.end_training()  # destroys the process group


if __name__ == "__main__":
    main()
