"""The compatibility cases: mergekit 0.1.5's own test configurations, and ours.

A case is a mergekit config in which ``@name`` stands for a model folder of :data:`MODELS`
(pico models built as mergekit's tests build them), plus how its output is compared:

- ``ulps``: the largest allowed distance, in ulps of the output dtype, between mergekit's
  tensor and ours (0: bit-identical; docs/methods.md "Intentional differences" says which
  methods are bit-identical and which within 1 ulp);
- ``random``: the method draws random masks (DARE, DELLA): compare what does not depend on
  the draws (names, shapes, dtypes, the untouched elements equal the base, the kept share and
  the L1 norm of the change close to mergekit's);
- ``error``: mergekit refuses the config; distmerge must refuse it too;
- ``tokenizer``: compare the written tokenizer (vocabulary, added tokens, chat template).

Sources: ``basic/*`` test_basic_merges.py, ``dtypes/*`` test_merge_dtypes.py,
``params/*`` test_config_parameters.py, ``regress/*`` test_merge_method_regressions.py,
``tok/*`` test_tokenizer.py, ``chat/*`` test_chat_template.py, ``vocab/*``
test_vocabulary_axis.py and test_embedding_truncation.py; ``own/*`` are ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# ---- models --------------------------------------------------------------------------------

# name -> (builder, kwargs, tokenizer spec or None). Builders live in distmerge.testing.pico.
MODELS: dict[str, tuple[str, dict[str, Any], dict[str, Any] | None]] = {
    **{f"{n}{sfx}": ("picollama", {"seed": s, "dtype": dt}, None)
       for n, s in (("a", 1), ("b", 2), ("c", 3))
       for sfx, dt in (("", torch.float32), ("_bf16", torch.bfloat16), ("_f16", torch.float16))},
    "a_tied": ("picollama", {"seed": 11, "tie_word_embeddings": True}, None),
    "b_tied": ("picollama", {"seed": 12, "tie_word_embeddings": True}, None),
    "c_tied": ("picollama", {"seed": 13, "tie_word_embeddings": True}, None),
    "granite_a": ("picogranite", {"seed": 21}, None),
    "granite_b": ("picogranite", {"seed": 22}, None),
    "gpt2_a": ("picogpt2", {"seed": 31}, None),
    "llava_a": ("picollava", {"seed": 41}, None),
    "llava_b": ("picollava", {"seed": 42}, None),
    "llava_c": ("picollava", {"seed": 43}, None),
    # the same weights under transformers' module names (``model.language_model.*``, ``lm_head``)
    **{f"llava_{n}_hf": ("picollava", {"seed": s, "layout": "transformers"}, None)
       for n, s in (("a", 41), ("b", 42), ("c", 43))},
    # PEFT LoRA adapters (``@a+@lora_a``: mergekit's model+adapter syntax) on a's q/v/down projections
    **{f"lora_{n}": ("lora", {"base": n, "seed": s, "targets": [
        f"model.layers.{i}.{m}.weight" for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]}, None)
       for n, s in (("a", 61), ("a_bf16", 62))},
    # test_tokenizer.py's fixtures
    "tok_base": ("picollama", {"seed": 51, "vocab_size": 64}, {"vocab_size": 64, "added": []}),
    "tok_chatml": ("picollama", {"seed": 52, "vocab_size": 66},
                   {"vocab_size": 64, "added": ["<|im_start|>", "<|im_end|>"]}),
    "tok_padded": ("picollama", {"seed": 53, "vocab_size": 64},
                   {"vocab_size": 64, "added": [f"<UNUSED_{i}>" for i in range(4)]}),
    "tok_special": ("picollama", {"seed": 54, "vocab_size": 65},
                    {"vocab_size": 64, "added": [], "special": ["<|existing_special|>"]}),
    # five models and more (_many_models): sizes that are not multiples of 32 put elements of
    # every tensor after its last whole group of torch's vectors, where torch's sum over a
    # stack of five or more models is not left to right
    **{f"odd_{n}": ("picollama", {"seed": s, "hidden_size": 36, "intermediate_size": 50, "num_attention_heads": 6,
                                  "num_key_value_heads": 6}, None)
       for n, s in zip("abcdef", range(71, 77), strict=True)},
    # test_embedding_truncation.py: a model whose extra embedding rows are padding
    "tok_base_b": ("picollama", {"seed": 55, "vocab_size": 64}, {"vocab_size": 64, "added": []}),
    "tok_wide": ("picollama", {"seed": 56, "vocab_size": 72}, {"vocab_size": 64, "added": []}),
}


@dataclass(frozen=True)
class Case:
    id: str
    config: dict[str, Any]
    ulps: int = 0
    kind: str = "values"  # values | random | error
    tokenizer: bool = False
    # Where mergekit's float32 whole-tensor sums (norms, dot products) cannot be reproduced in
    # its order (docs/methods.md, difference 5): the allowed |difference| in ulps of the
    # tensor's largest magnitude, since a scalar one ulp off moves elements that cancel to
    # near zero by many of their own ulps.
    tensor_ulps: float | None = None
    # config.json fields where distmerge deliberately writes another value (docs/methods.md):
    # (key, mergekit's value, ours); both are asserted, the rest of config.json must agree.
    config_differs: tuple[tuple[str, Any, Any], ...] = ()
    # Where mergekit misreads an input layout (docs/mergekit-compatibility.md: LLaVA), the
    # reference is mergekit's merge of the same weights in a layout it reads: the reference run
    # swaps these models, and its tensor names get these prefix renames before the comparison.
    reference_swap: tuple[tuple[str, str], ...] = ()
    reference_renames: tuple[tuple[str, str], ...] = ()
    # Where mergekit writes NaN (multislerp in float16: eps underflows and it divides 0 by 0),
    # distmerge's value must equal this model's tensor instead (docs/methods.md, difference 12).
    nan_in_reference_is: str | None = None

    def reference_config(self) -> dict[str, Any]:
        """The config mergekit runs (``config`` with ``reference_swap`` applied)."""
        swap = {f"@{a}": f"@{b}" for a, b in self.reference_swap}

        def walk(v: Any) -> Any:
            if isinstance(v, str):
                return swap.get(v, v)
            if isinstance(v, dict):
                return {k: walk(x) for k, x in v.items()}
            if isinstance(v, list):
                return [walk(x) for x in v]
            return v

        return walk(self.config)

    def reference_name(self, name: str) -> str:
        """Our name for one of mergekit's output tensors."""
        for old, new in self.reference_renames:
            if name.startswith(old):
                return new + name[len(old):]
        return name

    def models(self) -> set[str]:
        """Every pico model the case or its reference run reads."""
        found: set[str] = set()

        def walk(v: Any) -> None:
            if isinstance(v, str) and v.startswith("@"):
                found.update(part[1:] for part in v.split("+"))
            elif isinstance(v, dict):
                for x in v.values():
                    walk(x)
            elif isinstance(v, list):
                for x in v:
                    walk(x)

        walk(self.config)
        walk(self.reference_config())
        return found


def two(method: str, a: str = "@a", b: str = "@b", base: str | None = None, dtype: str | None = "bfloat16",
        params: dict[str, Any] | None = None, weights: tuple[Any, Any] = (0.6, 0.4), **extra: Any) -> dict[str, Any]:
    """test_basic_merges.py's ``two_model_config``."""
    cfg: dict[str, Any] = {"merge_method": method,
                           "models": [{"model": a, "parameters": {"weight": weights[0]}},
                                      {"model": b, "parameters": {"weight": weights[1]}}]}
    if base is not None:
        cfg["base_model"] = base
    if dtype is not None:
        cfg["dtype"] = dtype
    if params is not None:
        cfg["parameters"] = params
    return cfg | extra


# Per-method tolerance (ulps of the output dtype) where mergekit's order of float operations
# cannot be reproduced exactly (see docs/methods.md); 0 everywhere else.
METHOD_ULPS = {"slerp": 1, "model_stock": 1, "nuslerp": 1, "multislerp": 1, "karcher": 1, "sce": 1,
               "ram": 1, "ramplus_tl": 1, "arcee_fusion": 1, "nearswap": 1}
RANDOM_METHODS = {"dare_linear", "dare_ties", "della", "della_linear"}


# Methods whose result mergekit promotes to float32 in bf16/fp16 compute (a float32 mask or
# lambda); it writes those tensors under a config.json that keeps the compute dtype, distmerge's
# says float32 (docs/methods.md, difference 14).
PROMOTING_METHODS = {"ramplus_tl", "arcee_fusion"}


def compute_dtype(config: dict[str, Any]) -> str:
    """The dtype a case computes in: ``dtype``, else the first model's stored dtype."""
    if config.get("dtype"):
        return config["dtype"]
    first = (config.get("models") or [{}])[0].get("model", "") if "models" in config else ""
    return {"_bf16": "bfloat16", "_f16": "float16"}.get(first[-5:] if first.endswith("_bf16") else first[-4:],
                                                         "float32")


# In float32, mergekit computes SLERP's and nuslerp's coefficients, model stock's t, multislerp's
# normalisations, SCE's weights and karcher's norms from whole-tensor float32 sums in torch's
# order, which distmerge (exact sums, shard-invariant) cannot reproduce: the allowed difference
# in ulps of the tensor's largest magnitude (measured maxima; docs/methods.md, difference 5).
# karcher in float16: its norms are float16 scalars, one ulp apart at most (measured 0.07).
TENSOR_ULPS: dict[tuple[str, str], float] = {
    ("slerp", "float32"): 2.0, ("model_stock", "float32"): 4.0, ("nuslerp", "float32"): 4.0,
    ("multislerp", "float32"): 6.0, ("sce", "float32"): 2.0, ("karcher", "float32"): 3.0,
    ("karcher", "float16"): 1.0,
}


def case(id_: str, config: dict[str, Any], **kw: Any) -> Case:
    method = config["merge_method"]
    dtype = compute_dtype(config)
    kw.setdefault("ulps", METHOD_ULPS.get(method, 0))
    kw.setdefault("tensor_ulps", TENSOR_ULPS.get((method, dtype)))
    if method in PROMOTING_METHODS and dtype in ("bfloat16", "float16") and "out_dtype" not in config:
        kw.setdefault("config_differs", (("dtype", dtype, "float32"),))
    if method in RANDOM_METHODS:
        kw.setdefault("kind", "random")
    return Case(id_, config, **kw)


# mergekit 0.1.5 reads a LLaVA checkpoint saved in the Hub's layout (``language_model.model.*``,
# as llava-hf's models and transformers' save_pretrained write it) without its language model:
# those tensors count as "optional" and the output holds the vision tower and projector only
# (test_mergekit_drops_hub_layout_language_model). distmerge merges all of them; the reference
# for every tensor is mergekit's merge of the same weights under transformers' module names.
LLAVA_HUB_NAMES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                   ("model.vision_tower.", "vision_tower."),
                   ("model.multi_modal_projector.", "multi_modal_projector."))


def _vlm() -> list[Case]:
    swap = tuple((f"llava_{n}", f"llava_{n}_hf") for n in "abc")
    configs = {
        "linear": two("linear", "@llava_a", "@llava_b"),
        "slerp": two("slerp", "@llava_a", "@llava_b", base="@llava_a", params={"t": 0.35}),
        "ties": two("ties", "@llava_a", "@llava_b", base="@llava_c", params={"density": 0.3}),
        "task_arithmetic": two("task_arithmetic", "@llava_a", "@llava_b", base="@llava_c"),
        "breadcrumbs": two("breadcrumbs", "@llava_a", "@llava_b", base="@llava_c"),
        "dare_ties": two("dare_ties", "@llava_a", "@llava_b", base="@llava_c", params={"density": 0.66}),
        "model_stock": two("model_stock", "@llava_b", "@llava_c", base="@llava_a"),
        "model_stock_filterwise": two("model_stock", "@llava_b", "@llava_c", base="@llava_a",
                                      params={"filter_wise": True}),
        "nuslerp": two("nuslerp", "@llava_a", "@llava_b", base="@llava_c",
                       params={"nuslerp_row_wise": False, "nuslerp_flatten": False}),
    }
    out = [case(f"basic/vlm_{name}", cfg, reference_swap=swap, reference_renames=LLAVA_HUB_NAMES)
           for name, cfg in configs.items()]
    # checkpoints already under transformers' names: both tools read them directly
    out += [case("basic/vlm_transformers_layout_linear", two("linear", "@llava_a_hf", "@llava_b_hf")),
            case("basic/vlm_transformers_layout_ties", two("ties", "@llava_a_hf", "@llava_b_hf", base="@llava_c_hf",
                                                           params={"density": 0.3}))]
    return out


def _basic() -> list[Case]:
    out = [
        case("basic/passthrough_scale", {"merge_method": "passthrough", "models": [
            {"model": "@a", "parameters": {"scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}}]}),
        case("basic/linear", two("linear")),
        case("basic/slerp", two("slerp", base="@a", params={"t": 0.35})),
        case("basic/task_arithmetic", two("task_arithmetic", base="@c")),
        case("basic/breadcrumbs", two("breadcrumbs", base="@c")),
        case("basic/ties", two("ties", base="@c", params={"density": 0.3})),
        case("basic/sce", two("sce", base="@c", params={"select_topk": 0.5})),
        case("basic/ram", two("ram", base="@c")),
        # mergekit writes the method's float32 tensors but keeps config.json's dtype: bfloat16;
        # distmerge's config.json records the dtype the tensors have (docs/methods.md, 14)
        case("basic/ramplus_tl", two("ramplus_tl", base="@c", params={"r": 0.05, "alpha": 1.0}),
             config_differs=(("dtype", "bfloat16", "float32"),)),
        case("basic/multislerp", two("multislerp", base="@c")),
        case("basic/dare_ties", two("dare_ties", base="@c", params={"density": 0.66})),
        case("basic/model_stock", two("model_stock", "@b", "@c", base="@a")),
        case("basic/model_stock_filterwise", two("model_stock", "@b", "@c", base="@a",
                                                 params={"filter_wise": True})),
        case("basic/arcee_fusion", two("arcee_fusion", base="@a"), config_differs=(("dtype", "bfloat16", "float32"),)),
        case("basic/nearswap", two("nearswap", base="@a", params={"t": 0.0001})),
        case("basic/della", two("della", base="@c", params={"density": 0.66, "epsilon": 0.05, "lambda": 0.5})),
        case("basic/della_invalid_epsilon", two("della", base="@c",
                                                params={"density": 0.66, "epsilon": 1.35, "lambda": 0.5}),
             kind="error"),
        case("basic/karcher", two("karcher", base="@c", params={"max_iter": 5, "tol": 1e-5})),
        case("basic/granite_copy", {"merge_method": "passthrough", "models": [{"model": "@granite_a"}],
                                    "dtype": "bfloat16"}),
        case("basic/granite_linear", two("linear", "@granite_a", "@granite_b")),
        case("basic/granite_slerp", two("slerp", "@granite_a", "@granite_b", base="@granite_a",
                                        params={"t": 0.5})),
        case("basic/gpt2_copy", {"merge_method": "passthrough", "models": [{"model": "@gpt2_a"}],
                                 "dtype": "bfloat16"}),
        case("basic/gpt2_stack", {"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
            {"sources": [{"model": "@gpt2_a", "layer_range": [0, 2]}]}] * 2}),
        case("basic/nuslerp_zero_sum", two("nuslerp", base="@c", weights=(-0.5, 0.5),
                                           params={"nuslerp_row_wise": False, "nuslerp_flatten": False})),
    ]
    for base in (None, "@c"):
        for row_wise in (False, True):
            for flatten in (False, True):
                out.append(case(f"basic/nuslerp_base{int(base is not None)}_row{int(row_wise)}_flat{int(flatten)}",
                                two("nuslerp", base=base, params={"nuslerp_row_wise": row_wise,
                                                                  "nuslerp_flatten": flatten})))
    return out


DTYPE_METHODS: dict[str, dict[str, Any]] = {
    "linear": {},
    "task_arithmetic": {"base": "@c"},
    "ties": {"base": "@c", "params": {"density": 0.5}},
    "breadcrumbs": {"base": "@c", "params": {"density": 0.5, "gamma": 0.05}},
    "breadcrumbs_ties": {"base": "@c", "params": {"density": 0.5, "gamma": 0.05}},
    "dare_linear": {"base": "@c", "params": {"density": 0.5}},
    "della_linear": {"base": "@c", "params": {"density": 0.5, "epsilon": 0.1}},
    "slerp": {"base": "@a", "params": {"t": 0.3}},
    "model_stock": {"base": "@c"},
    "passthrough": {},
}

# The methods mergekit 0.1.5 added, in every dtype too (passthrough excluded: no math).
NEW_METHODS: dict[str, dict[str, Any]] = {
    "nuslerp": {"base": "@c"},
    "multislerp": {"base": "@c"},
    "karcher": {"base": "@c"},
    "nearswap": {"base": "@a", "params": {"t": 0.01}},
    "sce": {"base": "@c", "params": {"select_topk": 0.5}},
    "ram": {"base": "@c"},
    "ramplus_tl": {"base": "@c", "params": {"r": 0.05, "alpha": 1.0}},
    "arcee_fusion": {"base": "@a"},
}


def _dtypes() -> list[Case]:
    out = []
    for method, kw in {**DTYPE_METHODS, **NEW_METHODS}.items():
        for dtype in ("bfloat16", "float16", "float32"):
            if method == "passthrough":
                cfg = {"merge_method": "passthrough", "dtype": dtype,
                       "models": [{"model": "@a", "parameters": {"scale": 0.7}}]}
            else:
                cfg = two(method, dtype=dtype, **kw)
            nan_is = kw.get("base") if method == "multislerp" and dtype == "float16" else None
            out.append(case(f"own/{method}_{dtype}", cfg, nan_in_reference_is=nan_is))
        # inputs stored in bf16 / fp16, no dtype given: the math runs in the stored dtype
        for stored in ("bf16", "f16"):
            if method == "passthrough":
                continue
            kw2 = {**kw, "base": kw["base"] + "_" + stored} if "base" in kw else kw
            nan_is = kw2.get("base") if method == "multislerp" and stored == "f16" else None
            out.append(case(f"own/{method}_stored_{stored}",
                            two(method, f"@a_{stored}", f"@b_{stored}", dtype=None, **kw2), nan_in_reference_is=nan_is))
    # test_merge_dtypes.py: mixed checkpoint precisions, dtype / out_dtype
    # (the bf16 model is named base_model: without one mergekit copies config.json from a set
    # of the models, which one depending on the paths' string hashes)
    for dtype, out_dtype in ((None, None), ("bfloat16", "float32")):
        cfg = two("linear", "@a_bf16", "@b", dtype=dtype, weights=(0.5, 0.5), base="@a_bf16")
        if out_dtype:
            cfg["out_dtype"] = out_dtype
        # no dtype anywhere: float32 tensors (bf16 and float32 promoted), and distmerge's
        # config.json says so; mergekit's keeps the template's bfloat16 (docs/methods.md, 10)
        differs = (("dtype", "bfloat16", "float32"),) if dtype is None else ()
        out.append(case(f"dtypes/yaml_mixed_precisions_{dtype}_{out_dtype}", cfg, config_differs=differs))
    for method in ("linear", "task_arithmetic"):
        cfg = two(method, dtype="float32", base="@c" if method != "linear" else None)
        cfg["out_dtype"] = "bfloat16"
        out.append(case(f"dtypes/{method}_float32_out_bfloat16", cfg))
        cfg = two(method, dtype="bfloat16", base="@c" if method != "linear" else None)
        cfg["out_dtype"] = "float32"
        out.append(case(f"dtypes/{method}_bfloat16_out_float32", cfg))
    out.append(case("dtypes/passthrough_input_vs_output_cast", {
        "merge_method": "passthrough", "out_dtype": "bfloat16",
        "models": [{"model": "@a", "parameters": {"scale": 1000.0}}]}))
    return out


def _params() -> list[Case]:
    filt = [{"filter": "self_attn", "value": 0.7}, {"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.5}]
    return [
        case("params/gradient_weight", two("linear", weights=([0.2, 0.8], [0.8, 0.2]), dtype="float32")),
        case("params/gradient_three_points", two("task_arithmetic", base="@c",
                                                 weights=([0.0, 0.5, 1.0], 0.3), dtype="bfloat16")),
        case("params/filters", two("linear", weights=(filt, 0.5), dtype="float32")),
        case("params/filter_star", two("linear", weights=([{"filter": "*", "value": 0.25}, {"value": 0.9}], 0.5),
                                       dtype="float32")),
        case("params/fallback_first", two("linear", weights=([{"value": 0.9}, {"filter": "mlp", "value": 0.1}], 0.5),
                                          dtype="float32")),
        # a single conditional without a fallback leaves other tensors without a weight: refused
        case("params/filter_embed_only_is_refused", two("linear", weights=(
            {"filter": "embed", "value": [1e-5, 1e-3]}, 0.5), dtype="float32"), kind="error"),
        case("params/filter_embed_gradient", two("linear", weights=(
            [{"filter": "embed", "value": [1e-5, 1e-3]}, {"value": 0.5}], 0.5), dtype="float32")),
        case("params/filter_no_match_uses_default", {
            "merge_method": "ties", "base_model": "@c", "dtype": "float32",
            "models": [{"model": "@a", "parameters": {"weight": 1.0, "density": {"filter": "other", "value": 0.1}}},
                       {"model": "@b", "parameters": {"weight": 0.5}}]}),
        case("params/ignored_weight_on_slerp", {
            "merge_method": "slerp", "base_model": "@a", "parameters": {"t": [0.0, 0.5, 1.0]}, "dtype": "float32",
            "models": [{"model": "@a", "parameters": {"weight": 0.3}}, {"model": "@b", "parameters": {"weight": 0.7}}]}),
        case("params/ignored_density_on_task_arithmetic", two(
            "task_arithmetic", base="@c", dtype="float32",
            params={"density": 0.5})),
        case("params/global_weight", {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 0.5},
                                      "models": [{"model": "@a"}, {"model": "@b"}]}),
        case("params/lambda_normalize", two("task_arithmetic", base="@c", dtype="bfloat16",
                                            params={"lambda": 0.7, "normalize": True})),
        case("params/linear_no_normalize", two("linear", dtype="bfloat16", params={"normalize": False})),
        case("params/ties_rescale_int8_mask", two("ties", base="@c", dtype="bfloat16",
                                                  params={"density": 0.4, "rescale": True, "int8_mask": True})),
        case("params/linear_with_base", {"merge_method": "linear", "base_model": "@c", "dtype": "bfloat16",
                                         "models": [{"model": "@a", "parameters": {"weight": 0.5}},
                                                    {"model": "@b", "parameters": {"weight": 0.3}},
                                                    {"model": "@c", "parameters": {"weight": 0.2}}]}),
        case("params/three_experts_ties", {"merge_method": "ties", "base_model": "@c_bf16",
                                           "parameters": {"density": 0.3},
                                           "models": [{"model": f"@{m}_bf16", "parameters": {"weight": w}}
                                                      for m, w in (("a", 0.5), ("b", 0.3), ("c", 0.2))]}),
        case("params/three_experts_linear", {"merge_method": "linear", "dtype": "bfloat16",
                                             "models": [{"model": f"@{m}", "parameters": {"weight": w}}
                                                        for m, w in (("a", 0.5), ("b", 0.3), ("c", 0.2))]}),
        # mergekit reads each scalar in pydantic's lax mode for the parameter's type, before it tells
        # a gradient from labels (distmerge.methods.lax_scalars): quoted numbers, switches as words
        case("params/lax_quoted_gradient", two("task_arithmetic", base="@c", dtype="bfloat16",
                                               weights=(["0.0", "0.5", "1.0"], "0.3"),
                                               params={"normalize": "yes", "lambda": "0.7"})),
        case("params/lax_bool_as_number", two("slerp", base="@a", dtype="float32", params={"t": [True, False]})),
        case("params/lax_quoted_count", two("karcher", base="@c", params={"max_iter": "5", "tol": "1e-5"})),
        # an empty list sets nothing: the global weight applies to @a (mergekit's evaluate_setting gives None)
        case("params/empty_list_falls_through", {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 0.3},
                                                  "models": [{"model": "@a", "parameters": {"weight": []}},
                                                             {"model": "@b", "parameters": {"weight": 0.7}}]}),
        case("params/lax_fractional_count_is_refused", two("karcher", base="@c", params={"max_iter": 2.5}),
             kind="error"),
    ]


def _sparsify() -> list[Case]:
    """test_sparsify.py's edge cases, as configs."""
    return [
        case("sparsify/ties_tiny_density", two("ties", base="@c", dtype="float32", params={"density": 0.001})),
        case("sparsify/ties_bf16_tiny_density", two("ties", base="@c", params={"density": 0.001})),
        case("sparsify/breadcrumbs_gamma_zero", two("breadcrumbs", base="@c", dtype="float32",
                                                    params={"density": 0.2, "gamma": 0.0})),
        case("sparsify/breadcrumbs_overlap", two("breadcrumbs", base="@c",
                                                 params={"density": 0.9, "gamma": 0.2})),
        # fp32 L1 rescale: mergekit's norms are float32 sums in torch's order (methods.md, 5)
        case("sparsify/ties_rescale_float32", two("ties", base="@c", dtype="float32",
                                                  params={"density": 0.3, "rescale": True}), tensor_ulps=4.0),
        case("sparsify/dare_linear_no_rescale", two("dare_linear", base="@c", params={"density": 0.5,
                                                                                      "rescale": False})),
    ]


def _slices() -> list[Case]:
    return [
        case("slices/stack_two_models", {"merge_method": "passthrough", "dtype": "float32", "slices": [
            {"sources": [{"model": "@a", "layer_range": [0, 2]}]},
            {"sources": [{"model": "@b", "layer_range": [1, 2]}]}]}),
        case("slices/linear_per_slice_parameters", {"merge_method": "linear", "dtype": "bfloat16", "slices": [
            {"sources": [{"model": "@a", "layer_range": [0, 1], "parameters": {"weight": 0.3}},
                         {"model": "@b", "layer_range": [0, 1], "parameters": {"weight": 0.7}}]},
            {"sources": [{"model": "@a", "layer_range": [1, 2], "parameters": {"weight": 0.6}},
                         {"model": "@b", "layer_range": [1, 2], "parameters": {"weight": 0.4}}],
             "parameters": {"normalize": False}}]}),
        case("slices/ties_per_slice_base", {"merge_method": "ties", "dtype": "bfloat16",
                                            "parameters": {"density": 0.5, "weight": 0.5}, "slices": [
            {"base_model": "@c", "sources": [{"model": "@a", "layer_range": [0, 2]},
                                             {"model": "@b", "layer_range": [0, 2]},
                                             {"model": "@c", "layer_range": [0, 2]}]}]}),
        case("slices/slerp_gradient", {"merge_method": "slerp", "base_model": "@a", "dtype": "bfloat16",
                                       "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]},
                                                            {"value": 0.5}]}, "slices": [
            {"sources": [{"model": "@a", "layer_range": [0, 2]}, {"model": "@b", "layer_range": [0, 2]}]}]}),
        case("slices/tied_heads_linear", two("linear", "@a_tied", "@b_tied")),
        case("slices/tied_heads_ties", two("ties", "@a_tied", "@b_tied", base="@c_tied", params={"density": 0.5})),
        # mergekit keeps the tied base's tie_word_embeddings: true although it writes the merged
        # lm_head (transformers would then ignore it); distmerge says false (methods.md, 8). The
        # base is named: without one mergekit takes config.json from a set of the models, so the
        # template (and this field) would follow the interpreter's hash seed.
        case("slices/tied_with_untied", two("linear", "@a_tied", "@b", base="@a_tied"), kind="values",
             config_differs=(("tie_word_embeddings", True, False),)),
    ]


def _tokenizers() -> list[Case]:
    def cfg(models: list[str], method: str = "linear", **extra: Any) -> dict[str, Any]:
        c = {"merge_method": method, "base_model": models[0], "dtype": "bfloat16",
             "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models]}
        if method == "slerp":
            c["parameters"] = {"t": 0.5}
        return c | extra

    three = ["@tok_base", "@tok_padded", "@tok_chatml"]
    tok = {"tokenizer": True}
    return [
        case("tok/mismatched_vocabulary_requires_alignment", cfg(three), kind="error"),
        case("tok/source_base", cfg(three, tokenizer_source="base"), **tok),
        case("tok/source_union", cfg(three, tokenizer_source="union"), **tok),
        case("tok/source_model", cfg(three, tokenizer_source="@tok_chatml"), **tok),
        case("tok/task_arithmetic_base", cfg(["@tok_base", "@tok_chatml"], "task_arithmetic",
                                             tokenizer={"source": "base"}), **tok),
        case("tok/task_arithmetic_union", cfg(["@tok_base", "@tok_chatml"], "task_arithmetic",
                                              tokenizer={"source": "union"}), **tok),
        case("tok/slerp_union", cfg(["@tok_base", "@tok_chatml"], "slerp", tokenizer_source="union"), **tok),
        case("tok/force_token", cfg(["@tok_base", "@tok_chatml"], tokenizer={"source": "union", "tokens": {
            "_tok_10": {"source": "@tok_chatml", "force": True},
            "_tok_11": {"source": "@tok_base", "force": True}}}), **tok),
        case("tok/model_token_id", cfg(["@tok_base", "@tok_chatml"], tokenizer={"source": "base", "tokens": {
            "_tok_20": {"source": {"kind": "model_token", "model": "@tok_chatml", "token_id": 64}, "force": True},
            "_tok_21": {"source": {"kind": "model_token", "model": "@tok_base", "token": "<s>"}, "force": True}}}),
             **tok),
        case("tok/zero_embedding", cfg(["@tok_base", "@tok_chatml"], tokenizer={"source": "union", "tokens": {
            "<|im_start|>": {"source": {"kind": "zero"}}}}), **tok),
        case("tok/pad_to_multiple_of", cfg(["@tok_chatml"], tokenizer={"source": "base", "pad_to_multiple_of": 16}),
             **tok),
        *[case(f"tok/configured_special_{src}", cfg(["@tok_special"], tokenizer={
            "source": "@tok_special" if src == "model" else src,
            "tokens": {"<|existing_special|>": {"source": "@tok_special", "force": True}}}), **tok)
          for src in ("model", "base", "union")],
        case("chat/chatml", cfg(["@tok_base", "@tok_base_b"], chat_template="chatml"), **tok),
        case("chat/custom", cfg(["@tok_base", "@tok_base_b"], chat_template="{{messages[0]['content']}}"), **tok),
        case("chat/long_custom", cfg(["@tok_base", "@tok_base_b"], chat_template="x" * 300 + "{{ messages }}"),
             **tok),
        case("vocab/padding_rows_truncated", cfg(["@tok_base", "@tok_wide"], tokenizer_source="base"), **tok),
        case("vocab/padding_rows_union", cfg(["@tok_base", "@tok_wide"], tokenizer_source="union"), **tok),
        case("vocab/slerp_padding_rows", cfg(["@tok_base", "@tok_wide"], "slerp", tokenizer={"source": "base"}),
             **tok),
        case("own/tokenizer_copied_from_base", cfg(["@tok_base", "@tok_base_b"]), **tok),
    ]


SLICE_METHODS: dict[str, dict[str, Any]] = {**DTYPE_METHODS, **NEW_METHODS}


def _slice_products() -> list[Case]:
    """Slices x methods x dtypes: two output slices, each taking other layers of each model
    (a crossed layer map), the method's parameters per source, in bf16 and float32."""
    out = []
    for method, kw in SLICE_METHODS.items():
        if method == "passthrough":
            continue
        base = kw.get("base")
        for dtype in ("bfloat16", "float32"):
            slices = []
            for a_range, b_range in (([0, 1], [1, 2]), ([1, 2], [0, 1])):
                sources = [{"model": "@a", "layer_range": a_range, "parameters": {"weight": 0.6}},
                           {"model": "@b", "layer_range": b_range, "parameters": {"weight": 0.4}}]
                if base is not None and base not in ("@a", "@b"):
                    sources.append({"model": base, "layer_range": a_range})
                slices.append({"sources": sources})
            cfg: dict[str, Any] = {"merge_method": method, "dtype": dtype, "slices": slices}
            if base is not None:
                cfg["base_model"] = base
            if kw.get("params"):
                cfg["parameters"] = dict(kw["params"])
            out.append(case(f"slices/{method}_{dtype}", cfg, **KARCHER_CONVERGENCE.get((method, dtype), {})))
    # karcher with a tol no update reaches (1e-12: every iteration runs in both tools). Each of
    # the iterations rounds its float32 norm sums, whose order in torch's CPU reductions follows
    # the thread count: measured 2-4 ulp of the tensor's largest magnitude across CI runs.
    karcher = next(c for c in out if c.id == "slices/karcher_float32")
    out.append(case("slices/karcher_float32_every_iteration", {**karcher.config, "parameters": {"tol": 1e-12}},
                    tensor_ulps=6.0))
    return out


# karcher stops when an update is smaller than tol (1e-5); in float32 the update of this slice
# product lands next to it, so one float32 sum in another order stops one tool an iteration
# earlier: the difference is then the last update, ~1e-5 of the values (measured 100.5 ulps of
# the tensor's largest). With a tol of 1e-12 both run every iteration and agree as own/karcher_float32.
KARCHER_CONVERGENCE = {("karcher", "float32"): {"tensor_ulps": 128.0}}


def _lora() -> list[Case]:
    return [
        case("lora/linear_model_plus_adapter", two("linear", "@a+@lora_a", "@b", dtype="float32")),
        case("lora/ties_adapted_expert", two("ties", "@a+@lora_a", "@b", base="@c", dtype="float32",
                                             params={"density": 0.5})),
        case("lora/task_arithmetic_bf16", two("task_arithmetic", "@a_bf16+@lora_a_bf16", "@b_bf16",
                                              base="@c_bf16", dtype=None)),
    ]


def _many_models() -> list[Case]:
    """Five experts and a base: every sum over the models in torch's stacked order
    (docs/methods.md, the task-vector family's order of operations), bit for bit."""
    experts = [f"@odd_{n}" for n in "bcdef"]
    out = []
    for method, params, dtype in (("ties", {"weight": 0.4, "density": 0.7}, "float32"),
                                  ("task_arithmetic", {"weight": 0.3}, "float32"),
                                  ("ram", None, "float32")):
        models = [{"model": m} | ({"parameters": params} if params else {}) for m in experts]
        cfg = {"merge_method": method, "base_model": "@odd_a", "dtype": dtype, "models": models}
        out.append(case(f"own/{method}_five_experts_{dtype}", cfg, ulps=0))
    return out


CASES: list[Case] = [*_lora(), *_slice_products(), *_basic(), *_vlm(), *_dtypes(), *_params(), *_sparsify(), *_slices(),
                     *_tokenizers(), *_many_models()]
assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
