"""Few-step flow-matching sampler of Self-Forcing / LongLive (shift 5, 4 warped steps + a t = 0 context rerun).

The table (1000 training steps, sigma_min 0, one extra step dropped, float32 like the reference)::

    s_i = 1 - i/1000 (i = 0..999),   sigma_i = shift s_i / (1 + (shift - 1) s_i),   t_i = 1000 sigma_i

- ``warp(steps)``: a nominal step ``n`` (e.g. 750) maps to the table entry ``t_{1000-n}``; 0 maps to 0.
  ``[1000, 750, 500, 250]`` -> ``[1000, 937.5, 833.33, 625]``.
- ``sigma(t)``: sigma of the table entry whose ``t_i`` is nearest to ``t`` (for t = 0 that is t ~ 4.98).
- ``to_x0``: ``x0 = x_t - sigma(t) * flow`` in float64, cast back.
- ``add_noise``: ``x_t = (1 - sigma) x0 + sigma eps`` in float32 with the table sigma.
"""
from __future__ import annotations

import torch


class FlowMatchScheduler:
    """The sigma/timestep table and the conversions the block loop needs.

    Args:
        shift: timestep shift (5.0 for the released few-step generators).
        num_train_timesteps: table length (1000).
    """

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000):
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        s = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float32)[:-1]
        self.sigmas = shift * s / (1 + (shift - 1) * s)                  # [N] float32, descending
        self.timesteps = self.sigmas * num_train_timesteps               # [N] float32
        self._tables: dict = {}

    def warp(self, steps) -> torch.Tensor:
        """Nominal denoising steps (ints in [0, N]) -> the table's float32 timesteps."""
        steps = torch.as_tensor(steps, dtype=torch.long)
        if steps.numel() == 0 or int(steps.min()) < 0 or int(steps.max()) > self.num_train_timesteps:
            raise ValueError(f"denoising steps must be non-empty and in [0, {self.num_train_timesteps}], "
                             f"got {steps.tolist()}")
        table = torch.cat([self.timesteps, torch.zeros(1)])
        return table[self.num_train_timesteps - steps]

    def _table(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, sigmas) in ``dtype`` on ``device``, cached so that lookups never copy to the host."""
        key = (dtype, device)
        if key not in self._tables:
            self._tables[key] = (self.timesteps.to(device, dtype), self.sigmas.to(device, dtype))
        return self._tables[key]

    def sigma(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Sigma ``[N]`` of the table entry nearest to each of ``t`` ``[N]`` (looked up in ``dtype``, on ``t``'s
        device)."""
        t = torch.as_tensor(t).reshape(-1)
        timesteps, sigmas = self._table(dtype, t.device)
        return sigmas[torch.argmin((timesteps[None, :] - t.to(dtype)[:, None]).abs(), dim=1)]

    def to_x0(self, flow: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x0 = x_t - sigma(t) flow`` in float64, returned in ``flow``'s dtype.

        Args:
            flow, x_t: ``[B, F, C, H, W]``.
            t: ``[B, F]`` timesteps.
        """
        sigma = self.sigma(t.to(flow.device), torch.float64).reshape(*t.shape, 1, 1, 1)
        return (x_t.double() - sigma * flow.double()).to(flow.dtype)

    def euler_step(self, x_t: torch.Tensor, flow: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        """One deterministic Euler (= DDIM) step of the flow ODE: ``x_t + (sigma(t_next) - sigma(t)) flow`` in
        float64, returned in ``x_t``'s dtype: the sampler of a model trained with the flow-matching loss and not
        distilled (the toy generator).

        Args:
            x_t, flow: ``[B, F, C, H, W]``.
            t, t_next: ``[B, F]`` timesteps of this step and the next.
        """
        shape = (*t.shape, 1, 1, 1)
        step = (self.sigma(t_next.to(x_t.device), torch.float64) - self.sigma(t.to(x_t.device), torch.float64))
        return (x_t.double() + step.reshape(shape) * flow.double()).to(x_t.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``(1 - sigma) x0 + sigma noise`` with the table sigma in float32 (the reference's ``add_noise``).

        Args:
            x0, noise: ``[B, F, C, H, W]``.
            t: ``[B, F]`` timesteps of the next step.
        """
        if noise.shape != x0.shape:
            raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
        sigma = self.sigma(t.to(x0.device)).reshape(*t.shape, 1, 1, 1)
        return ((1 - sigma) * x0 + sigma * noise).type_as(noise)
