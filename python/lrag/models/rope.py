"""3-axis rotary position embedding of the Wan DiT, applied by frame position at attention time.

Head dim ``d`` = ``c = d/2`` complex pairs formed from adjacent real dims ``(2i, 2i+1)``, split
``[c - 2(c//3) | c//3 | c//3]`` into temporal, height and width pairs. An axis with ``n`` pairs rotates pair ``j``
at position ``p`` by ``p * theta^(-2j / 2n)``. The rotation is a complex multiply in float64, cast back to the
activation dtype (as the reference release does; this is what makes a float32 CPU run bit-exact).
"""
from __future__ import annotations

import collections

import torch

_FACTOR_CACHE = 8  # rotation tables kept per Rope3D: a forward needs 2-3 (query, block, memory), for every layer


def axis_table(max_positions: int, pairs: int, theta: float) -> torch.Tensor:
    """``[max_positions, pairs]`` complex128 table ``exp(i * p * theta^(-2j/(2 pairs)))``."""
    # explicitly on the CPU, so that building the model under a meta / cuda device context keeps real tables
    inv = 1.0 / torch.pow(theta, torch.arange(0, 2 * pairs, 2, dtype=torch.float64, device="cpu").div(2 * pairs))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64, device="cpu"), inv)
    return torch.polar(torch.ones_like(angles), angles)


class Rope3D:
    """RoPE for tokens laid out ``[frames, h * w]`` (frame-major, then h, then w).

    Args:
        head_dim: even head dimension ``d``.
        grid: token grid ``(h, w)`` of one frame.
        max_positions: table length per axis (1024 in Wan).
        theta: base (10000 in Wan).
    """

    def __init__(self, head_dim: int, grid: tuple[int, int], max_positions: int = 1024, theta: float = 10000.0):
        c = head_dim // 2
        self.split = (c - 2 * (c // 3), c // 3, c // 3)
        self.max_positions = max_positions
        h, w = grid
        if max(h, w) > max_positions:
            raise ValueError(f"token grid {grid} exceeds the RoPE table length {max_positions}")
        self.temporal = axis_table(max_positions, self.split[0], theta)                     # [P, ct]
        height = axis_table(max_positions, self.split[1], theta)[:h]                          # [h, ch]
        width = axis_table(max_positions, self.split[2], theta)[:w]                           # [w, cw]
        self.spatial = torch.cat([height[:, None, :].expand(h, w, -1), width[None, :, :].expand(h, w, -1)],
                                 dim=-1).reshape(h * w, -1)                                   # [T, ch + cw]
        self._factors: collections.OrderedDict = collections.OrderedDict()

    def to(self, device: torch.device) -> "Rope3D":
        if self.temporal.device != torch.device(device):
            self.temporal = self.temporal.to(device)
            self.spatial = self.spatial.to(device)
            self._factors.clear()
        return self

    def cached_factors(self, positions: torch.Tensor) -> torch.Tensor:
        """:meth:`factors` of host ``positions``, built once and reused while they recur: every layer of a forward
        and every forward of a block rotate by the same positions, so their tables are built once per block
        instead of once per layer and call (and the positions are copied to the device once)."""
        if positions.device.type != "cpu":
            return self.factors(positions)
        key = (tuple(positions.shape), tuple(positions.flatten().tolist()))
        table = self._factors.get(key)
        if table is None:
            self._check(positions)  # on the host: no synchronisation
            table = self._factors[key] = self._build(positions.to(self.temporal.device))
            if len(self._factors) > _FACTOR_CACHE:
                self._factors.popitem(last=False)
        else:
            self._factors.move_to_end(key)
        return table

    def factors(self, positions: torch.Tensor) -> torch.Tensor:
        """Complex128 rotation ``[..., F, T, 1, c]`` of frames at temporal ``positions`` ``[..., F]`` (int64)."""
        self._check(positions)
        return self._build(positions)

    def _check(self, positions: torch.Tensor) -> None:
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= self.max_positions):
            raise ValueError(f"RoPE positions must lie in [0, {self.max_positions}), got {positions.tolist()}")

    def _build(self, positions: torch.Tensor) -> torch.Tensor:
        t = self.temporal[positions]                                                           # [..., F, ct]
        T = self.spatial.shape[0]
        t = t.unsqueeze(-2).expand(*t.shape[:-1], T, t.shape[-1])                            # [..., F, T, ct]
        return torch.cat([t, self.spatial.expand(*t.shape[:-1], -1)], dim=-1).unsqueeze(-2)

    def apply(self, x: torch.Tensor, positions: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rotates ``x`` ``[B, F, T, H, d]`` with frame ``i`` at temporal position ``positions[i]`` (``[F]``), or
        ``positions[b, i]`` per stream (``[B, F]``).

        Returns a tensor of ``x``'s shape and dtype (contiguous), or writes it into ``out`` (same shape, any
        strides, e.g. a slice of an attention buffer) and returns ``out``: the same bits as
        ``out.copy_(apply(x))`` (rounded to ``x``'s dtype first), one copy fewer when ``out`` has ``x``'s dtype.
        """
        B, F, T, H, d = x.shape
        if out is not None and out.shape != x.shape:
            raise ValueError(f"out must have x's shape {tuple(x.shape)}, got {tuple(out.shape)}")
        self.to(x.device)
        xc = torch.view_as_complex(x.to(torch.float64).reshape(B, F, T, H, d // 2, 2))
        rotated = torch.view_as_real(xc * self.cached_factors(positions)).flatten(-2)
        if out is None:
            return rotated.to(x.dtype)
        # rounding float64 -> bf16 -> float32 is not float64 -> float32: keep x's rounding when out differs
        return out.copy_(rotated if out.dtype == x.dtype else rotated.to(x.dtype))
