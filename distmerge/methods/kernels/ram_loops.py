"""RAM's merge and RAM+'s counts as fused loops, one pass over the rows each.

Why: the torch formulation (mergekit 0.1.5's expressions, :mod:`distmerge.methods.ram`) stacks
the task vectors and makes a dozen whole-chunk temporaries (masks, counts, products, a
division by the counts, the sum over the models); per core that cost RAM ten times a linear
merge. Here every element's steps run where it is read, each rounded as torch rounds it.

The steps, per element (``_r``: rounding to the compute dtype D; ``eps`` is ``epsilon``
rounded to D, as torch compares a D tensor with a Python number):

    tv_e = _r(x_e - b);  nz_e = |tv_e| > eps;  c = sum nz_e
    z_e = tv_e * nz_e  (exact, a signed zero where dropped)
    s_e = _r(z_e [c == 1] + _r(z_e [c > 1] / max(c, 1)))      (ram)
    s_e = z_e [c == 1] lambda_e + _r(z_e [c > 1] / max(c, 1))  (ramplus_tl: float32 lambda
          promotes the sum, which is not rounded to D)
    out = _r(b + _r(0 + s_0 + s_1 + ...))   (torch's sum over the models: one rounding;
          ramplus_tl: neither rounding; from five models torch adds the tensor's last
          elements in another order, :mod:`.stack_order`)
    counts (ramplus_tl's round): shared_e += nz_e and c > 1;  unique_e += nz_e and c == 1
"""

from __future__ import annotations

import numpy as np

from distmerge.methods.kernels.rounding import _jit, _r, _value
from distmerge.methods.kernels.stack_order import reordered_from, stack_column

BLOCK = 512  # elements per block: every scratch row of a block together within a 32 KB L1 cache


@_jit
def _task_vectors(b, xs, s, z, mode, eps, tv, count):  # noqa: ANN001, ANN202
    """Elements ``s .. s + z``: each model's task vector into ``tv[e]``, how many exceed ``eps``."""
    zero = tv.dtype.type(0.0)
    one = tv.dtype.type(1.0)
    bs = b[s:s + z]
    for i in range(z):
        count[i] = zero
    for e in range(len(xs)):
        x = xs[e][s:s + z]
        t = tv[e]
        for i in range(z):
            t[i] = _r(_value(x, i) - _value(bs, i), mode)
        for i in range(z):
            count[i] += one if abs(t[i]) > eps else zero


@_jit
def ram_counts(b, xs, mode, eps, shared, unique):  # noqa: ANN001, ANN202
    """ramplus_tl's round: per model, its nonzero elements shared with another model and unique
    to it, added into ``shared`` and ``unique`` (int64). Returns how many task vector elements
    are NaN or Inf (not below +Inf in magnitude): 0 proves the rows finite."""
    n = b.size
    k = len(xs)
    tv = np.empty((k, BLOCK), dtype=eps.dtype)
    count = np.empty(BLOCK, dtype=eps.dtype)
    big = eps.dtype.type(np.inf)
    one = eps.dtype.type(1.0)
    nonfinite = 0
    for s in range(0, n, BLOCK):
        z = min(BLOCK, n - s)
        _task_vectors(b, xs, s, z, mode, eps[0], tv, count)
        for e in range(k):
            t = tv[e]
            sh = 0
            un = 0
            bad = 0
            for i in range(z):
                nz = abs(t[i]) > eps[0]
                sh += nz & (count[i] > one)
                un += nz & (count[i] == one)
                bad += not (abs(t[i]) < big)
            shared[e] += sh
            unique[e] += un
            nonfinite += bad
    return nonfinite


@_jit
def ram_merge(b, xs, mode, eps, lambdas, promoted, tail, out):  # noqa: ANN001, ANN202
    """The merged rows into ``out``: ram (``promoted`` False, ``lambdas`` ignored) or ramplus_tl
    (``promoted``: ``lambdas`` per model, the float32 lambda's values, and no rounding to D
    after the division); ``tail``: where the tensor's tail starts, relative to ``b[0]``."""
    n = b.size
    k = len(xs)
    tv = np.empty((k, BLOCK), dtype=out.dtype)
    count = np.empty(BLOCK, dtype=out.dtype)
    acc = np.empty(BLOCK, dtype=out.dtype)
    terms = np.empty(k, dtype=out.dtype)
    zero = out.dtype.type(0.0)
    one = out.dtype.type(1.0)
    e0 = eps[0]
    for s in range(0, n, BLOCK):
        z = min(BLOCK, n - s)
        _task_vectors(b, xs, s, z, mode, e0, tv, count)
        for i in range(z):
            acc[i] = zero
        for e in range(k):
            t = tv[e]
            lam = lambdas[e]
            if promoted:
                for i in range(z):
                    c = count[i]
                    v = t[i] * (one if abs(t[i]) > e0 else zero)
                    shared = _r(v * (one if c > one else zero) / (c if c > one else one), mode)
                    acc[i] += v * (one if c == one else zero) * lam + shared
            else:
                for i in range(z):
                    c = count[i]
                    v = t[i] * (one if abs(t[i]) > e0 else zero)
                    shared = _r(v * (one if c > one else zero) / (c if c > one else one), mode)
                    acc[i] += _r(v * (one if c == one else zero) + shared, mode)
        for i in range(reordered_from(k, tail, s, z), z):
            c = count[i]
            for e in range(k):
                v = tv[e, i] * (one if abs(tv[e, i]) > e0 else zero)
                shared = _r(v * (one if c > one else zero) / (c if c > one else one), mode)
                if promoted:
                    terms[e] = v * (one if c == one else zero) * lambdas[e] + shared
                else:
                    terms[e] = _r(v * (one if c == one else zero) + shared, mode)
            acc[i] = stack_column(terms, k, s + i >= tail)
        o = out[s:s + z]
        bs = b[s:s + z]
        if promoted:
            for i in range(z):
                o[i] = _value(bs, i) + acc[i]
        else:
            for i in range(z):
                o[i] = _r(_value(bs, i) + _r(acc[i], mode), mode)
