"""single_threaded: one thread inside, the previous count after, also on errors."""

from __future__ import annotations

import pytest
import torch

from fedsrd_cli.math.threads import single_threaded


def test_single_threaded_sets_one_thread_and_restores_the_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with single_threaded():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError), single_threaded():
            raise ValueError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
