"""The tiny byte-level Llama, its pretraining and the experts' fine-tuning.

Regime (see /work/shared/QUALITY-NOTES.md, and RESULTS.md for why): the base sees a small share
of packed skill examples during pretraining so it starts with partial skills, and experts are
fine-tuned at a low learning rate with generic text in every batch and the loss on answers
only. Experts trained on task data alone at a high rate lose generic ability and every merge
then scores ~0 on everything, which tells nothing about any merge method.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.quality.data import random_blocks
from benchmarks.quality.skills import SkillSampler

log = logging.getLogger(__name__)

DIMS: dict[str, Any] = {
    "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 4, "max_position_embeddings": 256, "vocab_size": 260,
}


@dataclass(frozen=True)
class TrainSpec:
    """One training run's hyperparameters (also the cache key of its checkpoint)."""

    steps: int
    lr: float
    batch: int = 32
    block: int = 128
    warmup: int = 50
    weight_decay: float = 0.0
    task_rows: int = 0          # rows per batch of packed skill examples
    answer_only: bool = False   # loss on answer bytes only in skill rows
    skills: tuple[str, ...] = ()
    seed: int = 0


def new_model(seed: int) -> torch.nn.Module:
    """A fresh ~1.1M-parameter Llama with byte vocabulary (fp32, untied lm_head, SDPA attention)."""
    from transformers import AutoModelForCausalLM

    from distmerge.testing.tiny import tiny_config

    config = tiny_config("llama", tie_word_embeddings=False, **DIMS)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")


def _lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    frac = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train(model: torch.nn.Module, spec: TrainSpec, stream: np.ndarray, held_out: set[str],
          on_log: Callable[[int, float], None] | None = None) -> None:
    """AdamW (betas 0.9/0.95, clip 1.0); each batch mixes generic rows and ``task_rows`` skill rows.

    Weight decay applies to matrices only, so norms and embeddings are not pulled to zero.
    """
    gen = torch.Generator().manual_seed(spec.seed)
    sampler = SkillSampler(spec.skills, held_out, spec.seed) if spec.skills else None
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.95))
    model.train()
    started = time.time()
    for step in range(spec.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, spec)
        generic = random_blocks(stream, spec.batch - spec.task_rows, spec.block, gen)
        mask = torch.ones_like(generic)
        if sampler is not None and spec.task_rows:
            tids, tmask = sampler.batch(spec.task_rows, spec.block)
            if not spec.answer_only:
                tmask = torch.ones_like(tmask)
            generic, mask = torch.cat([generic, tids]), torch.cat([mask, tmask])
        logits = model(input_ids=generic).logits[:, :-1]
        labels = generic[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if on_log and (step % 100 == 0 or step == spec.steps - 1):
            on_log(step, float(loss))
    log.info("trained %d steps in %.0fs", spec.steps, time.time() - started)
    model.eval()


def save(model: torch.nn.Module, out: Path, spec: TrainSpec) -> Path:
    """HF layout (save_pretrained + the byte tokenizer), plus the spec that made it (the cache key)."""
    from distmerge.testing.tiny import byte_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    byte_tokenizer().save_pretrained(out)
    (out / "train_spec.json").write_text(json.dumps(asdict(spec), sort_keys=True))
    return out


def cached(out: Path, spec: TrainSpec) -> bool:
    """True when ``out`` holds a complete checkpoint trained with exactly ``spec``."""
    marker = out / "train_spec.json"
    return (out / "model.safetensors").is_file() and marker.is_file() and \
        json.loads(marker.read_text()) == json.loads(json.dumps(asdict(spec), sort_keys=True))


def load_weights(model: torch.nn.Module, ckpt: Path) -> torch.nn.Module:
    """Load a checkpoint's safetensors (single file or sharded) into an existing model (fast reuse)."""
    from safetensors.torch import load_file

    index = ckpt / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(ckpt / f))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{ckpt}: missing {missing}, unexpected {unexpected}")
    model.eval()
    return model
