"""torch's intra-op thread count for the length of a block, then the count it had before.

Why one place: torch's thread count is process-wide, and three places need a fixed count for a
while: the local executor's worker threads (one each, as in a 1-CPU Ray worker), the stage run
in this process (every CPU, as the embedded Ray gives a lone stage actor) and the probe that
finds torch's one-thread sum order. Each must restore the caller's count even when its block
raises, or a later merge in the same process (a notebook, the tests) would run with another
count and, for reductions, other bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads (at least 1), restoring the previous count after."""
    import torch  # here, not at import: the local executor's module loads before torch is needed

    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, int(count)))
    try:
        yield
    finally:
        torch.set_num_threads(saved)
