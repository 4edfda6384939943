"""distmerge.vocab against mergekit 0.1.5 itself: the same cases through mergekit's
BuildTokenizer / PermutedVocabulary / _set_chat_template (its venv, one subprocess for all
cases) and through ours; vocabularies, added tokens, permutations, tokenizer files and every
aligned tensor, row range by row range, must be bit-identical. The one exception: a named chat
template (``chat_template: chatml``) is distmerge's own text, so its ``chat_template.jinja`` is
compared by what it renders (test_chat_templates.py covers the five templates fully)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distmerge.errors import ConfigError
from distmerge.vocab import (
    TokenizerConfig,
    build_tokenizer,
    resolve_chat_template,
    tensor_rows,
    tokenizer_files,
)
from distmerge.vocab.chat_template import named_templates
from tests.vocab.chat_render import assert_same_rendering
from tests.vocab.conftest import mergekit_missing, run_mergekit, tensor_specs

CHATML = "chatml"
LITERAL = "{% for m in messages %}{{ m['content'] }}{% endfor %} (a literal template)"
RENDER_CHECKS = [[], [{"role": "user", "content": " Hi "}],
                 [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"},
                  {"role": "assistant", "content": "ünïcödé "}]]

# name -> (models by folder key, base key, source ('union', 'base' or a folder key), tokens,
#          pad_to_multiple_of, chat_template)
CASES = {
    "union": (["base", "padded", "chatml"], "base", "union", None, None, CHATML),
    "base": (["base", "padded", "chatml"], "base", "base", None, None, LITERAL),
    "model": (["base", "padded", "chatml"], "base", "chatml", None, None, "auto"),
    "union_swapped": (["base", "swapped", "chatml"], "base", "union", None, None, None),
    "no_base": (["chatml", "swapped", "special"], None, "union", None, None, None),
    "tokens": (["base", "chatml", "special"], "base", "union", {
        "_tok_10": {"source": "@chatml", "force": True},
        "_tok_11": {"source": "@base", "force": True},
        "<|zero|>": {"source": {"kind": "zero"}},
        "<|from_id|>": {"source": {"kind": "model_token", "model": "@chatml", "token_id": 64}},
        "<|from_tok|>": {"source": {"kind": "model_token", "model": "@base", "token": "<s>"}, "force": True},
        "_tok_12": {"source": {"kind": "model_token", "model": "@special", "token": "<|existing_special|>"},
                    "force": True},
        "<|existing_special|>": {"source": "@special", "force": True},
        "_tok_13": {"source": {"kind": "zero"}, "force": True},
        "_tok_14": {"source": "@chatml"},  # held by all, not forced: the config is not used
    }, None, None),
    "pad_single": (["chatml"], "chatml", "base", None, 16, None),
    "pad_union": (["base", "chatml", "swapped"], "base", "union", {
        "<|zero|>": {"source": {"kind": "zero"}}}, 32, None),
    "foreign_source": (["base", "chatml"], "base", "other_tok", None, 8, None),
    "no_tokenizer": (["base", "notok"], "base", "union", None, None, None),
    "model_tokens_base": (["base", "chatml"], "base", "base", {
        "_tok_20": {"source": {"kind": "model_token", "model": "@chatml", "token_id": 64}, "force": True},
        "_tok_21": {"source": {"kind": "model_token", "model": "@base", "token": "<s>"}, "force": True},
    }, 7, None),
}
# Configurations mergekit refuses when it aligns a tensor (the exception it raises) and
# distmerge refuses with a ConfigError naming the token, when the recipes are built.
ERRORS = {
    "err_no_source": ((["base", "chatml"], "base", "union", {"<|new|>": {"force": True}}),
                      "NotImplementedError"),
    "err_missing_token": ((["base", "chatml"], "base", "union", {
        "<|new|>": {"source": {"kind": "model_token", "model": "@base", "token": "<|nope|>"}}}), "AssertionError"),
    "err_token_id_range": ((["base", "chatml"], "base", "union", {
        "<|new|>": {"source": {"kind": "model_token", "model": "@base", "token_id": 64}}}), "AssertionError"),
    "err_model_lacks": ((["base", "chatml"], "base", "union", {
        "<|im_start|>": {"source": "@base", "force": True}}), "AssertionError"),
    "err_not_merged": ((["base", "chatml"], "base", "union", {"<|new|>": {"source": "@special"}}), "ValueError"),
}
# Where distmerge intentionally differs: a tokenizer source whose tokens sit past its model's
# vocab_size (padded's <UNUSED_i>): mergekit leaves them out of the permutation and then fails
# with a KeyError; distmerge treats them as absent from that model (here: from every model: zero).
PADDED_SOURCE = (["base", "padded", "chatml"], "base", "padded", None, None, None)
SIZES = {"base": 64, "chatml": 66, "padded": 64, "special": 65, "swapped": 65, "notok": 64}


def _resolve(value, folders):
    if isinstance(value, str) and value.startswith("@"):
        return folders[value[1:]]
    if isinstance(value, dict):
        return {k: _resolve(v, folders) for k, v in value.items()}
    return value


@pytest.fixture(scope="session")
def reference(folders, tmp_path_factory):
    reason = mergekit_missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("vocab-cases")
    cases = {}
    for seed, (name, (models, base, source, tokens, pad, template)) in enumerate(
            {**CASES, "padded_source": PADDED_SOURCE,
             **{k: (*v[0], None, None) for k, v in ERRORS.items()}}.items()):
        paths = [folders[m] for m in models]
        cases[name] = {
            "models": paths, "base_model": folders[base] if base else None,
            "source": source if source in ("union", "base") else folders[source],
            "tokens": _resolve(tokens, folders), "pad_to_multiple_of": pad, "chat_template": template,
            "tensors": tensor_specs(root, name, paths, {folders[k]: v for k, v in SIZES.items()}, seed),
        }
    out = root / "mergekit"
    run_mergekit(cases, out)
    return cases, out


def ours(case):
    settings = TokenizerConfig(source=case["source"], tokens=case["tokens"],
                               pad_to_multiple_of=case["pad_to_multiple_of"])
    info = build_tokenizer(case["models"], case["base_model"], settings.source, list(settings.tokens or {}))
    return settings, info


def added(tok):
    return {str(i): {"content": t.content, "single_word": t.single_word, "lstrip": t.lstrip,
                     "rstrip": t.rstrip, "normalized": t.normalized, "special": t.special}
            for i, t in tok.added_tokens_decoder.items()}


def mk_info(out: Path, name: str) -> dict:
    info = json.loads((out / name / "info.json").read_text())
    assert "crash" not in info, info["crash"]
    return info


@pytest.mark.parametrize("name", sorted(CASES))
def test_tokenizer_matches_mergekit(reference, name):
    cases, out = reference
    case, mk = cases[name], mk_info(out, name)
    settings, info = ours(case)
    assert "error" not in mk, mk
    assert info.vocab == mk["vocab"]
    assert added(info.tokenizer) == mk["added"]
    assert info.tokenizer.all_special_tokens == mk["special"]
    for i in range(len(case["models"])):
        theirs = [-1 if v is None else v for v in mk["permutations"][str(i)]]
        assert info.permutations[i].tolist() == theirs, f"models[{i}]"
        if str(i) in mk["original_vocabs"]:
            assert info.original_vocabs[i] == mk["original_vocabs"][str(i)]
    template = resolve_chat_template(case["chat_template"], case["models"])
    files = tokenizer_files(info.tokenizer, template)
    mk_dir = out / name / "tokenizer"
    assert sorted(files) == sorted(p.name for p in mk_dir.iterdir())
    for fname, data in files.items():
        theirs = (mk_dir / fname).read_bytes()
        if fname == "chat_template.jinja" and case["chat_template"] in named_templates():
            # distmerge's named templates are its own text: compared by what they render
            assert data.decode() == template
            for messages in RENDER_CHECKS:
                for generation in (False, True):
                    assert_same_rendering(template, theirs.decode(), messages, generation)
            continue
        assert data == theirs, fname


def _ranges(n: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(n)
    ranges = [(0, n), (0, 1), (n - 1, n), (n // 2, n // 2 + 1), (3, 10), (1, n - 1)]
    ranges += [(r, r + 1) for r in range(n)]
    cuts = sorted(set(rng.integers(0, n, 6).tolist()) | {0, n})
    ranges += list(zip(cuts, cuts[1:], strict=False))
    for _ in range(12):
        a, b = sorted(rng.integers(0, n + 1, 2).tolist())
        if a < b:
            ranges.append((a, b))
    return ranges


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("name", sorted(CASES))
def test_aligned_rows_match_mergekit(reference, name):
    cases, out = reference
    case, mk = cases[name], mk_info(out, name)
    settings, info = ours(case)
    for spec in case["tensors"]:
        tname = spec["name"]
        data = load_file(spec["file"])
        order = [case["models"].index(m) for m in spec["models"]]
        inputs = [data[f"m{i}"] for i in range(len(order))]
        expected_error = mk["tensor_errors"].get(tname)
        rows = tensor_rows(info, settings, case["base_model"], order, [t.shape for t in inputs],
                           inputs[0].dtype, tname)
        requested: list[tuple[int, np.ndarray]] = []

        def read_rows(m, idx, inputs=inputs, requested=requested):
            requested.append((m, np.asarray(idx).copy()))
            return inputs[m][torch.from_numpy(np.asarray(idx, dtype=np.int64))]

        if expected_error:
            raise AssertionError(f"mergekit refused {tname}: {expected_error}")
        theirs = load_file(str(out / name / f"{tname}.safetensors"))
        for m in range(len(order)):
            want = theirs[f"m{m}"]
            assert want.shape[0] == rows.out_rows
            pad = rows.padding_mean(m, read_rows, chunk_rows=5) if rows.out_rows > rows.vocab_len else None
            for r0, r1 in _ranges(rows.out_rows):
                requested.clear()
                got = rows.assemble(m, r0, r1, read_rows, pad_mean=pad)
                assert got.dtype == want.dtype and got.shape == want[r0:r1].shape
                assert torch.equal(_bits(got), _bits(want[r0:r1])), (tname, m, r0, r1)
                for src, idx in requested:  # only the rows needed_rows announced were read
                    assert np.isin(idx, rows.needed_rows(src, r0, min(r1, rows.vocab_len))).all()


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_refused_like_mergekit(reference, name):
    cases, out = reference
    case, mk = cases[name], mk_info(out, name)
    assert "error" not in mk
    assert mk["tensor_errors"]["embed"][0] == ERRORS[name][1], mk["tensor_errors"]
    settings, info = ours(case)
    spec = case["tensors"][0]
    shapes = [t.shape for t in load_file(spec["file"]).values()]
    with pytest.raises(ConfigError, match=r"tokenizer\.tokens\["):
        tensor_rows(info, settings, case["base_model"], [0, 1], shapes, torch.float32, "embed")


def test_tokens_past_vocab_size_are_absent_where_mergekit_fails(reference):
    cases, out = reference
    case, mk = cases["padded_source"], mk_info(out, "padded_source")
    assert mk["tensor_errors"]["embed"][0] == "KeyError"
    settings, info = ours(case)
    assert info.vocab == mk["vocab"]
    unused = [info.vocab[f"<UNUSED_{i}>"] for i in range(4)]
    assert [mk["permutations"]["1"][t] for t in unused] == [None] * 4  # no entry: the KeyError
    assert all(info.permutations[m][t] == -1 for m in range(3) for t in unused)
    data = load_file(case["tensors"][0]["file"])
    inputs = [data[f"m{i}"] for i in range(3)]
    rows = tensor_rows(info, settings, case["base_model"], [0, 1, 2], [t.shape for t in inputs],
                       torch.float32, "embed")
    got = rows.assemble(1, 0, rows.out_rows, lambda m, idx: inputs[m][torch.from_numpy(idx)])
    assert torch.count_nonzero(got[unused]) == 0
    assert torch.equal(got[:64], inputs[1])
