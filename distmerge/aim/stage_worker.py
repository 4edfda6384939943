"""One pipeline stage: a contiguous sequence of decoder layers, and nothing else, in memory.

A stage builds the base model on the meta device, keeps only its own parts (embeddings on the
first stage, the final norm and head on the last) and fills exactly their parameters from the
checkpoint with :func:`distmerge.io.safetensors.read_rows`, so a stage's memory is its share of the
weights. Its forward re-runs the decoder loop of ``transformers`` for its layers: rotary position
embeddings from the model's own rotary module (per layer type for Gemma 3), an explicit additive
causal mask per attention kind (eager attention pinned), and layer outputs unwrapped only when
they are tuples. Forward pre-hooks accumulate the AIM statistic of every module it runs.

This class is plain Python, so it can be tested without Ray; :mod:`distmerge.aim.stage_actors`
wraps it in a Ray actor.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distmerge.aim.hooks import ActivationStatistics, statistic_modules
from distmerge.aim.layout import ModelLayout
from distmerge.aim.masks import causal_mask
from distmerge.aim.wire import pack, unpack
from distmerge.checkpoint import Checkpoint
from distmerge.io.safetensors import read_rows

log = logging.getLogger(__name__)


class StageWorker:
    """Layers ``[start, end)`` of the base model, their statistics, and a forward over them."""

    def __init__(
        self,
        model_dir: str | Path,
        start: int,
        end: int,
        first: bool,
        last: bool,
        dtype: str = "float32",
        device: str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.start, self.end, self.first, self.last = start, end, first, last
        checkpoint = Checkpoint.open(model_dir, role="base model")
        layout = ModelLayout.build(checkpoint, self.dtype)
        self.spec = layout.spec
        self.sliding_window = getattr(layout.hf_config, "sliding_window", None)
        self.layer_types = layout.layer_types[start:end]
        self.part_names = layout.stage_parts(start, end, first, last)
        self.parts: dict[str, nn.Module] = {name: layout.module(name) for name in self.part_names}
        self.rotary = layout.module(layout.rotary).to(self.device)
        self.embed = self.parts.get(layout.embed)
        self.layers = [self.parts[name] for name in layout.layers[start:end]]
        self.norm = self.parts.get(layout.norm)
        self.head = self.parts.get(layout.head)
        # A plain Linear head (every architecture distmerge knows) is the only statistic module
        # in its part: its statistic is its input's, taken without computing the logits.
        self.head_name = layout.head if isinstance(self.head, nn.Linear) else None
        self._load(checkpoint, layout)
        del layout  # drop the rest of the meta model
        self.stats = ActivationStatistics(statistic_modules(self.parts.items()))
        log.info("stage layers %d-%d loaded: %d bytes on %s", start, end - 1, self.describe()["bytes"], self.device)

    def _load(self, checkpoint: Checkpoint, layout: ModelLayout) -> None:
        """Fill every parameter of the owned parts from the checkpoint; one tensor per source."""
        loaded: dict[str, nn.Parameter] = {}
        for part_name, part in self.parts.items():
            for name, _ in list(part.named_parameters(remove_duplicate=False)):
                full = f"{part_name}.{name}"
                src = layout.source(checkpoint, full)
                param = loaded.get(src)
                if param is None:
                    info = checkpoint.tensors[src]
                    tensor = read_rows(info, 0, info.rows).to(device=self.device, dtype=self.dtype)
                    param = nn.Parameter(tensor, requires_grad=False)
                    loaded[src] = param
                owner_name, _, leaf = name.rpartition(".")
                owner = part.get_submodule(owner_name) if owner_name else part
                setattr(owner, leaf, param)
            for buf_name, buf in list(part.named_buffers()):
                owner_name, _, leaf = buf_name.rpartition(".")
                owner = part.get_submodule(owner_name) if owner_name else part
                owner._buffers[leaf] = buf.to(self.device)
            part.eval()

    def describe(self) -> dict[str, Any]:
        """What this stage holds: parameter names with bytes, unique total bytes, layers, device."""
        params: dict[str, int] = {}
        storages: dict[int, int] = {}
        for part_name, part in self.parts.items():
            for name, p in part.named_parameters(remove_duplicate=False):
                params[f"{part_name}.{name}"] = p.numel() * p.element_size()
                if p.device.type == "meta":
                    raise RuntimeError(f"stage parameter {part_name}.{name} was never loaded")
                storages[p.data_ptr()] = p.numel() * p.element_size()
        return {
            "layers": (self.start, self.end),
            "parameters": params,
            "bytes": sum(storages.values()),
            "device": str(self.device),
        }

    @torch.inference_mode()
    def forward(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Run one micro-batch through this stage; returns the next stage's input.

        The first stage takes ``{"input_ids": ...}`` (a packed int64 ``[B, T]`` tensor); the last
        returns ``{"sequences": B}`` since only the statistics it accumulated are wanted.
        """
        if self.first:
            ids = unpack(payload["input_ids"], self.device)
            hidden = self.embed(ids).to(self.dtype)
        else:
            hidden = unpack(payload["hidden"], self.device)
        batch, seq_len = hidden.shape[:2]
        position_ids = torch.arange(seq_len, device=self.device).unsqueeze(0)
        masks = {
            kind: causal_mask(seq_len, hidden.dtype, self.device,
                              self.sliding_window if kind == "sliding_attention" else None)
            for kind in set(self.layer_types)
        }
        if self.spec.rope_per_layer_type:
            rope = {kind: self.rotary(hidden, position_ids, kind) for kind in set(self.layer_types)}
        else:
            shared = self.rotary(hidden, position_ids) if self.layers else None
            rope = {kind: shared for kind in set(self.layer_types)}
        for layer, kind in zip(self.layers, self.layer_types, strict=True):
            out = layer(
                hidden,
                attention_mask=masks[kind],
                position_embeddings=rope[kind],
                position_ids=position_ids,
            )
            hidden = out[0] if isinstance(out, tuple) else out
        if not self.last:
            return {"hidden": pack(hidden)}
        hidden = self.norm(hidden)
        if self.head_name is not None:  # the logits are never read: only the head's input counts
            self.stats.observe(self.head_name, hidden)
        else:
            for b in range(batch):  # one sequence at a time bounds the logits to [1, T, vocab]
                self.head(hidden[b : b + 1])
        return {"sequences": batch}

    def statistics(self) -> dict[str, torch.Tensor]:
        """The float64 statistic sums of this stage's modules, keyed by full module name."""
        return self.stats.result()
