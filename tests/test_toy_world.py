"""The toy world (lrag.toy, docs/toy_world.md): deterministic clips, ground-truth metadata that matches the
rendering, and metrics with hand-computed answers."""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch

from lrag.toy import (ClipMeta, WorldConfig, background_error, bootstrap_ci, colour_drift, hit_rate_chance,
                      identity_error, make_clip, nearest_view_error, palette_error, retrieval_hit_rate,
                      revisit_error, rollout_metrics, sample_windows, selection_from_log)

CFG = WorldConfig()
SEEDS = range(8)


@pytest.fixture(scope="module")
def clip():
    return make_clip(3, 120)


def _assert_same_meta(a: ClipMeta, b: ClipMeta):
    for f in dataclasses.fields(ClipMeta):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert np.array_equal(x, y) and np.asarray(x).dtype == np.asarray(y).dtype, f.name


# ---------------------------------------------------------------------------------------------------- the world
def test_same_seed_same_clip():
    (f1, m1), (f2, m2) = make_clip(11, 90), make_clip(11, 90)
    assert f1.tobytes() == f2.tobytes()
    _assert_same_meta(m1, m2)
    # A shorter clip of the same seed is the same scene: its frames are a prefix.
    f3, m3 = make_clip(11, 40)
    assert np.array_equal(f3, f1[:40]) and np.array_equal(m3.views, m1.views)


def test_fingerprint():
    """Seed 0's clip, bit for bit: a change of the world (or of NumPy's samplers) changes every dataset and score
    built on it; update the hashes only on purpose."""
    frames, meta = make_clip(0, 40)
    assert meta.period == 29
    assert hashlib.sha256(frames.tobytes()).hexdigest()[:16] == "6c530fc95259bb81"
    assert hashlib.sha256(meta.object_mask.tobytes() + meta.camera.tobytes()).hexdigest()[:16] == "fa00c3080a176c77"


def test_different_seeds_differ():
    clips = [make_clip(s, 30) for s in SEEDS]
    for i in range(len(clips)):
        for j in range(i):
            assert not np.array_equal(clips[i][0], clips[j][0])
            assert not np.array_equal(clips[i][1].background, clips[j][1].background)
    periods = {m.period for _, m in clips}
    assert len(periods) > 1 and all(CFG.period[0] <= p <= CFG.period[1] for p in periods)


def test_shapes_and_value_scale():
    frames, meta = make_clip(5, 300)
    assert frames.shape == (300, 4, 16, 16) and frames.dtype == np.float32
    assert meta.views.shape == (meta.period, 4, 16, 16) and meta.phase.shape == (300,)
    pooled = np.concatenate([make_clip(s, 30)[0] for s in range(40)])
    assert abs(pooled.mean()) < 0.15 and 0.8 < pooled.std() < 1.25  # like the generator's N(0, 1) noise


def test_period_is_exact_and_longer_than_the_window(clip):
    frames, meta = clip
    P = meta.period
    assert P > 12
    assert np.array_equal(meta.phase, np.arange(len(frames)) % P)
    assert np.array_equal(frames[P:], frames[:-P])                  # frame t + P is frame t, bit for bit
    assert np.array_equal(frames, meta.views[meta.phase])
    assert all(not np.array_equal(meta.views[0], meta.views[p]) for p in range(1, P))  # every phase is a new view


@pytest.mark.parametrize("seed", SEEDS)
def test_metadata_matches_rendering(seed):
    frames, meta = make_clip(seed, 60)
    views, masks, n = meta.views, meta.object_mask, len(meta.object_shape)
    # Objects: disjoint masks, drawn in exactly their colour, within their half-size of their centre.
    assert masks.sum(axis=1).max() <= 1
    ys, xs = np.mgrid[:16, :16]
    for j in range(n):
        m = masks[:, j]
        assert np.array_equal(views.transpose(0, 2, 3, 1)[m], np.broadcast_to(meta.object_colour[j], (m.sum(), 4)))
        c = meta.object_centre[:, j]
        dist = np.maximum(abs(ys - c[:, 0, None, None]), abs(xs - c[:, 1, None, None]))
        assert (dist[m] <= CFG.object_radius[1]).all()
    # Background: exactly the background colour, the same in every frame; what is neither background nor object
    # is scenery: one of the patch colours.
    pixels = frames.transpose(0, 2, 3, 1)
    bg = meta.background_mask[meta.phase]
    assert bg.any() and (pixels[bg] == meta.background).all()
    patches = meta.palette[1:len(meta.palette) - n]
    scenery = pixels[~bg & ~masks[meta.phase].any(axis=1)]
    assert (scenery[:, None] == patches[None]).all(axis=2).any(axis=1).all()
    assert not (scenery[:, None] == meta.background).all(axis=-1).any()
    # Identities: every object's colour stands out from all other colours of the clip; every clip has an object
    # that leaves the view and comes back.
    gaps = np.sqrt(((meta.object_colour[:, None] - meta.palette[None]) ** 2).mean(axis=2))   # [n, K]
    gaps[np.arange(n), len(meta.palette) - n + np.arange(n)] = np.inf                       # not with itself
    assert (gaps >= CFG.min_contrast).all()
    vis = meta.visible[:meta.period]
    assert np.array_equal(vis, masks.sum(axis=(2, 3)) >= CFG.min_pixels)
    assert (vis.any(axis=0) & ~vis.all(axis=0)).any()


@pytest.mark.parametrize("seed", SEEDS)
def test_camera_pose_matches_rendering(seed):
    """Where two consecutive views see the same world pixel (per the camera poses) and no object covers it, they
    show the same colour; the camera moves a few pixels per frame and stays in its loop."""
    _, meta = make_clip(seed, 1)
    P, still = meta.period, ~meta.object_mask.any(axis=1)                  # [P, H, W]
    for p in range(P):
        q = (p + 1) % P
        dy, dx = meta.camera[q] - meta.camera[p]
        assert 0 < max(abs(dy), abs(dx)) <= 6
        a = (slice(max(dy, 0), 16 + min(dy, 0)), slice(max(dx, 0), 16 + min(dx, 0)))      # in view p
        b = (slice(max(-dy, 0), 16 + min(-dy, 0)), slice(max(-dx, 0), 16 + min(-dx, 0)))  # in view q
        both = still[p][a] & still[q][b]
        assert both.any()
        assert np.array_equal(meta.views[p][:, a[0], a[1]][:, both], meta.views[q][:, b[0], b[1]][:, both])
    assert meta.camera.min() >= CFG.pad and meta.camera.max() <= CFG.pad + 2 * CFG.camera_radius[1]


def test_sample_windows():
    frames, metas = sample_windows(4, batch=3, length=50)
    assert frames.shape == (3, 50, 4, 16, 16) and frames.dtype == np.float32 and len(metas) == 3
    again, _ = sample_windows(np.random.default_rng(4), batch=3, length=50)
    assert np.array_equal(frames, again)
    for x, m in zip(frames, metas):
        assert m.num_frames == 50 and np.array_equal(x, m.frames())
        assert np.array_equal(m.phase, (m.phase[0] + np.arange(50)) % m.period)
        assert np.array_equal(x[m.period:], x[:-m.period])
    rng = np.random.default_rng(0)
    assert not np.array_equal(sample_windows(rng, 2, 8)[0], sample_windows(rng, 2, 8)[0])  # fresh clips per call


def test_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        WorldConfig(size=15)
    with pytest.raises(ValueError, match="period"):
        WorldConfig(period=(20, 10))
    with pytest.raises(ValueError, match="num_frames"):
        make_clip(0, -1)
    frames, meta = make_clip(0, 20)
    with pytest.raises(ValueError, match="frames must be"):
        revisit_error(frames[:, :3], meta, reference="truth")
    with pytest.raises(ValueError, match="only 20"):
        revisit_error(np.zeros((21, 4, 16, 16)), meta, reference="truth")
    with pytest.raises(ValueError, match="past max"):
        revisit_error(frames, meta)                          # 20 frames < one period
    with pytest.raises(ValueError, match="reference"):
        identity_error(frames, meta, reference="gt")


# -------------------------------------------------------------------------------------------------- the metrics
def test_true_clip_scores_perfect(clip):
    frames, meta = clip
    scores = rollout_metrics(frames, meta)
    assert scores == dict.fromkeys(scores, 0.0)
    assert rollout_metrics(torch.from_numpy(frames), meta, start=30) == dict.fromkeys(scores, 0.0)  # torch input


def test_constant_offset(clip):
    """Everything shifted by c: consistent with itself (revisit, identity, drift 0) but off the truth by c^2."""
    frames, meta = clip
    c = 0.5
    s = rollout_metrics(frames + c, meta, start=10)
    for k in ("revisit_self", "identity_self", "colour_drift"):
        assert s[k] == pytest.approx(0, abs=1e-12), k
    for k in ("revisit_truth", "identity_truth", "background_error", "nearest_view_error"):
        assert s[k] == pytest.approx(c * c), k
    assert 0 < s["palette_error"] <= c * c


def test_drifting_rollout_scores_worse(clip):
    """A colour offset growing by d per frame: revisits differ by d P everywhere, the last period's mean colour
    is d (T - P) above the first's."""
    frames, meta = clip
    T, P, d = len(frames), meta.period, 0.01
    drifting = frames + d * np.arange(T, dtype=np.float32)[:, None, None, None]
    s = rollout_metrics(drifting, meta)
    assert s["revisit_self"] == pytest.approx((d * P) ** 2, rel=1e-5)
    assert s["colour_drift"] == pytest.approx(d * (T - P), rel=1e-5)
    for k in ("revisit_truth", "identity_self", "identity_truth", "background_error", "palette_error"):
        assert s[k] > 1e-4, k


def test_noise_after_the_window_scores_worse(clip):
    frames, meta = clip
    noisy = frames.copy()
    noisy[12:] = np.random.default_rng(0).standard_normal(noisy[12:].shape)
    s = rollout_metrics(noisy, meta, start=12)
    for k in ("revisit_self", "revisit_truth", "identity_truth", "background_error", "nearest_view_error"):
        assert s[k] > 0.5, k
    assert s["palette_error"] > 0.05 and s["identity_self"] > 0


def test_start_excludes_the_prefix(clip):
    frames, meta = clip
    broken = frames.copy()
    broken[:20] += 1.0                                        # only the prefix is wrong
    assert revisit_error(broken, meta, start=20, reference="truth") == 0
    assert nearest_view_error(broken, meta, start=20) == palette_error(broken, meta, start=20) == 0
    assert background_error(broken, meta, start=20) == 0
    assert revisit_error(broken, meta, start=20) > 0          # ... but a revisit still compares with it


def _runs(v: np.ndarray) -> list:
    """Starts and ends of the runs of True in v."""
    runs, a = [], None
    for t, x in enumerate(list(v) + [False]):
        if x and a is None:
            a = t
        elif not x and a is not None:
            runs.append((a, t))
            a = None
    return runs


def test_identity_compares_with_the_preceding_episode(clip):
    """Object 0 drawn 1.0 too bright during its second episode only: that return differs from the first episode
    by 1, the next return from the second by 1 again, every other return by 0 (one in R returns of all objects)."""
    frames, meta = clip
    episodes = [_runs(meta.visible[:, j]) for j in range(len(meta.object_shape))]
    returns = sum(len(e) - 1 for e in episodes)
    assert len(episodes[0]) >= 3
    a, b = episodes[0][1]
    odd = frames.copy()
    mask = meta.object_mask[meta.phase[a:b], 0]                  # [L, H, W]
    odd[a:b] += mask[:, None]
    assert identity_error(odd, meta) == pytest.approx(2 / returns)
    assert identity_error(odd, meta, reference="truth") == pytest.approx(1 / returns)
    assert identity_error(odd, meta, start=episodes[0][2][0] + 1) == 0              # later returns only


def test_identity_needs_a_return(clip):
    frames, meta = clip
    assert np.isnan(identity_error(frames, meta, min_gap=meta.period))  # an object is never out of view that long
    assert identity_error(frames + 1, meta, min_gap=2, reference="truth") == pytest.approx(1.0)


def test_colour_drift_needs_a_period(clip):
    frames, meta = clip
    with pytest.raises(ValueError, match="one period"):
        colour_drift(frames[:meta.period - 1], meta)
    assert colour_drift(frames[:meta.period], meta) == 0


# ----------------------------------------------------------------------------------------------- retrieval hits
def _meta20(meta: ClipMeta) -> ClipMeta:
    return dataclasses.replace(meta, period=20, phase=np.arange(100) % 20)


def test_hit_rate_hand_computed(clip):
    meta = _meta20(clip[1])
    starts = [40, 43]                                         # phases {0, 1, 2}, then {3, 4, 5}
    retrieved = [[20, 22, 23, 25, 39, 10],                    # phases 0 2 3 5 19 10: distances 0 0 1 3 1 8
                 [23, 30]]                                    # phases 3 10: distances 0 5
    assert retrieval_hit_rate(meta, starts, retrieved, tolerance=0) == pytest.approx(3 / 8)
    assert retrieval_hit_rate(meta, starts, retrieved, tolerance=1) == pytest.approx(5 / 8)
    assert retrieval_hit_rate(meta, starts, retrieved, frames_per_block=1, tolerance=0) == pytest.approx(2 / 8)
    # The same blocks seen from a window starting at frame 5: ids shift, phases do not.
    win = meta.window(5, 50)
    shifted = [[g - 5 for g in ids] for ids in retrieved]
    assert retrieval_hit_rate(win, [s - 5 for s in starts], shifted, tolerance=1) == pytest.approx(5 / 8)
    assert np.isnan(retrieval_hit_rate(meta, [40], [[]]))
    with pytest.raises(ValueError, match=">= 0"):
        retrieval_hit_rate(meta, [40], [[-1]])
    assert hit_rate_chance(20) == pytest.approx(5 / 20) and hit_rate_chance(4) == 1.0


def test_oracle_retrieval_hits_every_time(clip):
    """A retrieval that returns, for every block, the frames of the block's phases one or more periods back."""
    frames, meta = clip
    P = meta.period
    starts = list(range(18, len(frames), 3))
    retrieved = [[t - k * P for t in range(s, s + 3) for k in (1, 2) if t - k * P >= 0] for s in starts]
    assert retrieval_hit_rate(meta, starts, retrieved, tolerance=0) == 1.0
    anti = [[(t + P // 2) % P for t in range(s, s + 3)] for s in starts]  # half a period off
    assert retrieval_hit_rate(meta, starts, anti, tolerance=1) == 0.0


def test_selection_from_either_log(clip):
    meta = _meta20(clip[1])
    pipeline_log = [{"query_frame": 40, "selected_global_frames": [[20, 25], [1, 2]]},
                    {"query_frame": 43, "selected_global_frames": [[23], [3]]}]
    memory_log = [{"query_frame": 40, "selected_global_frames": [20, 25]},
                  {"query_frame": 43, "selected_global_frames": [23]}]
    assert selection_from_log(pipeline_log) == selection_from_log(memory_log) == ([40, 43], [[20, 25], [23]])
    assert selection_from_log(pipeline_log, stream=1)[1] == [[1, 2], [3]]
    scores = rollout_metrics(meta.frames(), meta, memory_log=memory_log)
    assert scores["hit_rate"] == pytest.approx(2 / 3) and scores["hit_rate_chance"] == pytest.approx(5 / 20)


# ---------------------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_ci():
    rng = np.random.default_rng(1)
    few, many = rng.normal(2.0, 1.0, 10), rng.normal(2.0, 1.0, 1000)
    m1, lo1, hi1 = bootstrap_ci(few, n=2000)
    m2, lo2, hi2 = bootstrap_ci(many, n=2000)
    assert lo1 <= m1 <= hi1 and lo2 <= m2 <= hi2
    assert m1 == pytest.approx(few.mean()) and hi2 - lo2 < (hi1 - lo1) / 3   # ~sqrt(100) = 10x narrower
    assert lo2 < 2.0 < hi2
    assert bootstrap_ci(few, n=2000, seed=5) == bootstrap_ci(few, n=2000, seed=5)
    assert bootstrap_ci([0.3]) == (0.3, 0.3, 0.3)
    for bad in ([], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="finite"):
            bootstrap_ci(bad)
