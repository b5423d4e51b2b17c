"""How a learned prefetch list becomes prefetch tasks (`machines/lazymount._tasks`): one range
request and one decode per run of a layer's chunks, whatever order the machine read them in."""

from __future__ import annotations

from skyreg.machines.lazymount import PREFETCH_GAP, PREFETCH_TASK_CHUNKS, _tasks


def test_interleaved_reads_of_a_layer_become_one_task_in_stream_order() -> None:
    # A machine's reads as they came: two files of layer 1 interleaved, layer 0 in between.
    planned = [(1, [10, 11]), (0, [3]), (1, [14, 12]), (1, [13, 15])]
    assert _tasks(planned) == [(1, [10, 11, 12, 13, 14, 15]), (0, [3])]


def test_a_small_gap_is_read_along_and_a_large_one_splits_the_task() -> None:
    near = 20 + PREFETCH_GAP + 1  # PREFETCH_GAP chunks between: read along
    far = near + PREFETCH_GAP + 2  # one more: a task of its own
    assert _tasks([(0, [20, near, far])]) == [(0, [20, near]), (0, [far])]


def test_a_task_holds_at_most_prefetch_task_chunks() -> None:
    numbers = list(range(2 * PREFETCH_TASK_CHUNKS + 1))
    tasks = _tasks([(2, numbers)])
    assert [len(chunks) for _, chunks in tasks] == [PREFETCH_TASK_CHUNKS, PREFETCH_TASK_CHUNKS, 1]
    assert [n for _, chunks in tasks for n in chunks] == numbers
