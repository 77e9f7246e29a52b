"""``retrieval.png``: which past frames every block retrieved, and how similar they were (matplotlib, Agg)."""
from __future__ import annotations

import os


def plot_retrieval(records: list[dict], path: str | os.PathLike, num_blocks: int, frames_per_block: int,
                   stream: int = 0, title: str = "retrieval") -> list[tuple[int, int, float]]:
    """Draws the memory log of one stream: a point per retrieved frame at (block, global frame), coloured by
    cosine similarity; the grey line is the block's query frame ``s - 1``. Blocks without retrieval have no
    points. Returns the points drawn, ``(block, global frame, similarity)``.

    Args:
        records: the block records of :attr:`lrag.pipeline.BlockResult.memory_record` (one list per stream in
            ``selected_global_frames`` / ``selected_similarities``).
        num_blocks: blocks generated (the x range).
        frames_per_block: to draw the query-frame line.
    """
    import matplotlib  # noqa: PLC0415  (optional dependency)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    xs, ys, cs = [], [], []
    for rec in records:
        frames = rec["selected_global_frames"][stream]
        sims = rec["selected_similarities"][stream]
        xs += [rec["block"]] * len(frames)
        ys += list(frames)
        cs += list(sims)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    blocks = range(max(num_blocks, 1))
    ax.plot(blocks, [max(b * frames_per_block - 1, 0) for b in blocks], color="0.7", lw=1,
            label="query frame (s - 1)")
    if xs:
        sc = ax.scatter(xs, ys, c=cs, cmap="viridis", s=18, edgecolors="none")
        fig.colorbar(sc, ax=ax, label="cosine similarity")
    ax.set_xlabel("block")
    ax.set_ylabel("retrieved global latent frame")
    ax.set_xlim(-0.5, max(num_blocks, 1) - 0.5)
    ax.set_ylim(-0.5, max(num_blocks * frames_per_block, 1))
    ax.set_title(f"{title}: {len(records)} of {num_blocks} blocks retrieved, {len(xs)} frames in all")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    plt.close(fig)
    return list(zip(xs, ys, cs))
