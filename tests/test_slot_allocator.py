"""lrag_ext.SlotAllocator: the page allocator of the KV pool (indices only, thread-safe)."""
from __future__ import annotations

import random
import threading

import pytest

import lrag_ext
from lrag_ext import SlotAllocator


def test_fresh_pool_hands_out_distinct_slots_lowest_first():
    a = SlotAllocator(10)
    assert (a.num_slots, a.num_free) == (10, 10)
    got = a.allocate(4)
    assert got == [0, 1, 2, 3]
    assert a.num_free == 6
    assert all(a.is_allocated(s) for s in got) and not a.is_allocated(4)
    assert a.allocate(0) == []
    assert "num_free=6" in repr(a)
    assert lrag_ext.SlotAllocator is SlotAllocator


def test_capacity_error_names_asked_and_free_and_changes_nothing():
    a = SlotAllocator(10)
    held = a.allocate(7)
    with pytest.raises(RuntimeError, match=r"asked for 5 slots, 3 of 10 are free"):
        a.allocate(5)
    assert a.num_free == 3 and all(a.is_allocated(s) for s in held)
    assert sorted(a.allocate(3)) == [7, 8, 9]
    with pytest.raises(RuntimeError, match=r"asked for 1 slots, 0 of 10 are free"):
        a.allocate(1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_slots must be >= 0"):
        SlotAllocator(-1)
    a = SlotAllocator(3)
    with pytest.raises(ValueError, match="n must be >= 0"):
        a.allocate(-2)
    with pytest.raises(ValueError, match="stream must be >= 0"):
        a.allocate(1, stream=-5)
    with pytest.raises(IndexError, match=r"is_allocated: slot 3 is out of range \[0, 3\)"):
        a.is_allocated(3)
    assert SlotAllocator(0).allocate(0) == []


def test_double_free_and_bad_free_are_all_or_nothing():
    a = SlotAllocator(6)
    s = a.allocate(3)
    a.free([s[0]])
    with pytest.raises(ValueError, match=f"slot {s[0]} is not allocated"):
        a.free([s[1], s[0]])
    assert a.is_allocated(s[1]), "a failed free must free nothing"
    with pytest.raises(ValueError, match=f"slot {s[1]} is listed more than once"):
        a.free([s[1], s[1]])
    with pytest.raises(IndexError, match=r"free: slot 6 is out of range \[0, 6\)"):
        a.free([s[1], 6])
    with pytest.raises(IndexError, match="out of range"):
        a.free([-1])
    assert a.is_allocated(s[1]) and a.num_free == 4
    a.free([s[1], s[2]])
    assert a.num_free == 6


def test_random_sequence_matches_a_model_and_does_not_leak():
    rng = random.Random(0)
    n = 37
    a = SlotAllocator(n)
    held: set[int] = set()
    for _ in range(2000):
        if held and rng.random() < 0.5:
            k = rng.randint(1, len(held))
            out = rng.sample(sorted(held), k)
            a.free(out)
            held -= set(out)
        else:
            k = rng.randint(0, 8)
            if k > n - len(held):
                with pytest.raises(RuntimeError, match="out of slots"):
                    a.allocate(k)
                continue
            got = a.allocate(k)
            assert len(set(got)) == k and not (set(got) & held)
            assert all(0 <= s < n for s in got)
            held |= set(got)
        assert a.num_free == n - len(held)
    a.free(sorted(held))
    assert a.num_free == n
    assert sorted(a.allocate(n)) == list(range(n))


def test_streams_tag_and_release_their_slots():
    a = SlotAllocator(8)
    s1 = a.allocate(3, stream=1)
    s2 = a.allocate(2, stream=2)
    assert a.stream_slots(1) == sorted(s1) and a.stream_slots(2) == sorted(s2)
    assert a.stream_slots(7) == []
    a.free([s1[0]])
    assert a.stream_slots(1) == sorted(s1[1:])
    assert a.release_stream(1) == 2
    assert a.stream_slots(1) == [] and a.release_stream(1) == 0
    assert a.num_free == 6 and all(a.is_allocated(s) for s in s2)
    assert a.release_stream(2) == 2 and a.num_free == 8


def test_thread_hammer_never_hands_a_slot_to_two_owners():
    n, threads, rounds = 64, 8, 400
    a = SlotAllocator(n)
    owner: dict[int, int] = {}
    book = threading.Lock()
    errors: list[str] = []

    def worker(tid: int) -> None:
        rng = random.Random(tid)
        mine: list[int] = []
        for _ in range(rounds):
            if mine and rng.random() < 0.5:
                k = rng.randint(1, len(mine))
                out, mine = mine[:k], mine[k:]
                with book:
                    for s in out:
                        if owner.pop(s, None) != tid:
                            errors.append(f"slot {s} freed by {tid} but not owned by it")
                a.free(out)
            else:
                try:
                    got = a.allocate(rng.randint(1, 6), stream=tid)
                except RuntimeError:
                    continue
                with book:
                    for s in got:
                        if s in owner:
                            errors.append(f"slot {s} handed to {tid} while owned by {owner[s]}")
                        owner[s] = tid
                mine += got
        with book:
            for s in mine:
                owner.pop(s, None)
        a.free(mine)

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[:5]
    assert a.num_free == n, "slots leaked"
