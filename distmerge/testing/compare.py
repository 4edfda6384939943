"""Compare two merged checkpoints tensor by tensor, in ulps of the output dtype.

The distance between two floats of one dtype is the number of representable values between
them (0: bit-identical; -0.0 and +0.0 are 0 apart here, and the signs are reported apart), so
one tolerance means the same thing for bfloat16, float16 and float32 outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
           torch.bfloat16: torch.int16}


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF folder's safetensors files (read with the safetensors library)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for p in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(p))
    return state


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """Float bit patterns mapped to integers that order like the floats (int64)."""
    bits = t.contiguous().view(_INT_OF[t.dtype]).to(torch.int64)
    width = t.element_size() * 8
    top = 1 << (width - 1)
    bits = torch.where(bits < 0, bits + (1 << width), bits)  # unsigned pattern
    return torch.where(bits >= top, top - bits, bits)  # negatives below zero; -0.0 -> 0


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in ulps between two tensors of one float dtype (NaN vs NaN: 0)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    d = (_ordered(a) - _ordered(b)).abs()
    both_nan = torch.isnan(a) & torch.isnan(b)
    return torch.where(both_nan, torch.zeros_like(d), d)


@dataclass
class TensorStats:
    numel: int
    max_ulp: int
    identical: int
    # max |a - b| in ulps of the tensor's largest reference magnitude (0.0 when identical)
    scaled_ulp: float = 0.0


@dataclass
class Comparison:
    """What differs between a reference output and ours."""

    missing: list[str] = field(default_factory=list)  # in the reference, not in ours
    extra: list[str] = field(default_factory=list)  # in ours, not in the reference
    mismatched: list[str] = field(default_factory=list)  # shape or dtype differs
    stats: dict[str, TensorStats] = field(default_factory=dict)

    @property
    def max_ulp(self) -> int:
        return max((s.max_ulp for s in self.stats.values()), default=0)

    @property
    def max_scaled_ulp(self) -> float:
        return max((s.scaled_ulp for s in self.stats.values()), default=0.0)

    @property
    def identical_share(self) -> float:
        n = sum(s.numel for s in self.stats.values())
        return 1.0 if n == 0 else sum(s.identical for s in self.stats.values()) / n

    def structure_problems(self) -> list[str]:
        out = []
        if self.missing:
            out.append(f"missing tensors: {self.missing[:6]}{' ...' if len(self.missing) > 6 else ''}")
        if self.extra:
            out.append(f"unexpected tensors: {self.extra[:6]}{' ...' if len(self.extra) > 6 else ''}")
        out += self.mismatched
        return out

    def worst(self, n: int = 3) -> list[str]:
        ranked = sorted(self.stats.items(), key=lambda kv: -kv[1].max_ulp)[:n]
        return [f"{k}: {s.max_ulp} ulp, {s.identical}/{s.numel} identical" for k, s in ranked if s.max_ulp]


def compare_tensors(ref: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> Comparison:
    c = Comparison(missing=sorted(set(ref) - set(ours)), extra=sorted(set(ours) - set(ref)))
    for name in sorted(set(ref) & set(ours)):
        a, b = ref[name], ours[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            c.mismatched.append(f"{name}: reference {a.dtype}{tuple(a.shape)}, ours {b.dtype}{tuple(b.shape)}")
            continue
        if not a.is_floating_point():
            same = int((a == b).sum())
            c.stats[name] = TensorStats(a.numel(), 0 if same == a.numel() else 1 << 30, same)
            continue
        d = ulp_distance(a, b)
        bitwise = (a.contiguous().view(_INT_OF[a.dtype]) == b.contiguous().view(_INT_OF[b.dtype]))
        scaled = 0.0
        if a.numel() and int(d.max()):
            top = a.abs().max().reshape(1)
            spacing = float((torch.nextafter(top, torch.full_like(top, float("inf"))) - top).double())
            scaled = float((a.double() - b.double()).abs().max()) / spacing if spacing > 0 else float("inf")
        c.stats[name] = TensorStats(a.numel(), int(d.max()) if d.numel() else 0, int(bitwise.sum()), scaled)
    return c


# ---- config.json and tokenizer -----------------------------------------------------------

CONFIG_FIELDS = ("architectures", "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "n_layer",
                 "intermediate_size", "num_attention_heads", "num_key_value_heads", "tie_word_embeddings",
                 "dtype", "bos_token_id", "eos_token_id", "pad_token_id")


def config_fields(folder: Path) -> dict[str, Any]:
    """The config.json fields a merge decides (nested ``text_config`` flattened with a prefix)."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    if "torch_dtype" in cfg and "dtype" not in cfg:
        cfg["dtype"] = cfg["torch_dtype"]

    def pick(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out = {prefix + k: d[k] for k in CONFIG_FIELDS if k in d}
        if isinstance(d.get("text_config"), dict):
            out |= pick(d["text_config"], prefix + "text_config.")
        return out

    return pick(cfg)


def tokenizer_summary(folder: Path) -> dict[str, Any] | None:
    """Vocabulary, added tokens and chat template of a folder's tokenizer (None without one)."""
    folder = Path(folder)
    tok_file = folder / "tokenizer.json"
    if not tok_file.exists():
        return None
    tok = json.loads(tok_file.read_text())
    added = [{k: t.get(k) for k in ("id", "content", "special", "single_word", "lstrip", "rstrip", "normalized")}
             for t in tok.get("added_tokens", [])]
    template = None
    cfg_file = folder / "tokenizer_config.json"
    if cfg_file.exists():
        template = json.loads(cfg_file.read_text()).get("chat_template")
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.exists():
        template = jinja.read_text()
    return {"vocab": tok.get("model", {}).get("vocab"), "added_tokens": sorted(added, key=lambda t: t["id"]),
            "chat_template": template}
