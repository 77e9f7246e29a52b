"""Where retrieved frames sit in time: the temporal RoPE position policy of memory frames, defined once.

A consumer uses it one of two ways:

- its attention applies RoPE by position (our generator, ``lrag.models.wan``): it gathers K un-roped (delta 0,
  ``RetrievalMemory.gather(..., positions=0)``) and hands :func:`memory_positions` to its cache;
- its attention takes keys already roped (a cache of post-RoPE K, as most released inference code keeps): it
  gathers with ``RetrievalMemory.gather(..., positions=policy)`` (or without ``positions``: the memory's
  ``MemoryConfig.memory_position``), which rotates each stored (un-roped) K to its position with the ``gather_kv``
  kernel (RoPE delta = position).

Policies (``first_local`` is the temporal position of the local window's first frame; in a full window with ``K``
memory slots after ``sink`` sink frames, ``sink + K``):

- an int ``p >= 0``: every retrieved frame at ``p``; ``"sink"`` is ``0``, the sink's phase, the release's choice;
- ``"absolute"``: each frame at its global frame index (caches with absolute positions);
- ``"ordered"``: the retrieved frames in temporal order on the positions just before the local window:
  ``first_local - count + rank`` (``rank`` 0 = the oldest selected frame, ``count`` = frames selected in the
  stream), clamped at 0;
- a ``[B, K]`` int64 tensor: the positions themselves.
"""
from __future__ import annotations

import torch

POLICIES = ("sink", "ordered", "absolute")


def check_policy(policy, name: str = "positions", allow_tensor: bool = False) -> None:
    """Raises ``ValueError`` naming ``name`` unless ``policy`` is an int >= 0, one of :data:`POLICIES` (or, with
    ``allow_tensor``, a tensor, whose shape the caller checks)."""
    if isinstance(policy, bool):
        raise ValueError(f"{name} must be an int >= 0 or one of {POLICIES}, got {policy!r}")
    if isinstance(policy, int):
        if policy < 0:
            raise ValueError(f"{name} must be an int >= 0 or one of {POLICIES}, got {policy}")
        return
    if allow_tensor and isinstance(policy, torch.Tensor):
        return
    if policy not in POLICIES:
        tensor = " or a [B, top_k] int64 tensor" if allow_tensor else ""
        raise ValueError(f"{name} must be an int >= 0, one of {', '.join(map(repr, POLICIES))}{tensor}, "
                         f"got {policy!r}")


def needs_ids(policy) -> bool:
    """Whether the positions depend on which frames were selected (reading them on the host synchronises)."""
    return policy in ("absolute", "ordered")


def memory_positions(policy, ids: torch.Tensor, first_local: int) -> torch.Tensor:
    """``[B, K]`` int64 temporal positions of retrieved frames ``ids`` (``[B, K]`` int64, ``-1`` padded, on any
    device) under ``policy`` (see the module docstring); padding entries get some position (they are skipped).

    Raises:
        ValueError: an unknown policy, or a tensor of the wrong shape or dtype.
    """
    check_policy(policy, allow_tensor=True)
    if isinstance(policy, torch.Tensor):
        if tuple(policy.shape) != tuple(ids.shape) or policy.dtype != torch.int64:
            raise ValueError(f"positions must be a {list(ids.shape)} int64 tensor, got {policy.dtype} "
                             f"{list(policy.shape)}")
        return policy
    if policy == "sink":
        policy = 0
    if isinstance(policy, int):
        return torch.full(ids.shape, policy, dtype=torch.int64, device=ids.device)
    if policy == "absolute":
        return ids.clamp(min=0)
    # "ordered": rank of each selected frame by time within its stream; padding (-1) ranks last.
    key = torch.where(ids < 0, torch.full_like(ids, torch.iinfo(torch.int64).max), ids)
    rank = key.argsort(dim=1).argsort(dim=1)
    count = (ids >= 0).sum(dim=1, keepdim=True)
    return (first_local - count + rank).clamp(min=0)
