"""lrag_ext.positions: the one definition of where retrieved frames sit in time, against brute force."""
from __future__ import annotations

import random

import pytest
import torch

from lrag_ext.positions import POLICIES, check_policy, memory_positions, needs_ids


def brute_force(policy, ids: list[list[int]], first_local: int) -> list[list[int]]:
    out = []
    for row in ids:
        chosen = [i for i in row if i >= 0]
        by_time = sorted(chosen)
        res = []
        for j, i in enumerate(row):
            if i < 0:
                continue  # padding: any position
            if policy == "absolute":
                res.append(i)
            elif policy == "ordered":
                res.append(max(0, first_local - len(chosen) + by_time.index(i)))
            else:
                res.append(0 if policy == "sink" else policy)
        out.append(res)
    return out


@pytest.mark.parametrize("policy", ["sink", "ordered", "absolute", 0, 4])
def test_matches_brute_force(policy):
    rng = random.Random(str(policy))
    for _ in range(50):
        B, K = rng.randint(1, 4), rng.randint(1, 7)
        ids = []
        for _ in range(B):
            m = rng.randint(0, K)
            row = rng.sample(range(100), m) + [-1] * (K - m)
            ids.append(row)
        first_local = rng.randint(0, 12)
        got = memory_positions(policy, torch.tensor(ids), first_local)
        assert got.dtype == torch.int64 and got.shape == (B, K)
        want = brute_force(policy, ids, first_local)
        for b in range(B):
            valid = [j for j in range(K) if ids[b][j] >= 0]
            assert [int(got[b, j]) for j in valid] == want[b]


def test_tensor_policy_and_errors():
    ids = torch.tensor([[3, 1, -1]])
    pos = torch.tensor([[7, 8, 9]])
    assert memory_positions(pos, ids, 0) is pos
    with pytest.raises(ValueError, match=r"positions must be a \[1, 3\] int64 tensor"):
        memory_positions(pos[:, :2], ids, 0)
    for bad in ("sideways", -1, True, 1.5, None):
        with pytest.raises(ValueError, match="must be an int >= 0"):
            check_policy(bad, "x")
    assert [needs_ids(p) for p in POLICIES + (0,)] == [False, True, True, False]
