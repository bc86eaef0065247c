"""Prepare the frozen teacher for the engine Accelerate runs the student on (DDP, FSDP, DeepSpeed), and check that the
launched processes form one run.

The teacher never trains, so it is never wrapped for gradients; but under FSDP and ZeRO-3 it is sharded like the
student, so no process has to hold a full copy of it (TRL leaves it whole on every GPU), before or during training.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from hf_kd.errors import SetupError

logger = logging.getLogger(__name__)


def check_world(accelerator: Accelerator) -> None:
    """Refuse processes launched together (torchrun, ``accelerate launch --multi_gpu``) that would not train as asked.

    Accelerate fails two ways without a word on a machine without GPUs: without ``use_cpu`` it picks no distributed
    backend, so each process trains alone, all writing the same ``output_dir``; with it, it drops an FSDP plugin and
    trains DDP, each process holding the whole teacher.
    """
    launched = int(os.environ.get("WORLD_SIZE") or 1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        launched = max(launched, torch.distributed.get_world_size())
    if launched > accelerator.num_processes:
        raise SetupError(
            "use_cpu",
            f"{launched} processes were launched but Accelerate found no distributed backend for "
            f"{accelerator.device.type}, so each would train alone, all writing one output_dir; on CPU set use_cpu: "
            "true (--use_cpu true) to train them together over gloo",
        )
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"  # set by a plugin or the launcher
    if fsdp_asked and accelerator.distributed_type == DistributedType.MULTI_CPU:
        raise SetupError(
            "fsdp",
            f"Accelerate runs FSDP on GPUs only: these {accelerator.num_processes} CPU processes would train as DDP "
            "instead, each holding the whole teacher; drop the FSDP setting (or its Accelerate config) to train DDP "
            "knowingly",
        )


def prepare_teacher(accelerator: Accelerator, teacher: nn.Module) -> nn.Module:
    """The teacher placed and, under FSDP / ZeRO-3, sharded for inference. ``teacher`` must be frozen already."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return _deepspeed_teacher(accelerator, teacher)
    if kind == DistributedType.FSDP:
        return _fsdp_teacher(accelerator, teacher)
    # DDP / single device: a plain replica on this process's device (evaluation_mode: no DDP wrapper, no reducer)
    return accelerator.prepare_model(teacher, evaluation_mode=True)


def sharded_engine(accelerator: Accelerator) -> str | None:
    """``"fsdp2"``, ``"fsdp1"`` or ``"zero3"``: the engine that shards parameters (the lm_head included); ``None``
    when every process holds whole models (DDP, ZeRO-1/2, one process)."""
    if not teacher_is_sharded(accelerator):
        return None
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "zero3"
    return "fsdp2" if accelerator.is_fsdp2 else "fsdp1"


def teacher_is_sharded(accelerator: Accelerator) -> bool:
    """Whether parameters (the lm_head included) live in shards: FSDP, or DeepSpeed ZeRO stage 3."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def _fsdp_teacher(accelerator: Accelerator, teacher: nn.Module) -> nn.Module:
    """Shard the teacher with the student's FSDP plugin (wrap policy, mixed precision, CPU offload)."""
    plugin = accelerator.state.fsdp_plugin
    with _wrap_policy_for(plugin, teacher):
        if accelerator.is_fsdp2:
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            teacher = fsdp2_prepare_model(accelerator, teacher)  # frozen params: no fp32 upcast, no optimizer state
            _reshard_after_each_forward(teacher)
        else:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            plugin.set_auto_wrap_policy(teacher)
            teacher = FSDP(
                teacher,
                sharding_strategy=plugin.sharding_strategy,
                cpu_offload=plugin.cpu_offload,
                auto_wrap_policy=plugin.auto_wrap_policy,
                mixed_precision=plugin.mixed_precision_policy,
                sync_module_states=plugin.sync_module_states,
                use_orig_params=True,
                device_id=accelerator.device,
            )
    teacher.eval()
    return teacher


@contextlib.contextmanager
def _wrap_policy_for(plugin, teacher: nn.Module):
    """Let the teacher pick its own layer classes to wrap without fixing them for the student.

    ``set_auto_wrap_policy`` writes the first model's classes into the shared plugin: a Qwen2 teacher prepared first
    would leave ``Qwen2DecoderLayer`` for a Llama student, which then fails to prepare (FSDP2) or is never split
    into layers (FSDP1). The teacher wraps the configured classes it has, or else its own ``_no_split_modules``.
    """
    from accelerate.utils.dataclasses import get_module_class_from_name

    saved = plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap
    names = [n for n in saved[1] or [] if get_module_class_from_name(teacher, n) is not None]
    plugin.transformer_cls_names_to_wrap = names or list(getattr(teacher, "_no_split_modules", None) or [])
    plugin.auto_wrap_policy = getattr(saved[0], "func", saved[0])  # unbound from a model seen before, if any
    try:
        yield
    finally:
        plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap = saved


def _reshard_after_each_forward(teacher: nn.Module) -> None:
    """Free every gathered unit of an FSDP2 teacher when its forward returns.

    FSDP2 keeps the root's unit gathered after forward, and Accelerate gives the final norm + lm_head unit (with the
    embeddings, when tied) ``reshard_after_forward=False``: both wait for the backward that follows in training. A
    frozen teacher never runs one, so without this each process would hold them whole from the first step on.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in teacher.modules() if isinstance(module, FSDPModule)]

    def reshard(_module, _args, _output):
        for unit in units:
            unit.reshard()  # a no-op for units already resharded

    teacher.register_forward_hook(reshard)  # after FSDP's own post-forward hook: it was registered first


def _deepspeed_teacher(accelerator: Accelerator, teacher: nn.Module) -> nn.Module:
    """ZeRO-3: a DeepSpeed inference engine over sharded weights; stages 0-2: a plain (stage-0) replica."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):  # nothing to optimize
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        hidden = getattr(getattr(teacher, "config", None), "hidden_size", None)
        if hidden is not None:  # "auto" or unset: from the teacher's own width, as the Trainer does for the student
            auto = {
                "reduce_bucket_size": hidden * hidden,
                "stage3_param_persistence_threshold": 10 * hidden,
                "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            }
            zero.update({key: value for key, value in auto.items() if zero.get(key, "auto") == "auto"})
    else:
        config["zero_optimization"] = {"stage": 0}  # stages 1-2 shard optimizer state only: the teacher has none
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    logger.info("teacher prepared with DeepSpeed ZeRO stage %s", config["zero_optimization"]["stage"])
    return engine
