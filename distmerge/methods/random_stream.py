"""Counter-based random draws keyed by (seed, tensor, model) and indexed by element position.

DARE and DELLA keep each delta element with some probability. For the merge to be identical
whatever the shard size, worker count, scheduling order or retry, element ``i`` of a tensor
must always get the same draw: numpy's Philox4x64 is a counter-based generator, so the draw
of element ``i`` is the ``i``-th 64-bit output of the stream whose 128-bit key is derived from
(seed, tensor name, model index), and a shard starting at element ``s`` jumps straight to
counter ``s // 4`` (each counter value yields four 64-bit outputs) and skips ``s % 4``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

OUTPUTS_PER_COUNTER = 4  # Philox4x64: one counter increment = four 64-bit outputs
_UNIT = 2.0**-53


def stream_key(seed: int, tensor: str, model: int) -> np.ndarray:
    """128-bit Philox key (two uint64 words) for one (seed, tensor, model) stream.

    blake2b over an unambiguous encoding: different seeds, tensors or models give unrelated
    streams, and the key does not depend on Python's hash randomization.
    """
    digest = hashlib.blake2b(f"distmerge\x00{seed}\x00{tensor}\x00{model}".encode(), digest_size=16).digest()
    return np.frombuffer(digest, dtype="<u8").copy()


def raw_draws(seed: int, tensor: str, model: int, start: int, count: int) -> np.ndarray:
    """The 64-bit outputs ``start .. start + count - 1`` of the stream, as uint64."""
    counter = start // OUTPUTS_PER_COUNTER
    skip = start % OUTPUTS_PER_COUNTER
    gen = np.random.Philox(key=stream_key(seed, tensor, model),
                           counter=np.array([counter & (2**64 - 1), counter >> 64, 0, 0], dtype=np.uint64))
    return gen.random_raw(skip + count)[skip:]


def uniforms(seed: int, tensor: str, model: int, start: int, count: int) -> np.ndarray:
    """Uniform float64 draws in [0, 1) from the top 53 bits of each 64-bit output."""
    return (raw_draws(seed, tensor, model, start, count) >> np.uint64(11)).astype(np.float64) * _UNIT


def bernoulli_mask(seed: int, tensor: str, model: int, start: int, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """Keep-mask with probability ``p`` per element: ``raw < floor(p * 2**64)``.

    An integer comparison on the raw output is exact and cheaper than making floats; the
    keep probability is ``floor(p * 2**64) / 2**64``, within 2**-64 of ``p``.
    """
    count = 1
    for d in shape:
        count *= d
    if p >= 1.0:
        return torch.ones(shape, dtype=torch.bool)
    threshold = np.uint64(min(int(p * 2.0**64), 2**64 - 1))
    keep = raw_draws(seed, tensor, model, start, count) < threshold
    return torch.from_numpy(keep).reshape(shape)


def uniform_tensor(seed: int, tensor: str, model: int, start: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform float64 draws for a block of elements, shaped like the block."""
    count = 1
    for d in shape:
        count *= d
    return torch.from_numpy(uniforms(seed, tensor, model, start, count)).reshape(shape)
