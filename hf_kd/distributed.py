"""Prepare the frozen teacher for the engine Accelerate runs the student on (DDP, FSDP, DeepSpeed).

The teacher never trains, so it is never wrapped for gradients; but under FSDP and ZeRO-3 it is sharded like the
student, so no GPU has to hold a full copy of it (TRL leaves it whole on every GPU).
"""

from __future__ import annotations

import copy
import logging

from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

logger = logging.getLogger(__name__)


def prepare_teacher(accelerator: Accelerator, teacher: nn.Module) -> nn.Module:
    """The teacher placed and, under FSDP / ZeRO-3, sharded for inference. ``teacher`` must be frozen already."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return _deepspeed_teacher(accelerator, teacher)
    if kind == DistributedType.FSDP:
        return _fsdp_teacher(accelerator, teacher)
    # DDP / single device: a plain replica on this process's device (evaluation_mode: no DDP wrapper, no reducer)
    return accelerator.prepare_model(teacher, evaluation_mode=True)


def teacher_is_sharded(accelerator: Accelerator) -> bool:
    """Whether parameters (the lm_head included) live in shards: FSDP, or DeepSpeed ZeRO stage 3."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def _fsdp_teacher(accelerator: Accelerator, teacher: nn.Module) -> nn.Module:
    """Shard the teacher with the student's FSDP plugin (wrap policy, mixed precision, CPU offload)."""
    if accelerator.is_fsdp2:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        teacher = fsdp2_prepare_model(accelerator, teacher)  # frozen params: no fp32 upcast, no optimizer state
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        plugin = accelerator.state.fsdp_plugin
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


def _deepspeed_teacher(accelerator: Accelerator, teacher: nn.Module) -> nn.Module:
    """ZeRO-3: a DeepSpeed inference engine over sharded weights; stages 0-2: a plain (stage-0) replica."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):  # nothing to optimize
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        hidden = getattr(getattr(teacher, "config", None), "hidden_size", None)
        if hidden is not None:  # resolve the "auto" buckets from the teacher's own width
            zero["reduce_bucket_size"] = hidden * hidden
            zero["stage3_param_persistence_threshold"] = 10 * hidden
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden * hidden)
    else:
        config["zero_optimization"] = {"stage": 0}  # stages 1-2 shard optimizer state only: the teacher has none
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    logger.info("teacher prepared with DeepSpeed ZeRO stage %s", config["zero_optimization"]["stage"])
    return engine
