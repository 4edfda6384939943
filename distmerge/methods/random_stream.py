"""Counter-based random draws keyed by (seed, tensor, model) and indexed by element position.

DARE and DELLA keep each delta element with some probability. For the merge to be identical
whatever the shard size, worker count, scheduling order or retry, element ``i`` of a tensor
must always get the same draw, so the draws come from counter-based generators whose 128-bit
key is derived from (seed, tensor name, model index) and whose counter is the position: a
shard starting at element ``s`` jumps straight to counter ``s // 4`` (each counter value yields
four outputs) and skips ``s % 4``.

- The keep stream, Philox4x32-10's 32-bit outputs (:mod:`distmerge.methods.philox`, where
  the counter layout is given): DARE keeps an element iff its output is below
  ``floor(p * 2**32)``, DELLA iff ``output * 2**-32`` is below the element's keep probability
  (a float32). A keep decision needs no more bits, and this generator is about twice as fast
  as the 64-bit one.
- arcee_fusion's sample positions come from the 64-bit outputs of Philox4x64-10, exactly
  ``numpy.random.Philox(key=...)``'s (the tests compare them at many offsets).

The kernels (:mod:`distmerge.methods.philox`) run many counters side by side in SIMD lanes,
because numpy's generator is several times slower and needs an 8-byte buffer per element,
where a DARE mask needs one comparison and one byte; :func:`_philox_block` here is the
one-block formulation of Philox4x64, kept as its reference.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from distmerge.methods.philox import (
    LANES,
    KeepStream,
    fill_keep,
    fill_raw,
    fill_raw32,
    philox_scratch,
)
from distmerge.numba_cache import jit

OUTPUTS_PER_COUNTER = 4  # Philox4x64: one counter increment = four 64-bit outputs
_UNIT = 2.0**-53
_UNIT32 = 2.0**-32


def stream_key(seed: int, tensor: str, model: int) -> np.ndarray:
    """128-bit Philox key (two uint64 words) for one (seed, tensor, model) stream.

    blake2b over an unambiguous encoding: different seeds, tensors or models give unrelated
    streams, and the key does not depend on Python's hash randomization.
    """
    digest = hashlib.blake2b(f"distmerge\x00{seed}\x00{tensor}\x00{model}".encode(), digest_size=16).digest()
    return np.frombuffer(digest, dtype="<u8").copy()


@intrinsic
def _mulhi64(typingctx, a, b):  # noqa: ANN001, ANN202 - a numba intrinsic
    """High 64 bits of the 128-bit product of two uint64 (one ``mul`` instruction)."""
    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        wide = ir.IntType(128)
        product = builder.mul(builder.zext(args[0], wide), builder.zext(args[1], wide))
        return builder.trunc(builder.lshr(product, ir.Constant(wide, 64)), ir.IntType(64))
    return types.uint64(types.uint64, types.uint64), codegen


_M0, _M1 = np.uint64(0xD2E7470EE14C6C93), np.uint64(0xCA5A826395121157)  # Philox4x64 multipliers
_W0, _W1 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBB67AE8584CAA73B)  # Weyl key increments


@jit
def _philox_block(counter, key0, key1):  # noqa: ANN001, ANN202
    """Philox4x64-10 of the counter ``(counter, 0, 0, 0)``: the four outputs numpy gives."""
    x0, x1, x2, x3 = counter, np.uint64(0), np.uint64(0), np.uint64(0)
    k0, k1 = key0, key1
    for r in range(10):
        if r > 0:
            k0 = k0 + _W0
            k1 = k1 + _W1
        hi0, lo0 = _mulhi64(_M0, x0), _M0 * x0
        hi1, lo1 = _mulhi64(_M1, x2), _M1 * x2
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
    return x0, x1, x2, x3


@jit
def _draws(key0, key1, start, threshold, compare, raw, mask):  # noqa: ANN001, ANN202
    """Outputs ``start ..`` of the stream into ``raw``, or ``output < threshold`` into ``mask``.

    numpy's Philox increments its counter before each block, so element ``i`` is output
    ``i % 4`` of the block at counter ``i // 4 + 1`` (:mod:`distmerge.methods.philox`).
    """
    state = np.empty((OUTPUTS_PER_COUNTER, LANES), dtype=np.uint64)
    if compare:
        fill_keep(key0, key1, start, threshold, mask, state)
    else:
        fill_raw(key0, key1, start, raw, state)


def _positioned_key(seed: int, tensor: str, model: int, start: int, count: int) -> np.ndarray:
    """The stream's key, once the range ``start .. start + count`` is known to fit its counter."""
    if start < 0 or start + count > OUTPUTS_PER_COUNTER * (2**64 - 1):
        raise ValueError(f"stream positions {start}..{start + count} outside the 64-bit counter")
    return stream_key(seed, tensor, model)


def raw_draws(seed: int, tensor: str, model: int, start: int, count: int) -> np.ndarray:
    """The 64-bit outputs ``start .. start + count - 1`` of the stream, as uint64."""
    key = _positioned_key(seed, tensor, model, start, count)
    out = np.empty(count, dtype=np.uint64)
    fill_raw(key[0], key[1], start, out, philox_scratch())
    return out


def uniforms(seed: int, tensor: str, model: int, start: int, count: int) -> np.ndarray:
    """Uniform float64 draws in [0, 1) from the top 53 bits of each 64-bit output."""
    return (raw_draws(seed, tensor, model, start, count) >> np.uint64(11)).astype(np.float64) * _UNIT


def keep_threshold(p: float) -> int:
    """``floor(p * 2**32)``, ``2**32`` for ``p >= 1``: a 32-bit draw below it keeps its element."""
    return min(int(p * 2.0**32), 2**32)


def keep_stream(seed: int, tensor: str, model: int, start: int, count: int, p: float) -> KeepStream:
    """:func:`bernoulli_mask`'s rule for elements ``start .. start + count``, for a
    kernel that draws the mask block by block where it uses it."""
    key = _positioned_key(seed, tensor, model, start, count)
    return KeepStream(int(key[0]), int(key[1]), start, keep_threshold(p))


def bernoulli_mask(seed: int, tensor: str, model: int, start: int, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """Keep-mask with probability ``p`` per element: Philox4x32 output ``< floor(p * 2**32)``.

    An integer comparison on the raw output is exact and cheaper than making floats; the
    keep probability is ``floor(p * 2**32) / 2**32``, within 2**-32 of ``p`` (exactly 1 for
    ``p >= 1``).
    """
    count = 1
    for d in shape:
        count *= d
    if p >= 1.0:
        return torch.ones(shape, dtype=torch.bool)
    return torch.from_numpy(keep_flags(keep_stream(seed, tensor, model, start, count, p), count)).reshape(shape)


def keep_flags(stream: KeepStream, count: int) -> np.ndarray:
    """The keep flags of a stream's ``count`` elements as one bool array."""
    keep = np.empty(count, dtype=np.bool_)
    fill_keep(np.uint64(stream.key0), np.uint64(stream.key1), np.uint64(stream.start), np.uint64(stream.threshold),
              keep, philox_scratch())
    return keep


def keep_uniforms(seed: int, tensor: str, model: int, start: int, count: int) -> np.ndarray:
    """The keep stream's (Philox4x32's) outputs ``start ..`` as uniform float64 draws in [0, 1):
    ``output * 2**-32``, exact. DELLA keeps an element iff its draw is below its probability."""
    key = _positioned_key(seed, tensor, model, start, count)
    out = np.empty(count, dtype=np.uint32)
    fill_raw32(key[0], key[1], start, out, philox_scratch())
    return out.astype(np.float64) * _UNIT32


def keep_uniform_tensor(seed: int, tensor: str, model: int, start: int, shape: tuple[int, ...]) -> torch.Tensor:
    """:func:`keep_uniforms` for a block of elements, shaped like the block."""
    count = 1
    for d in shape:
        count *= d
    return torch.from_numpy(keep_uniforms(seed, tensor, model, start, count)).reshape(shape)
