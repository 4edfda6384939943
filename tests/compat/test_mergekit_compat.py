"""distmerge against mergekit 0.1.5, case by case (tests/compat/cases.py), on the same inputs.

Every output tensor is compared (names, shapes, dtypes, values within the case's ulps), and
so are config.json's relevant fields and, where the case has one, the tokenizer. mergekit's
outputs are cached (distmerge.testing.mergekit_reference), so a warm run costs distmerge's
merges only.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from distmerge.testing.compare import (
    compare_tensors,
    config_fields,
    load_folder,
    tokenizer_summary,
    ulp_distance,
)
from tests.compat.cases import CASES, Case, compute_dtype, two
from tests.compat.conftest import RESULTS, PicoModels, resolve

pytestmark = pytest.mark.mergekit


def _renders_alike(theirs: str | None, ours: str | None) -> bool:
    """Two chat templates give the same prompts (distmerge ships its own named templates, which
    render like mergekit's: tests/vocab/test_chat_templates.py), on conversations of each shape."""
    from tests.vocab.chat_render import outcome

    if theirs is None or ours is None:
        return theirs is ours
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": " two  "}],
        [{"role": "assistant", "content": "out of order"}],
    ]
    return all(outcome("transformers", ours, c, g) == outcome("transformers", theirs, c, g)
               for c in conversations for g in (False, True))


def _run_distmerge(config: dict[str, Any], out: Path) -> None:
    from distmerge import run_merge

    path = out.parent / f"{out.name}.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    run_merge(path, out, progress=False)


def _check_random(case: Case, config: dict[str, Any], ref_state: dict, ours: dict) -> list[str]:
    """Random-mask methods: what does not depend on the draws."""
    problems = []
    base = load_folder(Path(config["base_model"]))
    for name, r in ref_state.items():
        o = ours.get(name)
        if o is None or o.shape != r.shape or o.dtype != r.dtype or name not in base:
            continue
        b = base[name].to(r.dtype)
        if not torch.isfinite(o.float()).all():
            problems.append(f"{name}: non-finite values")
        if r.numel() < 512:
            continue
        kept_r = float((r != b).float().mean())
        kept_o = float((o != b).float().mean())
        if abs(kept_r - kept_o) > 0.1:
            problems.append(f"{name}: changed share {kept_o:.3f}, mergekit {kept_r:.3f}")
        l1_r = float((r.double() - b.double()).abs().sum())
        l1_o = float((o.double() - b.double()).abs().sum())
        if l1_r > 0 and abs(l1_o - l1_r) > 0.25 * l1_r:
            problems.append(f"{name}: L1 of the change {l1_o:.4g}, mergekit {l1_r:.4g}")
    return problems


MAGNITUDE_METHODS = {"ties", "breadcrumbs", "breadcrumbs_ties"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _magnitude_inputs(config: dict[str, Any]) -> list[tuple[dict[str, Any], str, str, int, int, int, int]]:
    """Each (parameters, model, base, model's first layer, its end, base's first layer, first
    output layer) whose delta a magnitude method ranks; ``models:`` is one slice of every layer."""
    glob = config.get("parameters") or {}
    if "slices" not in config:
        return [({**glob, **(m.get("parameters") or {})}, m["model"], config["base_model"], 0, 1 << 30, 0, 0)
                for m in config.get("models", []) if m["model"] != config.get("base_model")]
    found, offset = [], 0
    for sl in config["slices"]:
        base = sl.get("base_model") or config.get("base_model")
        sources = sl["sources"]
        base_start = next(((s.get("layer_range") or (0, 0))[0] for s in sources if s["model"] == base), 0)
        for src in sources:
            start, end = src.get("layer_range") or (0, 1 << 30)
            if base is not None and src["model"] != base:
                p = {**glob, **(sl.get("parameters") or {}), **(src.get("parameters") or {})}
                found.append((p, src["model"], base, start, end, base_start, offset))
        start, end = sources[0].get("layer_range") or (0, 0)
        offset += end - start
    return found


def _tie_positions(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Per output tensor, the elements whose |delta| ties with another at a magnitude threshold
    of some model (TIES' k-th largest, breadcrumbs' two). Which of those tied elements mergekit
    keeps is whatever its argsort returns (unspecified, not reproducible); distmerge keeps the
    lowest flat indices (docs/methods.md). Only these positions may differ beyond the ulps."""
    if config["merge_method"] not in MAGNITUDE_METHODS:
        return {}
    out: dict[str, torch.Tensor] = {}
    for p, model, base_path, start, end, base_start, offset in _magnitude_inputs(config):
        density, gamma = float(p.get("density", 1.0)), float(p.get("gamma", 0.01))
        if density >= 1:
            continue
        base, state = load_folder(Path(base_path)), load_folder(Path(model))
        for name, x in state.items():
            layer = _LAYER.search(name)
            if layer is not None and not start <= int(layer.group(1)) < end:
                continue
            out_name, b = name, base[name] if layer is None else None
            if layer is not None:  # the same depth in the slice: output and base layer indices
                depth = int(layer.group(1)) - start
                out_name = _LAYER.sub(f".layers.{offset + depth}.", name, count=1)
                b = base[_LAYER.sub(f".layers.{base_start + depth}.", name, count=1)]
            assert b is not None
            if not b.is_floating_point():
                continue
            cd = _DTYPES.get(config.get("dtype") or "", b.dtype)
            a = (x.to(cd) - b.to(cd)).abs().float().reshape(-1)
            n = a.numel()
            v = torch.sort(a, descending=True).values
            ranks = [max(1, int(density * n))]
            if config["merge_method"] != "ties":
                target, n_top = int(density * n), int(gamma * n)
                n_top += min(0, n - target - n_top)
                ranks = [r for r in (n_top, n_top + target) if 0 < r < n]
            tied = torch.zeros(n, dtype=torch.bool)
            for r in ranks:
                at = a == v[r - 1]
                if int(at.sum()) > 1:
                    tied |= at
            previous = out.get(out_name)
            out[out_name] = (tied if previous is None else previous | tied.reshape(previous.shape)).reshape(b.shape)
    return out


def _replace_reference_nan(case: Case, ref_state: dict[str, torch.Tensor], ours: dict[str, torch.Tensor],
                           models: PicoModels) -> list[str]:
    """Where mergekit wrote NaN and the case names the model distmerge must equal there, check
    that and put our values in the reference (the rest of the tensor is compared as usual). A
    NaN anywhere else stays, and fails the comparison."""
    if case.nan_in_reference_is is None:
        return []
    expected = load_folder(Path(resolve(case.nan_in_reference_is, models)))
    problems, replaced = [], 0
    for name, r in ref_state.items():
        bad = ~torch.isfinite(r) if r.is_floating_point() else None
        if bad is None or not bool(bad.any()) or name not in ours:
            continue
        want = expected[name].to(r.dtype)
        if not torch.equal(ours[name][bad], want[bad]):
            problems.append(f"{name}: where mergekit writes NaN, distmerge does not give {case.nan_in_reference_is}'s values")
        ref_state[name] = torch.where(bad, ours[name], r)
        replaced += 1
    if not replaced:
        problems.append("mergekit wrote no NaN: the case's nan_in_reference_is is out of date")
    return problems


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_mergekit(case: Case, references: dict[str, Path | RuntimeError], pico_models: PicoModels,
                          ray_local: None, tmp_path: Path) -> None:
    config = resolve(case.config, pico_models)
    reference = references[case.id]
    ref_error = str(reference) if isinstance(reference, RuntimeError) else None
    out = tmp_path / "ours"
    started = time.perf_counter()
    if case.kind == "error":
        assert ref_error is not None, "mergekit accepts this config; the case expects a refusal"
        with pytest.raises(Exception):  # noqa: B017 - any refusal, as long as it refuses
            _run_distmerge(config, out)
        return
    assert ref_error is None and isinstance(reference, Path), f"mergekit 0.1.5 failed on this case: {ref_error}"
    _run_distmerge(config, out)
    ours_seconds = time.perf_counter() - started

    ref_state = {case.reference_name(k): v for k, v in load_folder(reference).items()}
    ours = load_folder(out)
    nan_problems = _replace_reference_nan(case, ref_state, ours, pico_models)
    cmp = compare_tensors(ref_state, ours)
    RESULTS[case.id] = {"method": case.config["merge_method"], "kind": case.kind,
                        "compute_dtype": compute_dtype(case.config), "max_ulp": cmp.max_ulp,
                        "max_tensor_ulp": cmp.max_scaled_ulp,
                        "identical_share": cmp.identical_share,
                        "ours_seconds": ours_seconds,
                        "dtypes": sorted({str(t.dtype) for t in ref_state.values()})}
    problems = cmp.structure_problems() + nan_problems
    if case.kind == "random":
        problems += _check_random(case, config, ref_state, ours)
    elif case.tensor_ulps is not None and cmp.max_ulp > case.ulps:
        if cmp.max_scaled_ulp > case.tensor_ulps:
            problems.append(f"values differ by up to {cmp.max_scaled_ulp:.2f} ulp of the tensor's largest magnitude "
                            f"(allowed {case.tensor_ulps}; elementwise up to {cmp.max_ulp} ulp)")
    elif cmp.max_ulp > case.ulps:
        ties = _tie_positions(config)
        beyond = {}
        for name in cmp.stats:
            d = ulp_distance(ref_state[name], ours[name]) if ref_state[name].is_floating_point() else None
            if d is None:
                continue
            bad = d > case.ulps
            if name in ties:
                bad &= ~ties[name]
            if bool(bad.any()):
                beyond[name] = (int(bad.sum()), int(d[bad].max()))
        RESULTS[case.id]["tie_excused"] = bool(ties) and not beyond
        if beyond:
            worst = sorted(beyond.items(), key=lambda kv: -kv[1][1])[:3]
            problems.append(f"values differ by up to {cmp.max_ulp} ulp (allowed {case.ulps}; "
                            f"{cmp.identical_share:.2%} bit-identical): "
                            + "; ".join(f"{k}: {n} elements, up to {u} ulp" for k, (n, u) in worst))
    ref_cfg, our_cfg = config_fields(reference), config_fields(out)
    for key, theirs, mine in case.config_differs:  # a documented, deliberate difference
        if (ref_cfg.pop(key, None), our_cfg.pop(key, None)) != (theirs, mine):
            problems.append(f"config.json {key}: expected mergekit {theirs!r} and ours {mine!r}")
    if ref_cfg != our_cfg:
        diff = {k: (ref_cfg.get(k), our_cfg.get(k)) for k in set(ref_cfg) | set(our_cfg)
                if ref_cfg.get(k) != our_cfg.get(k)}
        problems.append(f"config.json differs (mergekit, ours): {diff}")
    if case.tokenizer:
        ref_tok, our_tok = tokenizer_summary(reference), tokenizer_summary(out)
        if ref_tok is not None and our_tok is None:
            problems.append("mergekit wrote a tokenizer, distmerge did not")
        elif ref_tok != our_tok:
            assert ref_tok is not None and our_tok is not None
            parts = [k for k in ref_tok if ref_tok[k] != our_tok[k] and not (
                k == "chat_template" and _renders_alike(ref_tok[k], our_tok[k]))]
            if parts:
                problems.append(f"tokenizer differs in {parts}")
    RESULTS[case.id]["passed"] = not problems
    assert not problems, "\n".join(problems)


def test_mergekit_drops_hub_layout_language_model(mergekit_exe: Path, pico_models: PicoModels) -> None:
    """Why the LLaVA cases compare against a merge of the transformers-layout copies: mergekit
    0.1.5 merges a Hub-layout LLaVA (``language_model.model.*``) into vision tower and projector
    only. distmerge writes every input tensor (the cases check each against the reference)."""
    from distmerge.testing.mergekit_reference import run_reference

    config = resolve(two("linear", "@llava_a", "@llava_b"), pico_models)
    names = set(load_folder(run_reference(config, {n: pico_models[n] for n in ("llava_a", "llava_b")})))
    assert names and all(n.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for n in names)
    assert set(load_folder(pico_models["llava_a"])) > {n[len("model."):] for n in names}
