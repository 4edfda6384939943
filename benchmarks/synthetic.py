"""Synthetic Llama-shaped checkpoints of a chosen size, written fast (experts = base + noise).

Checks free disk space first and scales the model down, with a message, when the requested
size does not fit.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    hidden: int = 2048
    intermediate: int = 5632
    vocab: int = 32000
    heads: int = 16
    kv_heads: int = 4

    def layer_tensors(self, i: int) -> dict[str, tuple[int, ...]]:
        h, m, hd = self.hidden, self.intermediate, self.hidden // self.heads
        p = f"model.layers.{i}."
        return {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (self.kv_heads * hd, h),
            p + "self_attn.v_proj.weight": (self.kv_heads * hd, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (m, h),
            p + "mlp.up_proj.weight": (m, h),
            p + "mlp.down_proj.weight": (h, m),
        }

    def tensors(self, layers: int) -> dict[str, tuple[int, ...]]:
        out = {"model.embed_tokens.weight": (self.vocab, self.hidden)}
        for i in range(layers):
            out.update(self.layer_tensors(i))
        out["model.norm.weight"] = (self.hidden,)
        out["lm_head.weight"] = (self.vocab, self.hidden)
        return out

    def layers_for(self, nbytes: int, itemsize: int = 2) -> int:
        fixed = sum(a * b for a, b in [(self.vocab, self.hidden)] * 2) * itemsize
        per_layer = sum(torch.Size(s).numel() for s in self.layer_tensors(0).values()) * itemsize
        return max(1, round((nbytes - fixed) / per_layer))


def config_json(shape: Shape, layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate, "num_hidden_layers": layers, "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads, "vocab_size": shape.vocab, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    }


def write_family(root: Path, model_bytes: int, n_experts: int = 2, shape: Shape = Shape(),
                 file_bytes: int = 2 * 10**9, dtype: torch.dtype = torch.bfloat16) -> tuple[Path, list[Path]]:
    """Write base + ``n_experts`` checkpoints of about ``model_bytes`` each (scaled to free disk)."""
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    need = model_bytes * (n_experts + 2) * 1.1  # inputs + one output, with slack
    if need > free:
        scaled = int(free / ((n_experts + 2) * 1.1))
        log.warning("only %.1f GB free under %s: scaling models from %.2f GB to %.2f GB", free / 1e9, root,
                    model_bytes / 1e9, scaled / 1e9)
        model_bytes = scaled
    layers = shape.layers_for(model_bytes, torch.empty((), dtype=dtype).element_size())
    names = shape.tensors(layers)
    paths = []
    for m in range(n_experts + 1):
        folder = root / ("base" if m == 0 else f"expert{m}")
        marker = folder / "model.safetensors.index.json"
        paths.append(folder)
        if marker.exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(0)
        noise = torch.Generator().manual_seed(1000 + m)
        groups: list[dict[str, torch.Tensor]] = [{}]
        size, weight_map = 0, {}
        for name, s in names.items():
            t = torch.randn(s, generator=g) * 0.02
            if m:
                t += torch.randn(s, generator=noise) * 0.002
            t = t.to(dtype)
            nbytes = t.numel() * t.element_size()
            if groups[-1] and size + nbytes > file_bytes:
                groups.append({})
                size = 0
            groups[-1][name] = t
            size += nbytes
        total = 0
        for i, group in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file(group, folder / fname, metadata={"format": "pt"})
            for name, t in group.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
        (folder / "config.json").write_text(json.dumps(config_json(shape, layers), indent=2))
        marker.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return paths[0], paths[1:]
