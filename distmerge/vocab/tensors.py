"""Which tensors have a vocabulary axis, and which input tensor stands for each per model.

From mergekit 0.1.5's architecture definitions (``_data/architectures/*.json``): per
architecture, the weights indexed by token id, each with the names mergekit also accepts for
it (``aliases``, then ``tied_names``). The vocabulary is on axis 0 of every one of them (mergekit
supports other axes in ``PermutedVocabulary`` but no definition uses one; neither does its
``transformers``-based inference, which marks input/output embedding weights and biases with 0).

Tied heads, as mergekit plans them: an optional weight (``lm_head.weight``) is produced when at
least one model stores it under its name or an alias; a model that does not (a tied model)
contributes the first of its ``tied_names`` it has (its ``embed_tokens``). So when the base
ties and an expert does not, the output gets an ``lm_head.weight`` merged from the base's
embedding rows and the expert's head rows, and the template's ``config.json`` (with
``tie_word_embeddings: true``) is written unchanged: transformers then ties the loaded model
and ignores that tensor. When every model ties, no ``lm_head.weight`` is produced.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from distmerge.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class VocabWeight:
    name: str
    optional: bool = False
    aliases: tuple[str, ...] = ()
    tied_names: tuple[str, ...] = ()


def _decoder(embed: str = "model.embed_tokens.weight", head: str = "lm_head.weight", tied: bool = True,
             optional: bool = True) -> tuple[VocabWeight, ...]:
    return (VocabWeight(embed), VocabWeight(head, optional=optional, tied_names=(embed,) if tied else ()))


_LLAMA_LIKE = ("LlamaForCausalLM", "LLaMaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM",
               "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma2ForCausalLM",
               "Gemma3ForCausalLM", "Glm4ForCausalLM", "Glm4MoeForCausalLM", "GraniteForCausalLM",
               "GraniteMoeHybridForCausalLM", "Olmo2ForCausalLM", "Phi3SmallForCausalLM",
               "Starcoder2ForCausalLM", "ApertusForCausalLM", "ArceeForCausalLM")

ARCHITECTURES: dict[str, tuple[VocabWeight, ...]] = {
    **{name: _decoder() for name in _LLAMA_LIKE},
    "GemmaForCausalLM": (VocabWeight("model.embed_tokens.weight"),),
    "CohereForCausalLM": _decoder(tied=False),
    "Cohere2ForCausalLM": _decoder(tied=False),
    "Lfm2ForCausalLM": _decoder(tied=False),
    "Phi3ForCausalLM": _decoder(optional=False, tied=False),
    "StableLmForCausalLM": _decoder(optional=False, tied=False),
    "BaichuanForCausalLM": _decoder(optional=False, tied=False),
    "PhiForCausalLM": (VocabWeight("model.embed_tokens.weight"), VocabWeight("lm_head.bias"),
                       VocabWeight("lm_head.weight")),
    "GPT2LMHeadModel": (VocabWeight("transformer.wte.weight", aliases=("wte.weight",)),
                        VocabWeight("lm_head.weight", optional=True,
                                    tied_names=("transformer.wte.weight", "wte.weight"))),
    "GPTBigCodeForCausalLM": _decoder("transformer.wte.weight"),
    "GPTNeoXForCausalLM": _decoder("gpt_neox.embed_in.weight", "embed_out.weight", optional=False, tied=False),
    "FalconForCausalLM": _decoder("transformer.word_embeddings.weight", optional=False, tied=False),
    "ExaoneForCausalLM": _decoder("transformer.wte.weight", optional=False, tied=False),
    "InternLM2ForCausalLM": _decoder("model.tok_embeddings.weight", "output.weight"),
    "MambaForCausalLM": _decoder("backbone.embeddings.weight"),
}
VOCABULARY_AXIS = 0


@dataclass(frozen=True)
class VocabTensor:
    """One output vocabulary tensor and, per model, the input tensor that stands for it (None:
    the model has none, and is left out of this tensor's merge, as mergekit leaves it out)."""

    name: str
    sources: tuple[str | None, ...]
    axis: int = VOCABULARY_AXIS

    def models(self) -> list[int]:
        """Indices of the models this tensor is merged from (its model order)."""
        return [i for i, s in enumerate(self.sources) if s is not None]


def architecture_weights(config: dict) -> tuple[VocabWeight, ...]:
    """The vocabulary weights of a model's architecture (``config.json`` ``architectures[0]``)."""
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if arch not in ARCHITECTURES:
        raise ConfigError(f"architecture {arch!r}: its vocabulary tensors are unknown to distmerge, so "
                          "its vocabulary cannot be merged (known: " + ", ".join(sorted(ARCHITECTURES)) + ")")
    return ARCHITECTURES[arch]


def vocabulary_tensors(config: dict, model_tensors: Sequence[Collection[str]],
                       models: Sequence[str] | None = None) -> list[VocabTensor]:
    """The output vocabulary tensors of a merge whose template has ``config`` (its config.json)
    and whose models hold ``model_tensors`` (tensor names, in the merge's model order)."""
    out = []
    for w in architecture_weights(config):
        stored = (w.name, *w.aliases)
        if w.optional and not any(n in names for names in model_tensors for n in stored):
            continue
        sources = []
        for i, names in enumerate(model_tensors):
            found = next((n for n in (*stored, *w.tied_names) if n in names), None)
            if found is None and not w.optional:
                who = models[i] if models else f"models[{i}]"
                raise CheckpointError(f"{who}: tensor {w.name!r} is required but not present")
            sources.append(found)
        out.append(VocabTensor(w.name, tuple(sources)))
    return out
