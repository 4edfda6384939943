"""VocabularyRows without mergekit: against a whole-tensor port of mergekit 0.1.5's
PermutedVocabulary.execute (kept literal here), on random vocabularies and configurations,
for every kind of row range; and the streaming padding mean against torch.mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distmerge.errors import ConfigError
from distmerge.methods.stack_sums import spread_values
from distmerge.vocab import TokenEmbeddingConfig, vocabulary_rows
from distmerge.vocab.cascade import StreamingMean
from distmerge.vocab.config import ModelTokenEmbedding, ZeroEmbedding


def whole_reference(vocab, perms, models, base, tokens, pad, tensors, original_vocabs):
    """mergekit's PermutedVocabulary.execute, on whole tensors (models are paths)."""
    n = len(vocab)
    size = (n // pad + 1) * pad if pad and n % pad else n
    dtype = tensors[0].dtype
    p = {m: {t: int(perms[i][t]) for t in range(n)} for i, m in enumerate(models)}
    cfgs = dict(tokens or {})
    avg = set()
    for tok, t in vocab.items():
        if tok in cfgs:
            continue
        has = [p[m][t] >= 0 for m in models]
        if sum(has) == 1:
            cfgs[tok] = TokenEmbeddingConfig(source=models[has.index(True)])
        elif sum(has) == 0:
            cfgs[tok] = TokenEmbeddingConfig(source=ZeroEmbedding(kind="zero"))
        elif base in models and p[base][t] >= 0:
            cfgs[tok] = TokenEmbeddingConfig(source=base)
        else:
            avg.add(tok)
    x = dict(zip(models, tensors, strict=True))
    defaults = {}
    for tok, t in vocab.items():
        cfg = cfgs.get(tok)
        if not (cfg and cfg.force) and all(p[m][t] >= 0 for m in models):
            continue
        if tok in avg:
            e, c = torch.zeros(tensors[0].shape[1:], dtype=dtype), 0
            for m in models:
                if p[m][t] >= 0:
                    e = e + x[m][p[m][t]]
                    c += 1
            e /= c
        elif isinstance(cfg.source, ZeroEmbedding):
            e = tensors[0].new_zeros(tensors[0].shape[1:])
        elif isinstance(cfg.source, ModelTokenEmbedding):
            src = cfg.source
            row = src.token_id if src.token_id is not None else original_vocabs[models.index(src.model)][src.token]
            e = x[src.model][row]
        else:
            e = x[cfg.source][p[cfg.source][t]]
        defaults[tok] = e
    out = []
    for m in models:
        new = torch.zeros((size, *tensors[0].shape[1:]), dtype=dtype)
        for tok, t in vocab.items():
            force = tok in (tokens or {}) and tokens[tok].force
            if p[m][t] >= 0 and not force:
                new[t] = x[m][p[m][t]]
            elif tok in defaults:
                new[t] = defaults[tok]
        if size > n:
            new[n:] = torch.mean(new[:n], dim=0)
        out.append(new)
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def random_case(seed: int, dtype: torch.dtype, row_shape: tuple[int, ...]):
    rng = np.random.default_rng(seed)
    num = int(rng.integers(1, 5))
    models = [f"/m{i}" for i in range(num)]
    n = int(rng.integers(5, 90))
    vocab = {f"t{i}": i for i in range(n)}
    rows = [int(rng.integers(n, n + 8)) for _ in models]
    perms = []
    for r in rows:
        p = rng.permutation(r)[:n].astype(np.int64)
        p[rng.random(n) < rng.uniform(0, 0.6)] = -1
        perms.append(p)
    base = models[int(rng.integers(0, num))] if rng.random() < 0.7 else None
    tokens = {}
    for t in rng.choice(n, size=min(n, int(rng.integers(0, 6))), replace=False):
        m = int(rng.integers(0, num))
        kind = rng.integers(0, 3)
        if kind == 0:
            src = ZeroEmbedding(kind="zero")
        elif kind == 1:
            src = ModelTokenEmbedding(kind="model_token", model=models[m], token_id=int(rng.integers(0, rows[m])))
        else:
            if perms[m][t] < 0:
                continue
            src = models[m]
        tokens[f"t{t}"] = TokenEmbeddingConfig(source=src, force=bool(rng.random() < 0.5))
    pad = int(rng.integers(2, 40)) if rng.random() < 0.6 else None
    g = torch.Generator().manual_seed(seed)
    tensors = [spread_values((r, *row_shape), g).to(dtype) for r in rows]
    return vocab, perms, models, base, tokens, pad, tensors


@pytest.mark.parametrize("seed", range(40))
def test_every_range_equals_the_whole_tensor_port(seed):
    dtype = [torch.float32, torch.bfloat16, torch.float64, torch.float16][seed % 4]
    row_shape = [(40,), (), (2, 5), (64,), (33,)][seed % 5]
    vocab, perms, models, base, tokens, pad, tensors = random_case(seed, dtype, row_shape)
    vocabs = [{f"t{i}": i for i in range(t.shape[0])} for t in tensors]
    want = whole_reference(vocab, perms, models, base, tokens, pad, tensors, vocabs)
    rows = vocabulary_rows(vocab, perms, models, base_model=base, tokens=tokens, pad_to_multiple_of=pad,
                           input_rows=[t.shape[0] for t in tensors], original_vocabs=vocabs,
                           row_shape=row_shape, dtype=dtype)

    def read(m, idx):
        return tensors[m][torch.from_numpy(np.asarray(idx))]

    n = rows.out_rows
    for m in range(len(models)):
        pad_mean = rows.padding_mean(m, read, chunk_rows=7) if n > rows.vocab_len else None
        for r0, r1 in [(0, n), *((r, r + 1) for r in range(n)), (1, n - 1), (n // 3, 2 * n // 3)]:
            got = rows.assemble(m, r0, r1, read, pad_mean)
            assert torch.equal(bits(got), bits(want[m][r0:r1])), (m, r0, r1)
            assert got.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 255, 256, 257, 4097, 4100])
def test_streaming_mean_is_torch_mean(dtype, n):
    g = torch.Generator().manual_seed(n)
    for shape in ((1,), (7,), (31,), (32,), (40,), (63,), (64,), (100,), (4, 24), ()):
        x = spread_values((n, *shape), g).to(dtype)
        acc = StreamingMean(n, shape, dtype)
        for s in range(0, n, 37):
            acc.add(x[s:s + 37])
        assert torch.equal(acc.mean(), torch.mean(x, dim=0)), (shape, n)


def test_needed_rows_are_exactly_what_assembly_reads():
    vocab, perms, models, base, tokens, pad, tensors = random_case(3, torch.float32, (8,))
    vocabs = [{f"t{i}": i for i in range(t.shape[0])} for t in tensors]
    rows = vocabulary_rows(vocab, perms, models, base_model=base, tokens=tokens, pad_to_multiple_of=None,
                           input_rows=[t.shape[0] for t in tensors], original_vocabs=vocabs,
                           row_shape=(8,), dtype=torch.float32)
    for r0, r1 in [(0, rows.vocab_len), (2, 9), (5, 6)]:
        read = {m: set() for m in range(len(models))}

        def record(m, idx, read=read):
            read[m].update(np.asarray(idx).tolist())
            return tensors[m][torch.from_numpy(np.asarray(idx))]

        for m in range(len(models)):
            rows.assemble(m, r0, r1, record)
        for m in range(len(models)):
            assert read[m] == set(rows.needed_rows(m, r0, r1).tolist())


def test_configuration_errors_name_the_token():
    vocab = {"a": 0, "b": 1, "c": 2}
    perms = [np.array([0, 1, -1]), np.array([0, -1, 1])]
    kw = dict(base_model="/m0", pad_to_multiple_of=None, input_rows=[3, 3],
              original_vocabs=[{"a": 0}, {"a": 0}], row_shape=(2,), dtype=torch.float32)
    cases = {
        "b": ({"b": TokenEmbeddingConfig(force=True)}, "no source given"),
        "c": ({"c": TokenEmbeddingConfig(source="/m0")}, "is not in model /m0"),
        "a": ({"a": TokenEmbeddingConfig(source="/elsewhere", force=True)}, "weight is missing"),
    }
    for token, (tokens, match) in cases.items():
        with pytest.raises(ConfigError, match=rf"tokenizer\.tokens\['{token}'\]: .*{match}"):
            vocabulary_rows(vocab, perms, ["/m0", "/m1"], tokens=tokens, **kw)
    with pytest.raises(ConfigError, match="out of range"):
        vocabulary_rows(vocab, perms, ["/m0", "/m1"], tokens={"c": TokenEmbeddingConfig(
            source=ModelTokenEmbedding(kind="model_token", model="/m1", token_id=3))}, **kw)
    with pytest.raises(ConfigError, match="not in the vocabulary of model /m1"):
        vocabulary_rows(vocab, perms, ["/m0", "/m1"], tokens={"c": TokenEmbeddingConfig(
            source=ModelTokenEmbedding(kind="model_token", model="/m1", token="zz"))}, **kw)
    with pytest.raises(ConfigError, match="fewer than its tokenizer's ids need"):
        vocabulary_rows(vocab, perms, ["/m0", "/m1"], tokens=None, **{**kw, "input_rows": [3, 1]})
