"""The models: loading and tasks (``loading``), PEFT adapters (``adapters``), sharding (``sharding``)."""

from hf_kd.models.heads import LMHeadSpec, as_projection_weight, finish_logits, lm_head_spec, project  # noqa: F401
from hf_kd.models.loading import *  # noqa: F401,F403 (hf_kd.models was one module: its names stay importable here)
