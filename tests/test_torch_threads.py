"""torch_threads sets torch's process-wide thread count for a block and always restores it."""

from __future__ import annotations

import pytest
import torch

from distmerge.torch_threads import torch_threads


def test_the_count_holds_inside_and_the_callers_returns_even_after_an_error():
    saved = torch.get_num_threads()
    other = 3 if saved != 3 else 2
    with torch_threads(other):
        assert torch.get_num_threads() == other
        with torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == saved
    with pytest.raises(ValueError, match="inside"), torch_threads(1):
        assert torch.get_num_threads() == 1
        raise ValueError("inside")
    assert torch.get_num_threads() == saved


def test_a_count_below_one_means_one_thread():
    saved = torch.get_num_threads()
    with torch_threads(0):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == saved
