"""Ground-truth metrics of a rollout in the toy world (docs/toy_world.md): no learned model, only the clip's
:class:`~lrag.toy.world.ClipMeta`.

A rollout is ``[T, C, H, W]`` (numpy array or torch tensor) whose frame ``t`` stands for the clip's frame ``t``
(``T <= meta.num_frames``). Frames before ``start`` are not scored (e.g. a ground-truth prefix the generator was
conditioned on); they still serve as the "before" of a revisit. Notation: ``x_t`` the rollout's frame, ``P`` the
period, ``p(t)`` the phase of frame ``t``, ``v_p`` the true view of phase ``p``, ``MSE(a, b)`` the mean over all
elements of ``(a - b)^2``. Every error is 0 for the true clip.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from lrag.toy.world import ClipMeta


def _frames(frames, meta: ClipMeta, start: int) -> np.ndarray:
    """The rollout as float64 ``[T, C, H, W]``, checked against the clip."""
    if hasattr(frames, "detach"):
        frames = frames.detach().cpu().double().numpy()
    x = np.asarray(frames, dtype=np.float64)
    if x.ndim != 4 or x.shape[1:] != meta.views.shape[1:]:
        raise ValueError(f"frames must be [T, {', '.join(map(str, meta.views.shape[1:]))}], got {list(x.shape)}")
    if len(x) > meta.num_frames:
        raise ValueError(f"frames has {len(x)} frames, the clip only {meta.num_frames}")
    if not 0 <= start <= len(x):
        raise ValueError(f"start must be in [0, {len(x)}], got {start}")
    return x


def _mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-frame MSE over the trailing ``[C, H, W]``."""
    return ((a - b) ** 2).mean(axis=(-3, -2, -1))


def revisit_error(frames, meta: ClipMeta, start: int = 0, reference: str = "self") -> float:
    """Revisit consistency: how differently a place is drawn when the camera comes back to it.

    ``reference="self"``: ``mean_{t in [max(start, P), T)} MSE(x_t, x_{t-P})``, the rollout against itself one
    period earlier (same phase); needs ``T > P``. ``reference="truth"``: ``mean_{t in [start, T)} MSE(x_t,
    v_{p(t)})``, against the true view of the same phase.

    Raises:
        ValueError: no frame to score (``T <= max(start, P)`` for "self", ``T == start`` for "truth").
    """
    x = _frames(frames, meta, start)
    if reference == "self":
        lo = max(start, meta.period)
        if lo >= len(x):
            raise ValueError(f"revisit_error needs frames past max(start, period) = {lo}, got {len(x)} frames")
        return float(_mse(x[lo:], x[lo - meta.period:len(x) - meta.period]).mean())
    if reference == "truth":
        if start >= len(x):
            raise ValueError("revisit_error: no frame at or after start")
        return float(_mse(x[start:], meta.views[meta.phase[start:len(x)]]).mean())
    raise ValueError(f"reference must be 'self' or 'truth', got {reference!r}")


def _episodes(visible: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs ``[a, b)`` of True in a 1-D bool array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], visible.astype(np.int8), [0]])))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def identity_error(frames, meta: ClipMeta, start: int = 0, reference: str = "self", min_gap: int = 1) -> float:
    """Identity consistency: how differently an object looks when it comes back into view.

    An object's *episode* is a maximal run of frames ``[a, b)`` in which it is visible (``meta.visible``); its
    appearance ``A = sum_{t in [a, b)} sum_{pixels in m_t} x_t / sum_t |m_t|`` is the mean colour ``[C]`` of the
    rollout over the object's true pixel masks ``m_t`` (``meta.object_mask``). A *return* is an episode that begins
    at ``a >= start`` after the object's preceding episode ``[a', b')`` with ``a - b' >= min_gap`` frames out of
    view (the preceding episode may lie before ``start``). Score: mean over all returns of all objects of ``mean_c (A - R)^2``,
    with ``R`` the object's appearance in the earlier episode (``"self"``) or its true colour (``"truth"``).
    Measures colour identity, not shape: a wrongly shaped object drawn in the right colour scores 0.

    Returns:
        the score, or NaN when the rollout has no return (``min_gap > 12`` asks the object to have left the
        attention window, at the cost of fewer returns).
    """
    x = _frames(frames, meta, start)
    if reference not in ("self", "truth"):
        raise ValueError(f"reference must be 'self' or 'truth', got {reference!r}")
    T = len(x)
    visible, masks = meta.visible[:T], meta.object_mask[meta.phase[:T]]  # [T, n], [T, n, H, W]
    errors = []
    for j in range(visible.shape[1]):
        before = None
        for a, b in _episodes(visible[:, j]):
            m = masks[a:b, j]                                                  # [L, H, W]
            appearance = (x[a:b] * m[:, None]).sum(axis=(0, 2, 3)) / m.sum()   # [C]
            if before is not None and a >= start and a - before[0] >= min_gap:
                ref = before[1] if reference == "self" else meta.object_colour[j]
                errors.append(np.mean((appearance - ref) ** 2))
            before = (b, appearance)
    return float(np.mean(errors)) if errors else float("nan")


def mean_colour(frames) -> np.ndarray:
    """``[T, C]``: the spatial mean colour of every frame, ``m_t = mean_{h, w} x_t``."""
    if hasattr(frames, "detach"):
        frames = frames.detach().cpu().double().numpy()
    return np.asarray(frames, dtype=np.float64).mean(axis=(-2, -1))


def colour_drift(frames, meta: ClipMeta) -> float:
    """Colour/brightness drift between the first and the last period of the rollout.

    ``sqrt(mean_c (mean_{t in [T-P, T)} m_t - mean_{t in [0, P)} m_t)^2)`` with ``m_t`` the spatial mean colour
    (:func:`mean_colour`). Averaging whole periods cancels the camera's motion: a periodic rollout scores exactly
    0, whatever it draws. Needs ``T >= P``; the windows overlap when ``T < 2 P``.
    """
    x = _frames(frames, meta, 0)
    P = meta.period
    if len(x) < P:
        raise ValueError(f"colour_drift needs at least one period ({P} frames), got {len(x)}")
    m = mean_colour(x)
    return float(np.sqrt(np.mean((m[-P:].mean(axis=0) - m[:P].mean(axis=0)) ** 2)))


def background_error(frames, meta: ClipMeta, start: int = 0) -> float:
    """Background colour error: ``mean (x_t[c, h, w] - bg_c)^2`` over frames ``t >= start``, channels, and the
    pixels that truly show the background (``meta.background_mask``). NaN when no such pixel exists."""
    x = _frames(frames, meta, start)
    m = meta.background_mask[meta.phase[start:len(x)]]                   # [T', H, W]
    if not m.any():
        return float("nan")
    d = ((x[start:] - meta.background[None, :, None, None]) ** 2).mean(axis=1)  # [T', H, W]
    return float(d[m].mean())


def nearest_view_error(frames, meta: ClipMeta, start: int = 0) -> float:
    """Per-frame quality as "is this some view of the scene": ``mean_{t >= start} min_p MSE(x_t, v_p)``.

    Does not ask for the right view (:func:`revisit_error` does). Pixel MSE: a view shifted by one pixel can score
    worse than a blurred one, and a frame from a *different* scene scores badly however realistic it is.
    """
    x = _frames(frames, meta, start)[start:]
    if not len(x):
        return float("nan")
    best = np.full(len(x), np.inf)
    for view in meta.views:                                              # P passes: no [T, P, C, H, W] temporary
        best = np.minimum(best, _mse(x, view))
    return float(best.mean())


def palette_error(frames, meta: ClipMeta, start: int = 0) -> float:
    """Per-pixel quality as "does every pixel carry a colour of the scene": ``mean_{t >= start, h, w} min_k
    mean_c (x_t[c, h, w] - palette_k[c])^2`` over the clip's colours (``meta.palette``).

    Blind to geometry (pixels may be anywhere) but not to shifts: it measures noise, blur between regions and
    colours that do not exist in the scene. 0 for any frame made of the scene's colours.
    """
    x = _frames(frames, meta, start)[start:]
    if not len(x):
        return float("nan")
    best = np.full(x.shape[:1] + x.shape[2:], np.inf)                   # [T', H, W]
    for colour in meta.palette:
        best = np.minimum(best, ((x - colour[None, :, None, None]) ** 2).mean(axis=1))
    return float(best.mean())


def selection_from_log(log: Sequence[dict], stream: int = 0) -> tuple[list[int], list[list[int]]]:
    """``(block_starts, retrieved)`` of one stream from a memory log: the records of ``Pipeline``
    (``GenerationResult.memory_log``: ``selected_global_frames`` is one list per stream) or of
    ``RetrievalMemory.log`` (one flat list). ``query_frame`` is the block's first frame in both."""
    starts, retrieved = [], []
    for rec in log:
        sel = rec["selected_global_frames"]
        if sel and isinstance(sel[0], (list, tuple)):
            sel = sel[stream]
        starts.append(int(rec["query_frame"]))
        retrieved.append([int(g) for g in sel])
    return starts, retrieved


def retrieval_hit_rate(meta: ClipMeta, block_starts: Sequence[int], retrieved: Sequence[Sequence[int]],
                       frames_per_block: int = 3, tolerance: int = 1) -> float:
    """Fraction of retrieved frames that show the place being generated.

    A frame ``g`` retrieved for the block of frames ``[s, s + F)`` is a *hit* when
    ``min_{i in [0, F)} d(p(g), p(s + i)) <= tolerance``, with ``d(a, b) = min(|a - b| mod P, P - |a - b| mod P)``
    the circular phase distance and ``p(t) = (meta.phase[0] + t) mod P`` (defined beyond the clip's end too).
    With the default ``tolerance=1`` a frame of the query's own phase (``s - 1``) counts. Score: hits / all
    retrieved frames over all blocks (:func:`hit_rate_chance` is the rate of a uniformly random retrieval).

    Args:
        block_starts: ``s`` of each block; retrieved: the global frame ids selected for it (``selection_from_log``).
    Returns:
        the rate, NaN when nothing was retrieved.
    """
    if len(block_starts) != len(retrieved):
        raise ValueError(f"block_starts has {len(block_starts)} blocks, retrieved {len(retrieved)}")
    P, first = meta.period, int(meta.phase[0]) if meta.num_frames else 0
    hits = total = 0
    for s, ids in zip(block_starts, retrieved):
        g = np.asarray(ids, dtype=np.int64)
        if (g < 0).any():
            raise ValueError(f"retrieved frame ids must be >= 0, block {s} has {g.tolist()}")
        block = (first + s + np.arange(frames_per_block)) % P
        d = np.abs((first + g[:, None]) % P - block[None]) % P
        hits += int((np.minimum(d, P - d).min(axis=1) <= tolerance).sum())
        total += len(g)
    return hits / total if total else float("nan")


def hit_rate_chance(period: int, frames_per_block: int = 3, tolerance: int = 1) -> float:
    """The hit rate of a retrieval that picks phases uniformly at random: ``min(1, (F + 2 tolerance) / P)``."""
    return min(1.0, (frames_per_block + 2 * tolerance) / period)


def bootstrap_ci(values: Sequence[float], n: int = 10000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap confidence interval of the mean (e.g. one metric value per clip seed).

    Draws ``n`` resamples of the values with replacement (``numpy.random.default_rng(seed)``) and returns the
    mean of the values and the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled means. With
    one value the interval is that value.

    Returns:
        ``(mean, low, high)``.
    Raises:
        ValueError: no values, or a non-finite one (filter NaN scores, e.g. clips without returns, first).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if not len(v) or not np.isfinite(v).all():
        raise ValueError(f"bootstrap_ci needs at least one value, all finite; got {v.tolist()}")
    if n < 1 or not 0 < level < 1:
        raise ValueError(f"n must be >= 1 and level in (0, 1), got {n}, {level}")
    means = v[np.random.default_rng(seed).integers(0, len(v), size=(n, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(lo), float(hi)


def rollout_metrics(frames, meta: ClipMeta, start: int = 0, memory_log: Optional[Sequence[dict]] = None,
                    stream: int = 0, frames_per_block: int = 3, tolerance: int = 1) -> dict:
    """Every metric of one rollout, as a dict of floats (NaN where undefined; see each function)."""
    out = {
        "revisit_self": revisit_error(frames, meta, start, "self"),
        "revisit_truth": revisit_error(frames, meta, start, "truth"),
        "identity_self": identity_error(frames, meta, start, "self"),
        "identity_truth": identity_error(frames, meta, start, "truth"),
        "colour_drift": colour_drift(frames, meta),
        "background_error": background_error(frames, meta, start),
        "nearest_view_error": nearest_view_error(frames, meta, start),
        "palette_error": palette_error(frames, meta, start),
    }
    if memory_log is not None:
        starts, retrieved = selection_from_log(memory_log, stream)
        out["hit_rate"] = retrieval_hit_rate(meta, starts, retrieved, frames_per_block, tolerance)
        out["hit_rate_chance"] = hit_rate_chance(meta.period, frames_per_block, tolerance)
    return out
