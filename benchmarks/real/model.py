"""SmolLM2 loading, chat formatting, full-parameter fine-tuning and saving, on CPU.

Experts are trained in float32 from the bf16 base and saved in bf16, as checkpoints users
merge are. The loss covers the answer and its end-of-turn token only, and the LM head runs
only at those positions: on a 49k vocabulary it is most of a short sequence's cost otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.real.skills import SYSTEM

log = logging.getLogger("real.model")

WEIGHTS = "model.safetensors"
SPEC_FILE = "train_spec.json"
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja")


@dataclass(frozen=True)
class TrainSpec:
    """Everything that decides an expert's weights; its hash names the cached checkpoint."""

    skill: str
    seed: int
    steps: int
    batch: int
    lr: float
    warmup: int = 5
    weight_decay: float = 0.0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def load(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def chat_prompt(tok: Any, question: str, system: str | None = SYSTEM) -> str:
    """The model's own chat template up to the assistant turn (a system turn if given)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_pairs(tok: Any, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids of ``prompt + answer + <|im_end|>``, the targets, and the target mask.

    ``targets[r, t]`` is the token position ``t`` must predict (the next one); only answer and
    end-of-turn positions count (``mask``), so a row is answered exactly iff the argmax equals
    the target at every masked position, which is greedy decoding up to the end of the turn.
    """
    end = tok.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for question, answer in pairs:
        p = tok(chat_prompt(tok, question), add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"] + [end]
        rows.append((p, a))
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id or 0, dtype=torch.long)
    targets = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (p, a) in enumerate(rows):
        ids[r, :len(p) + len(a)] = torch.tensor(p + a)
        targets[r, len(p) - 1:len(p) + len(a) - 1] = torch.tensor(a)
        mask[r, len(p) - 1:len(p) + len(a) - 1] = True
    return ids, targets, mask


def answer_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits at the masked positions only (the LM head skipped everywhere else).

    Rows are right-padded; under the causal mask padding never reaches an earlier position,
    so no attention mask is needed.
    """
    hidden = model.model(input_ids=ids).last_hidden_state
    return model.lm_head(hidden[mask])


def train(base: Path, out: Path, spec: TrainSpec, draw: Callable[[], tuple[str, str]]) -> Path:
    """Fine-tune every parameter of ``base`` on ``draw``'s pairs; save to ``out`` (bf16)."""
    if cached(out, spec):
        log.info("cached: %s", out)
        return out
    torch.manual_seed(spec.seed)
    tok = tokenizer(base)
    model = load(base)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < spec.warmup:
            return spec.lr * (step + 1) / spec.warmup
        t = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    started = time.time()
    for step in range(spec.steps):
        ids, targets, mask = encode_pairs(tok, [draw() for _ in range(spec.batch)])
        loss = torch.nn.functional.cross_entropy(answer_logits(model, ids, mask), targets[mask])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == spec.steps - 1:
            log.info("%s step %d/%d loss %.4f (%.1fs)", out.name, step + 1, spec.steps, loss.item(),
                     time.time() - started)
    return save(model, base, out, spec)


def save(model: Any, base: Path, out: Path, spec: TrainSpec | None) -> Path:
    """bf16 safetensors (tied head dropped) with the base's config and tokenizer; atomic."""
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
    for name in SIDE_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, tmp / name)
    if spec is not None:
        (tmp / SPEC_FILE).write_text(json.dumps({**asdict(spec), "key": spec.key()}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def cached(out: Path, spec: TrainSpec) -> bool:
    try:
        return json.loads((out / SPEC_FILE).read_text()).get("key") == spec.key() and (out / WEIGHTS).is_file()
    except (OSError, ValueError):
        return False
