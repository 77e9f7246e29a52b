"""Is PyTorch's complex128 multiply one formula? (Why RoPE stays a float64 complex multiply in the generator.)

    .venv/bin/python benchmarks/complex_mul_bits.py

The generator rotates q/k like the release: float32 -> complex128, times the rotation table, back to float32. A fused
kernel could skip the two copies only if it reproduced ``torch.mul`` on complex128 bit for bit. This compares that
multiply, for the broadcast pattern of RoPE (``[.., T, H, c] * [.., T, 1, c]``, and a plain ``[rows, c]``), with the
textbook ``(ac - bd, ad + bc)`` computed by separately rounded float64 ops, and prints how many elements differ per
inner size ``c`` (= head_dim / 2). A non-zero count means the installed build uses another formula somewhere (e.g. a
fused multiply-add in the scalar tail of its vectorised loop). Nothing is asserted.
"""
from __future__ import annotations

import torch


def differing(x_shape, f_shape, seed: int = 0) -> int:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=gen)
    angles = torch.rand(f_shape, generator=gen, dtype=torch.float64) * 100
    f = torch.polar(torch.ones_like(angles), angles)
    xc = torch.view_as_complex(x.double().reshape(*x_shape[:-1], -1, 2))
    got = torch.view_as_real(xc * f)
    a, b, c, d = xc.real, xc.imag, f.real.expand_as(xc.real), f.imag.expand_as(xc.real)
    return int((got[..., 0] != a * c - b * d).sum() + (got[..., 1] != a * d + b * c).sum())


def main() -> None:
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("| c = head_dim/2 | RoPE pattern [2,3,5,2,2c]*[3,5,1,c]: elements differing | plain [7,2c]*[7,c] |")
    print("|---:|---:|---:|")
    for c in (1, 2, 3, 5, 6, 7, 8, 22, 32, 64):
        print(f"| {c} | {differing((2, 3, 5, 2, 2 * c), (3, 5, 1, c))} of {2 * 2 * 3 * 5 * 2 * c} "
              f"| {differing((7, 2 * c), (7, c))} of {2 * 7 * c} |")


if __name__ == "__main__":
    main()
