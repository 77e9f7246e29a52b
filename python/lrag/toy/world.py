"""A miniature procedural world whose correct continuation needs memory (docs/toy_world.md).

A clip is a camera looping over a random 2-D scene: a flat background colour, static coloured rectangles
("scenery") and a few coloured sprites ("objects", identity = shape code + colour) that move on their own orbits.
Everything moves with the same period ``P`` (drawn from ``WorldConfig.period``, longer than the generator's
12-frame attention window), so frame ``t + P`` is *exactly* frame ``t``: every return to a place must reproduce
what was seen one period earlier, which has left the window by then. Every clip is a new random scene.

Frames are used directly as latents: ``[C, H, W]`` float32 (default 4 × 16 × 16, 64 tokens under the backbone's
1×2×2 patches), piecewise constant, colours drawn from N(0, 1) per channel so pixels are zero-mean, unit-scale
over clips, like the generator's noise.

Determinism: one ``numpy.random.default_rng(seed)`` (PCG64) draws everything, in a fixed order; positions are
rounded with a tie-breaking offset (:func:`_round`) so that a last-ulp difference of ``cos``/``sin`` between
machines cannot move a pixel. The same seed gives the same clip bit for bit (for a given NumPy version: NumPy
keeps PCG64 streams stable but may change a distribution's sampler between versions).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Union

import numpy as np

SHAPES = ("square", "disc", "diamond", "cross")  # object shape codes: ClipMeta.object_shape indexes this


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of the world (ranges are inclusive ``(low, high)`` and drawn uniformly per clip / per item).

    Attributes:
        channels: C, channels of a frame (latent channels of the backbone).
        size: H = W of a frame in pixels (even: the backbone patches 2×2).
        period: range of the loop period P in frames; keep P > 12 (the attention window) so returns need memory.
        camera_radius: range of the radius (px) of the camera's circular loop; the world is
            ``size + 2 * radius + 2 * pad`` px square.
        pad: world margin (px) around the area the camera ever sees.
        patches: number of static scenery rectangles.
        patch_size: range of a rectangle's height and width (px).
        objects: number of moving objects (sprites).
        object_radius: range of an object's half-size (px): it spans ``2 r + 1`` px.
        orbit_radius: range of the radius (px) of an object's own circular orbit (0: it stands still).
        orbit_cycles: an object's orbit turns ``k`` times per period, ``k`` drawn from these (sign = direction).
        min_contrast: least RMS-over-channels colour difference between a patch and the background, and between
            an object and any other colour of the clip (colours are redrawn, at most 100 times, until it holds).
        min_pixels: an object counts as visible in a frame when at least this many of its pixels show.
    """

    channels: int = 4
    size: int = 16
    period: tuple = (18, 30)
    camera_radius: tuple = (9, 12)
    pad: int = 2
    patches: int = 16
    patch_size: tuple = (3, 10)
    objects: int = 3
    object_radius: tuple = (2, 3)
    orbit_radius: tuple = (0, 6)
    orbit_cycles: tuple = (-2, -1, 1, 2)
    min_contrast: float = 0.75
    min_pixels: int = 3

    def __post_init__(self):
        if self.channels < 1 or self.size < 2 or self.size % 2:
            raise ValueError(f"channels must be >= 1 and size an even number >= 2, got {self.channels}, {self.size}")
        for name in ("period", "camera_radius", "patch_size", "object_radius", "orbit_radius"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high, got {(lo, hi)}")
        if self.period[0] < 2:
            raise ValueError(f"period must be at least 2 frames, got {self.period}")
        if not self.orbit_cycles or 0 in self.orbit_cycles:
            raise ValueError(f"orbit_cycles must be non-zero integers, got {self.orbit_cycles}")


@dataclass(frozen=True, eq=False)
class ClipMeta:
    """Ground truth of a clip. Per-place quantities are stored once per phase (``[P, ...]``); the value for frame
    ``t`` is ``x[meta.phase[t]]``. Coordinates are ``(y, x)`` in pixels.

    Attributes:
        seed: the seed the clip was drawn from.
        period: P, frames per loop.
        phase: ``[T]`` int64, the phase (place) of every frame: ``(first + t) mod P``.
        views: ``[P, C, H, W]`` float32, the frame of each phase (``frames[t] == views[phase[t]]``).
        camera: ``[P, 2]`` int64, the world coordinate of the view's top-left pixel (the camera pose).
        background: ``[C]`` float32, the background colour (constant over the clip).
        background_mask: ``[P, H, W]`` bool, pixels showing the background (no patch, no object).
        palette: ``[K, C]`` float32, every colour of the clip: background, then patches, then objects.
        object_shape: ``[n]`` int64, shape code of each object (index into :data:`SHAPES`).
        object_colour: ``[n, C]`` float32; (shape, colour) is the object's identity.
        object_centre: ``[P, n, 2]`` int64, each object's centre in frame coordinates (may lie outside the frame).
        object_mask: ``[P, n, H, W]`` bool, the pixels where each object shows (after occlusion: a later object is
            drawn over an earlier one; masks of different objects are disjoint).
        min_pixels: visibility threshold (see :attr:`visible`).
    """

    seed: int
    period: int
    phase: np.ndarray
    views: np.ndarray
    camera: np.ndarray
    background: np.ndarray
    background_mask: np.ndarray
    palette: np.ndarray
    object_shape: np.ndarray
    object_colour: np.ndarray
    object_centre: np.ndarray
    object_mask: np.ndarray
    min_pixels: int

    @property
    def num_frames(self) -> int:
        return len(self.phase)

    @property
    def visible(self) -> np.ndarray:
        """``[T, n]`` bool: object ``j`` shows at least ``min_pixels`` pixels in frame ``t``."""
        return (self.object_mask.sum(axis=(2, 3)) >= self.min_pixels)[self.phase]

    def frames(self) -> np.ndarray:
        """``[T, C, H, W]`` float32: the clip's frames (``views[phase]``, a new array)."""
        return self.views[self.phase]

    def window(self, start: int, length: int) -> "ClipMeta":
        """The metadata of frames ``[start, start + length)`` (their phases kept, so a window's frame 0 may have
        any phase)."""
        if not (0 <= start and length >= 0 and start + length <= self.num_frames):
            raise ValueError(f"window [{start}, {start + length}) is outside the clip's {self.num_frames} frames")
        return replace(self, phase=self.phase[start:start + length])


def _round(x: np.ndarray) -> np.ndarray:
    """Rounds half up to int64, with a 1e-6 offset: exact ties (``R cos(pi/3)`` with odd R) and last-ulp
    differences of ``cos``/``sin`` between machines round the same way everywhere."""
    return np.floor(np.asarray(x) + 0.5 + 1e-6).astype(np.int64)


def _colour(rng: np.random.Generator, channels: int, avoid: list, min_contrast: float) -> np.ndarray:
    """A colour from N(0, 1) per channel, redrawn (at most 100 times) until its RMS difference to every colour in
    ``avoid`` is at least ``min_contrast``."""
    for _ in range(100):
        c = rng.standard_normal(channels).astype(np.float32)
        if all(np.sqrt(np.mean((c - a) ** 2)) >= min_contrast for a in avoid):
            break
    return c


def _shape_mask(code: int, r: int, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Pixels of shape ``SHAPES[code]`` of half-size ``r`` at integer offsets ``(dy, dx)`` from its centre."""
    ay, ax = np.abs(dy), np.abs(dx)
    inside = np.maximum(ay, ax) <= r
    if SHAPES[code] == "disc":
        return dy * dy + dx * dx <= r * r + r
    if SHAPES[code] == "diamond":
        return ay + ax <= r
    if SHAPES[code] == "cross":
        return inside & (np.minimum(ay, ax) <= r // 2)
    return inside


def _uniform_int(rng: np.random.Generator, bounds: tuple) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


def make_clip(seed: int, num_frames: int, config: WorldConfig = WorldConfig()) -> tuple[np.ndarray, ClipMeta]:
    """Draws a random scene from ``seed`` and renders ``num_frames`` frames of the camera looping over it.

    Frame ``t`` is the view at phase ``t mod P``; the ``P`` distinct views are rendered once (vectorised) and
    tiled, so a clip of any length costs about the same (~3 ms on one core).

    Args:
        seed: any non-negative int; the same seed (and config) gives the same clip bit for bit.
        num_frames: T >= 0.
        config: the world's parameters.
    Returns:
        ``(frames, meta)``: frames ``[T, C, H, W]`` float32, and the ground truth :class:`ClipMeta`.
    """
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    cfg, rng = config, np.random.default_rng(seed)
    C, S = cfg.channels, cfg.size
    P = _uniform_int(rng, cfg.period)
    R = _uniform_int(rng, cfg.camera_radius)
    side = S + 2 * R + 2 * cfg.pad
    t = np.arange(P)

    # The scene: background, then static rectangles painted in order.
    background = _colour(rng, C, [], 0.0)
    world = np.broadcast_to(background[:, None, None], (C, side, side)).copy()
    covered = np.zeros((side, side), dtype=bool)
    palette = [background]
    for _ in range(cfg.patches):
        h, w = _uniform_int(rng, cfg.patch_size), _uniform_int(rng, cfg.patch_size)
        y, x = int(rng.integers(0, side - h + 1)), int(rng.integers(0, side - w + 1))
        colour = _colour(rng, C, [background], cfg.min_contrast)
        world[:, y:y + h, x:x + w] = colour[:, None, None]
        covered[y:y + h, x:x + w] = True
        palette.append(colour)

    # The camera: its view's centre goes round a circle of radius R about the world's centre once per period.
    angle0, direction = rng.uniform(0, 2 * np.pi), (1 if rng.integers(0, 2) else -1)
    theta = angle0 + direction * 2 * np.pi * t / P
    camera = np.stack([_round(cfg.pad + R + R * np.sin(theta)), _round(cfg.pad + R + R * np.cos(theta))], axis=1)
    rows = camera[:, 0, None] + np.arange(S)                                 # [P, S]
    cols = camera[:, 1, None] + np.arange(S)
    views = world[:, rows[:, :, None], cols[:, None, :]].transpose(1, 0, 2, 3)  # [P, C, S, S]
    scenery = covered[rows[:, :, None], cols[:, None, :]]                    # [P, S, S]

    # The objects: each orbits its own centre k times per period; redrawn (at most 100 times) until it shows in at
    # least a quarter of the phases and hides in at least a quarter, so that it leaves the view and comes back.
    n = cfg.objects
    shape, colours = np.zeros(n, dtype=np.int64), np.zeros((n, C), dtype=np.float32)
    centre, drawn = np.zeros((P, n, 2), dtype=np.int64), np.zeros((n, P, S, S), dtype=bool)
    yy, xx = np.arange(S)[None, :, None], np.arange(S)[None, None, :]
    for j in range(n):
        shape[j] = rng.integers(0, len(SHAPES))
        r = _uniform_int(rng, cfg.object_radius)
        colours[j] = _colour(rng, C, palette, cfg.min_contrast)              # background, patches, objects so far
        for _ in range(100):
            oy, ox = rng.uniform(0, side, size=2)
            orbit, k, phi = rng.uniform(*cfg.orbit_radius), int(rng.choice(cfg.orbit_cycles)), rng.uniform(0, 2 * np.pi)
            a = phi + k * 2 * np.pi * t / P
            world_pos = np.stack([_round(oy + orbit * np.sin(a)), _round(ox + orbit * np.cos(a))], axis=1)
            centre[:, j] = world_pos - camera
            drawn[j] = _shape_mask(int(shape[j]), r, yy - centre[:, j, 0, None, None], xx - centre[:, j, 1, None, None])
            shows = np.count_nonzero(drawn[j].sum(axis=(1, 2)) >= cfg.min_pixels)
            if P // 4 <= shows <= P - P // 4:
                break
        palette.append(colours[j])

    # Paint in order (a later object covers an earlier one); visible masks are what remains uncovered.
    masks = np.zeros((P, n, S, S), dtype=bool)
    above = np.zeros((P, S, S), dtype=bool)
    for j in reversed(range(n)):
        masks[:, j] = drawn[j] & ~above
        above |= drawn[j]
        views = np.where(masks[:, j, None], colours[j][None, :, None, None], views)

    meta = ClipMeta(seed=int(seed), period=P, phase=np.arange(num_frames, dtype=np.int64) % P,
                    views=np.ascontiguousarray(views, dtype=np.float32), camera=camera, background=background,
                    background_mask=~scenery & ~above, palette=np.stack(palette).astype(np.float32),
                    object_shape=shape, object_colour=colours, object_centre=centre, object_mask=masks,
                    min_pixels=cfg.min_pixels)
    return meta.frames(), meta


def sample_windows(rng: Union[int, np.random.Generator], batch: int, length: int,
                   config: WorldConfig = WorldConfig()) -> tuple[np.ndarray, list[ClipMeta]]:
    """A training batch: ``batch`` windows of ``length`` consecutive frames, each from a fresh random clip and
    starting at a random phase.

    Args:
        rng: a ``numpy.random.Generator`` (advanced: successive calls give new clips) or an int seed.
        batch: B >= 1; length: L >= 1 frames per window.
        config: the world's parameters.
    Returns:
        ``(frames, metas)``: ``[B, L, C, H, W]`` float32 and one :class:`ClipMeta` per window (its ``phase``
        starts at the window's first phase).
    """
    if batch < 1 or length < 1:
        raise ValueError(f"batch and length must be >= 1, got {batch}, {length}")
    rng = np.random.default_rng(rng) if isinstance(rng, (int, np.integer)) else rng
    frames, metas = [], []
    for seed in rng.integers(0, 2 ** 63 - 1, size=batch):
        start = int(rng.integers(0, config.period[1]))
        clip, meta = make_clip(int(seed), start + length, config)
        frames.append(clip[start:])
        metas.append(meta.window(start, length))
    return np.stack(frames), metas
