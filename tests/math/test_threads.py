"""single_threaded: one thread inside, the previous count after, also on errors; thread_map:
the items in order, each on a worker with torch on one thread, errors where they belong."""

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


def test_thread_map_keeps_the_items_order_and_runs_torch_on_one_thread():
    import threading
    import time

    from fedsrd_cli.math.threads import thread_map

    seen: list[tuple[int, int, str]] = []

    def work(item: int) -> int:
        time.sleep(0.01 * (item % 3))  # later items often finish first
        seen.append((item, torch.get_num_threads(), threading.current_thread().name))
        return item * item

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert list(thread_map(work, range(10))) == [i * i for i in range(10)]
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    assert sorted(item for item, _, _ in seen) == list(range(10))
    assert {threads for _, threads, _ in seen} == {1}
    assert threading.current_thread().name not in {name for _, _, name in seen}


def test_thread_map_with_one_worker_is_map_on_the_callers_thread():
    import threading

    from fedsrd_cli.math.threads import thread_map

    caller = threading.current_thread().name
    names = list(thread_map(lambda _: threading.current_thread().name, range(3), workers=1))
    assert names == [caller] * 3


def test_thread_map_raises_where_the_failed_result_belongs_and_bounds_what_is_in_flight():
    import threading

    from fedsrd_cli.math.threads import thread_map

    started: list[int] = []
    started_while_first_waited: list[int] = []

    def work(item: int) -> int:
        started.append(item)
        if item == 0:  # the first result is late: only 2 x workers items may start meanwhile
            threading.Event().wait(0.3)
            started_while_first_waited.append(len(started))
        if item == 5:
            raise ValueError("item 5")
        return item

    got = []
    with pytest.raises(ValueError, match="item 5"):
        for value in thread_map(work, range(100), workers=2):
            got.append(value)
    assert got == [0, 1, 2, 3, 4]
    assert len(started_while_first_waited) == 1 and started_while_first_waited[0] <= 4
    assert len(started) <= 5 + 4  # nothing far past the failure was started
