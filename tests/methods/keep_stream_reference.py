"""DARE's keep stream written from its definition, for the tests: Philox4x32-10 (Random123)
keyed by blake2b(seed, tensor, model), checked against the generator's published known answers.

Element ``j`` of a stream with 128-bit key ``(K0, K1)`` (two little-endian uint64 words of the
digest) is output ``j % 4`` of the block whose counter words are the low and high 32 bits of
``j // 4`` and of ``K1``, under the key words (low, high 32 bits of ``K0``); the element is kept
iff that output is below ``floor(density * 2**32)``. Nothing here comes from the package.
"""

from __future__ import annotations

import hashlib

import numpy as np

WORD = 0xFFFFFFFF
M0, M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # its key increments

# Random123's kat_vectors, "philox4x32 10": counter words, key words, the four outputs
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((WORD, WORD, WORD, WORD), (WORD, WORD), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox4x32_block(counter: tuple[int, ...], key: tuple[int, int]) -> tuple[int, ...]:
    """One Philox4x32-10 block as the Random123 paper defines it, in Python integers."""
    x0, x1, x2, x3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = M0 * x0, M1 * x2
        x0, x1, x2, x3 = (p1 >> 32) ^ x1 ^ k0, p1 & WORD, (p0 >> 32) ^ x3 ^ k1, p0 & WORD
        k0, k1 = (k0 + W0) & WORD, (k1 + W1) & WORD
    return x0, x1, x2, x3


def stream_words(seed: int, tensor: str, model: int) -> tuple[int, int]:
    """The stream's 128-bit key as two integers (K0, K1)."""
    digest = hashlib.blake2b(f"distmerge\x00{seed}\x00{tensor}\x00{model}".encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def keep_outputs(k0: int, k1: int, start: int, count: int) -> np.ndarray:
    """The stream's 32-bit outputs ``start .. start + count - 1`` (as uint64), every block's ten
    rounds at once in numpy (the same arithmetic as :func:`philox4x32_block`)."""
    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    word = np.uint64(WORD)
    n = np.arange(start // 4, (start + count - 1) // 4 + 1, dtype=np.uint64)
    x = [n & word, n >> np.uint64(32), np.full_like(n, k1 & WORD), np.full_like(n, k1 >> 32)]
    key = [k0 & WORD, k0 >> 32]
    for _ in range(10):
        p0, p1 = np.uint64(M0) * x[0], np.uint64(M1) * x[2]
        x = [(p1 >> np.uint64(32)) ^ x[1] ^ np.uint64(key[0]), p1 & word,
             (p0 >> np.uint64(32)) ^ x[3] ^ np.uint64(key[1]), p0 & word]
        key = [(key[0] + W0) & WORD, (key[1] + W1) & WORD]
    flat = np.stack(x, axis=1).reshape(-1)  # element 4 * block + j
    return flat[start % 4:start % 4 + count]


def dare_keep(seed: int, tensor: str, model: int, start: int, count: int, density: float) -> np.ndarray:
    """DARE's keep flags of elements ``start ..`` of one (seed, tensor, model) stream."""
    k0, k1 = stream_words(seed, tensor, model)
    return keep_outputs(k0, k1, start, count) < np.uint64(min(int(density * 2.0**32), 2**32))


def della_uniforms(seed: int, tensor: str, model: int, start: int, count: int) -> np.ndarray:
    """DELLA's uniform draws: the same stream's outputs times 2**-32 (float64, exact); an element
    is kept iff its draw is below its keep probability."""
    k0, k1 = stream_words(seed, tensor, model)
    return keep_outputs(k0, k1, start, count).astype(np.float64) * 2.0**-32
