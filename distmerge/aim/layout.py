"""The base model's structure on the meta device: part names, parameter names, tensor sources.

Both the driver (to size stages and check the checkpoint before any actor starts) and each stage
(to build and fill its own layers) need the same picture of the model: which modules are the
embeddings, the decoder layers, the final norm, the rotary module and the head, under which
names, and which checkpoint tensor fills each parameter (a tied ``lm_head.weight`` is read from
``embed_tokens.weight``). Building the model under ``accelerate.init_empty_weights`` costs no
weight memory; buffers (rotary frequencies, Gemma's embedding scale) stay real.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distmerge.aim.architectures import ArchSpec, architecture, layer_attention_types
from distmerge.checkpoint import Checkpoint
from distmerge.errors import CheckpointError

log = logging.getLogger(__name__)


@dataclass
class ModelLayout:
    """A meta-device model and the names of its parts, as ``named_modules()`` spells them."""

    model: nn.Module
    hf_config: Any
    spec: ArchSpec
    embed: str
    layers: list[str]
    norm: str
    head: str
    rotary: str
    tied: dict[str, str]
    layer_types: list[str]

    @classmethod
    def build(cls, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32) -> ModelLayout:
        """Build the meta model of a checkpoint (eager attention pinned) for ``dtype`` compute.

        ``dtype`` is the compute dtype, not the checkpoint's: ``from_config`` would otherwise
        follow config.json's dtype, and the real buffers it makes (Gemma's embedding scale
        sqrt(hidden)) would be rounded to bf16 for a bf16 checkpoint computed in float32.
        """
        import transformers
        from accelerate import init_empty_weights

        spec = architecture(checkpoint.config, f"base model {checkpoint.path}")
        hf_config = transformers.AutoConfig.from_pretrained(checkpoint.path)
        with init_empty_weights(include_buffers=False):
            model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager",
                                                                  dtype=dtype)
        model.eval()
        names = {id(m): n for n, m in model.named_modules()}
        decoder = model.get_decoder()
        head = model.get_output_embeddings()
        parts = {
            "embed": decoder.embed_tokens,
            "norm": decoder.norm,
            "head": head,
            "rotary": decoder.rotary_emb,
        }
        resolved = {k: names[id(m)] for k, m in parts.items()}
        tied: dict[str, str] = {}
        text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        if getattr(text_config, "tie_word_embeddings", False):
            tied = {f"{resolved['head']}.weight": f"{resolved['embed']}.weight"}
        return cls(
            model=model,
            hf_config=hf_config,
            spec=spec,
            embed=resolved["embed"],
            layers=[names[id(layer)] for layer in decoder.layers],
            norm=resolved["norm"],
            head=resolved["head"],
            rotary=resolved["rotary"],
            tied=tied,
            layer_types=layer_attention_types(spec, hf_config),
        )

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def stage_parts(self, start: int, end: int, first: bool, last: bool) -> list[str]:
        """Names of the weight-holding parts a stage owning layers ``[start, end)`` needs."""
        parts = [self.embed] if first else []
        parts += self.layers[start:end]
        if last:
            parts += [self.norm, self.head]
        return parts

    def parameter_names(self, parts: list[str]) -> list[str]:
        """Full names of the parameters under ``parts`` (a shared parameter listed once per name)."""
        out = []
        for part in parts:
            for name, _ in self.module(part).named_parameters(remove_duplicate=False):
                out.append(f"{part}.{name}")
        return out

    def source(self, checkpoint: Checkpoint, name: str) -> str:
        """The checkpoint tensor that fills parameter ``name``; a CheckpointError if none does."""
        if name in checkpoint.tensors:
            return name
        tied = self.tied.get(name)
        if tied is not None and tied in checkpoint.tensors:
            return tied
        raise CheckpointError(
            f"base model {checkpoint.path}: tensor {name!r} is missing from the checkpoint"
            + (f" (nor is its tied source {tied!r} there)" if tied else "")
        )

    def part_bytes(self, checkpoint: Checkpoint, parts: list[str], itemsize: int | None = None) -> int:
        """Bytes of weights the parts hold: stored size, or at ``itemsize`` bytes per element."""
        total = 0
        seen: set[str] = set()
        for name in self.parameter_names(parts):
            src = self.source(checkpoint, name)
            if src in seen:
                continue
            seen.add(src)
            info = checkpoint.tensors[src]
            total += info.numel * itemsize if itemsize else info.nbytes
        return total


def open_base(model_dir: str | Path) -> tuple[Checkpoint, ModelLayout]:
    """Open the base checkpoint and build its layout; checks every needed tensor exists."""
    checkpoint = Checkpoint.open(model_dir, role="base model")
    layout = ModelLayout.build(checkpoint)
    parts = layout.stage_parts(0, len(layout.layers), True, True)
    for name in layout.parameter_names(parts):
        layout.source(checkpoint, name)
    return checkpoint, layout
