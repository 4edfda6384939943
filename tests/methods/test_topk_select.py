"""``kernels.PackedMagnitudes.top`` finds the k-th largest magnitude key and picks, among the
elements tied at it, exactly those ``torch.topk(largest=True)`` picks on CPU: in both of torch's
branches (partial sort and nth_element), on arrays whose values repeat, with NaNs and
infinities, at the edges of k; and its count of nonzero magnitudes is ``count_nonzero``'s."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distmerge.methods.kernels import topk_select
from distmerge.methods.kernels.topk_select import PackedMagnitudes
from distmerge.methods.selection import magnitude_keys


def torch_tied(v: torch.Tensor, k: int, threshold: int) -> np.ndarray:
    """mergekit's choice: torch.topk (sorted, as mergekit calls it), then the tied ones."""
    idx = torch.topk(v, k, largest=True).indices
    return torch.sort(idx[magnitude_keys(v[idx]) == threshold]).values.numpy()


def kth_key(v: torch.Tensor, k: int) -> int:
    """The magnitude key at the k-th largest (NaNs rank above everything, as in topk)."""
    return int(magnitude_keys(torch.topk(v, k).values[-1:])[0])


def chosen_ties(values, k: int, threshold: int) -> np.ndarray:
    """The port's choice, checked against what it must also give: the threshold, the nonzero
    count, and None exactly when every tied element is among the k (expanded to all of them)."""
    packed = PackedMagnitudes(values)
    joined = np.concatenate([np.asarray(v, dtype=np.float32).reshape(-1) for v in
                             ([values] if isinstance(values, np.ndarray) else values)])
    keys = joined.view(np.uint32) & 0x7FFFFFFF
    assert packed.nonzero == int(np.count_nonzero(keys))
    got, tied = packed.top(k)
    assert got == threshold, (got, threshold)
    every = np.flatnonzero(keys == threshold)
    if tied is None:
        assert int((keys > threshold).sum()) + every.size == k  # nothing tied left out
        return every
    assert tied.size < every.size
    return tied


def tie_heavy(g: torch.Generator, n: int, levels: int, nan: float = 0.0, inf: float = 0.0) -> torch.Tensor:
    v = torch.randint(0, levels, (n,), generator=g).float() / 8
    v[torch.rand(n, generator=g) < nan] = float("nan")
    v[torch.rand(n, generator=g) < inf] = float("inf")
    return v


def test_random_tie_heavy_arrays_both_branches():
    g = torch.Generator().manual_seed(1)
    branches = {"partial": 0, "nth": 0}
    tied_total = 0
    for trial in range(800):
        n = int(torch.randint(1, 2500, (1,), generator=g))
        v = tie_heavy(g, n, int(torch.randint(1, 30, (1,), generator=g)),
                      nan=0.05 * (trial % 5 == 0), inf=0.05 * (trial % 7 == 0))
        k = int(torch.randint(1, n + 1, (1,), generator=g)) if trial % 2 else max(1, n // 97)
        branches["partial" if k * 64 <= n else "nth"] += 1
        threshold = kth_key(v, k)
        got = chosen_ties(v.numpy(), k, threshold)
        assert np.array_equal(got, torch_tied(v, k, threshold)), (trial, n, k)
        tied_total += got.size
    assert min(branches.values()) > 100 and tied_total > 10000


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 64, 127, 128, 129, 4096, 100_003])
def test_edges_of_k(n):
    g = torch.Generator().manual_seed(n)
    v = tie_heavy(g, n, 5, nan=0.01)
    for k in sorted({1, 2, 3, n // 64, n // 64 + 1, n // 2, n - 1, n} - {0}):
        if k > n:
            continue
        threshold = kth_key(v, k)
        assert np.array_equal(chosen_ties(v.numpy(), k, threshold), torch_tied(v, k, threshold)), (n, k)


def test_large_array_nth_element_branch():
    """Deep partitions (2^20 elements, half chosen, 40 distinct values)."""
    g = torch.Generator().manual_seed(3)
    v = (torch.randint(0, 40, (1 << 20,), generator=g).float() / 64) ** 2
    k = (1 << 19) + 12345
    threshold = kth_key(v, k)
    got = chosen_ties(v.numpy(), k, threshold)
    assert got.size > 1000 and np.array_equal(got, torch_tied(v, k, threshold))


def test_pieces_choose_as_the_joined_array():
    """SCE hands its chunks' variances as pieces, packed where they lie: the choice is the one
    of the joined array (and torch's), NaN thresholds included, for any cut into pieces."""
    g = torch.Generator().manual_seed(11)
    nan_thresholds = 0
    for trial in range(300):
        n = int(torch.randint(1, 3000, (1,), generator=g))
        v = tie_heavy(g, n, int(torch.randint(1, 20, (1,), generator=g)), nan=0.2 * (trial % 3 == 0))
        k = int(torch.randint(1, n + 1, (1,), generator=g)) if trial % 2 else max(1, n // 97)
        threshold = kth_key(v, k)
        nan_thresholds += threshold > 0x7F800000
        cuts = sorted(set(torch.randint(0, n + 1, (int(torch.randint(0, 6, (1,), generator=g)),), generator=g).tolist()))
        pieces = [p.numpy() for p in torch.tensor_split(v, cuts)]  # empty pieces too
        got = chosen_ties(pieces, k, threshold)
        assert np.array_equal(got, chosen_ties(v.numpy(), k, threshold)), (trial, n, k, cuts)
        assert np.array_equal(got, torch_tied(v, k, threshold)), (trial, n, k, cuts)
    assert nan_thresholds > 5


def scalar_partition(q: list[int], first: int, last: int, pivot: int) -> int:
    """libstdc++'s ``__unguarded_partition``, transcribed: keys in the high 32 bits, ``a`` goes
    before ``b`` when its key is larger; permutes ``q`` in place, returns the cut."""
    p = q[pivot] >> 32
    while True:
        while q[first] >> 32 > p:
            first += 1
        last -= 1
        while p > q[last] >> 32:
            last -= 1
        if not first < last:
            return first
        q[first], q[last] = q[last], q[first]
        first += 1


def partition_inputs(g: torch.Generator):
    """Key arrays (introselect partitions 4 or more) that stop the block phase at every point:
    sizes around multiples of the block, runs of equal keys as long as a block, sorted and
    reversed keys, one key, few keys."""
    block = topk_select.PARTITION_BLOCK
    sizes = [4, 5, 255, 256, 257, 511, 512, 513, 767, 768, 769, 1023, 2 * block + 3, 5000, 20011]
    sizes += torch.randint(4, 4000, (30,), generator=g).tolist()
    for n in sizes:
        yield torch.randint(0, 1 << 20, (n,), generator=g)  # nearly distinct
        yield torch.randint(0, 3, (n,), generator=g)
        yield torch.randint(0, 40, (n,), generator=g)
        yield torch.zeros(n, dtype=torch.int64)
        yield torch.arange(n)
        yield torch.arange(n).flip(0)
        yield torch.arange(n) // block  # runs a block long
        yield (torch.arange(n) % (block + 1)) * (torch.arange(n) % 2)  # sawtooth over zeros


def test_block_partition_makes_the_scalar_swaps():
    """Each partition, as introselect calls it (median of three moved to the front), leaves the
    whole array and the cut exactly as libstdc++'s scalar loop does."""
    g = torch.Generator().manual_seed(5)
    lefts = np.empty(topk_select.PARTITION_BLOCK, dtype=np.int64)
    rights = np.empty_like(lefts)
    cases = 0
    for keys in partition_inputs(g):
        n = keys.numel()
        q = [(int(k) << 32) | i for i, k in enumerate(keys.tolist())]
        candidates = sorted([1, n // 2, n - 1], key=lambda i: q[i] >> 32)
        median = candidates[1]
        q[0], q[median] = q[median], q[0]
        packed = np.array(q, dtype=np.uint64)
        cut = topk_select._partition(packed, 1, n, 0, lefts, rights)
        want = scalar_partition(q, 1, n, 0)
        assert cut == want and packed.tolist() == q, (n, keys[:8].tolist())
        cases += 1
    assert cases > 300


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_the_depth_limit_fallback_still_selects_the_k_largest(depth):
    """Past its depth limit introselect finishes with a heap selection (torch's path on
    adversarial input, which random arrays do not reach): the first k are still the k largest."""
    g = torch.Generator().manual_seed(depth)
    v = tie_heavy(g, 5000, 50)
    bits = v.numpy().view(np.uint32)
    q = np.empty(v.numel(), dtype=np.uint64)
    topk_select._pack(bits, q, 0)
    k = 1700
    topk_select._introselect(q, k - 1, 0, q.size, depth)
    chosen = v[torch.from_numpy((q[:k] & np.uint64(0xFFFFFFFF)).astype(np.int64))]
    assert torch.equal(torch.sort(chosen).values, torch.sort(torch.topk(v, k).values).values)


def test_refuses_an_empty_choice():
    with pytest.raises(ValueError, match="topk of 0"):
        PackedMagnitudes(np.ones(3, dtype=np.float32)).top(0)


def test_a_nan_threshold_is_the_kth_largest_bit_pattern():
    """NaNs tie in torch's comparator but not as bit patterns: when the k-th largest is a NaN,
    the threshold is the k-th largest bit pattern (as the radix selection of larger tensors
    finds it); its ties are split where more than k keys reach it in bit order (as that
    selection counts), and then the kept ones are those of the chosen with exactly those bits."""
    g = torch.Generator().manual_seed(9)
    splits = whole = 0
    for trial in range(200):
        n = int(torch.randint(8, 3000, (1,), generator=g))
        bits = torch.randint(0x7F800001, 0x7F800040, (n,), generator=g, dtype=torch.int64)  # NaN payloads
        v = bits.to(torch.int32).view(torch.float32).clone()
        finite = torch.rand(n, generator=g) < 0.3
        v[finite] = torch.randint(0, 5, (int(finite.sum()),), generator=g).float()
        k = int(torch.randint(1, int((~finite).sum()) + 1, (1,), generator=g))
        keys = v.view(torch.int32).numpy() & 0x7FFFFFFF
        want = int(np.sort(keys)[::-1][k - 1])
        got, tied = PackedMagnitudes(v.numpy()).top(k)
        assert got == want, trial
        chosen = torch.topk(v, k, largest=True, sorted=False).indices.numpy()
        expected = np.sort(chosen[keys[chosen] == want])
        reaching = int(np.count_nonzero(keys >= want))
        if tied is None:
            assert reaching == k, trial
            whole += 1
        else:
            assert reaching > k and np.array_equal(tied, expected), trial
            splits += 1
    assert splits > 50 and whole > 5


def test_the_port_agrees_with_this_torch_and_sce_falls_back_where_not(monkeypatch):
    """The probe finds libstdc++'s selection in this torch; where a torch chooses otherwise
    (another C++ library), SCE's tie split runs torch.topk itself, with the same result here."""
    from tests.methods.test_methods_catalogue import merge_sharded, params_for, reductions

    assert topk_select.agrees_with_torch()
    g = torch.Generator().manual_seed(7)
    base = torch.zeros(41, 13)
    xs = [torch.randint(-2, 3, (41, 13), generator=g).float() for _ in range(2)]
    params = params_for("sce", 2, {"select_topk": 0.37})
    merged = []
    for agrees in (True, False):
        monkeypatch.setattr(topk_select, "agrees_with_torch", lambda agrees=agrees: agrees)
        reduced = reductions("sce", base, xs, params, chunk_rows=5)
        assert reduced.tie_kept is not None and reduced.tie_kept.numel() > 0
        merged.append(merge_sharded("sce", base, xs, params, reduced, 41))
    assert torch.equal(merged[0].view(torch.int32), merged[1].view(torch.int32))
