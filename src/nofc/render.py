"""Heatmap pictures: class probability maps drawn over the image where the windows are.

Cell ``(i, j)`` of a map computed with step ``(ty, tx)`` is drawn as a ``ty x tx`` square
centred on its window's centre ``(oy + i*ty + wh/2, ox + j*tx + ww/2)`` (pixel ``k`` spans
``[k, k+1)``), and the squares are smoothed by bilinear interpolation. The half window at
each border has no cell centre and stays uncoloured. One dashed box shows the size of one
window. Uses matplotlib with the Agg backend (no display needed).

This module only draws what it is given; ``nofc.heatmap`` computes the maps.
"""

from __future__ import annotations

import math
import textwrap

import numpy as np

from .errors import NofcError

__all__ = ["render_heatmap"]


def _peak(a: np.ndarray) -> float:
    """Largest finite value (NaN cells come from NaN/Inf pixels); NaN when there is none."""
    finite = a[np.isfinite(a)]
    return float(finite.max()) if finite.size else float("nan")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise NofcError("drawing heatmaps needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def render_heatmap(
    path,
    image: np.ndarray,
    probs: np.ndarray,
    labels: list[str],
    geo,
    step,
    *,
    title: str | None = None,
    alpha: float = 0.55,
    cmap: str = "inferno",
    dpi: int = 100,
    marks=None,
    panel: float = 4.2,
    image_hw: tuple[int, int] | None = None,
) -> None:
    """Write a PNG: one panel per class, the image with that class's probability map.

    Args:
        path: output file (written directly: callers use ``nofc.io.atomic_output``).
        image: ``(C, H, W)`` float in [0, 1], for display (not normalised).
        probs: ``(N, h, w)`` probabilities in [0, 1], one map per panel.
        labels: ``N`` panel titles (class name or index).
        geo: the ``nofc.geometry`` of the network; ``step`` the map's ``(ty, tx)``.
        marks: optional ``(y, x, text)`` labels drawn on every panel (e.g. detections).
        panel: width of one panel in inches.
        image_hw: full-resolution ``(H, W)`` when ``image`` is a downsampled thumbnail.
    """
    plt = _pyplot()
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3 or len(labels) != probs.shape[0]:
        raise NofcError(f"internal: {probs.shape} maps for {len(labels)} labels")
    img = np.moveaxis(np.asarray(image, dtype=np.float32), 0, -1).clip(0, 1)  # (H, W, C)
    gray = img.shape[-1] == 1
    H, W = img.shape[:2] if image_hw is None else image_hw
    n = probs.shape[0]
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    aspect = H / W
    width = panel * cols + 0.9
    # a long title (a slide's file name) wraps to the figure's width: about 12 characters
    # of 10-point text per inch
    title_lines = textwrap.wrap(title, int(width * 12)) if title else []
    height = panel * aspect * rows + 0.7 + 0.18 * max(0, len(title_lines) - 1)
    fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(width, height))
    if title_lines:  # room above the panels' own titles for every line of it
        fig.subplots_adjust(top=1 - (0.45 + 0.18 * len(title_lines)) / height)
    extent = geo.extent(probs.shape[1:], step=step)
    shown = None
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(img[..., 0] if gray else img, cmap="gray" if gray else None, vmin=0, vmax=1,
                  extent=(0, W, H, 0), interpolation="nearest")
        # cells that saw NaN/Inf pixels are NaN: drawn in a colour of their own, not hidden
        shown = ax.imshow(probs[k], cmap=plt.get_cmap(cmap).with_extremes(bad="cyan"),
                          vmin=0.0, vmax=1.0, alpha=alpha, extent=extent,
                          interpolation="bilinear" if np.isfinite(probs[k]).all() else "nearest")
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        wy, wx = geo.window
        ax.add_patch(plt.Rectangle((geo.offset[1], geo.offset[0]), wx, wy, fill=False,
                                   edgecolor="cyan", linestyle="--", linewidth=1.0))
        for y, x, text in marks or ():
            ax.text(x, y, text, color="cyan", fontsize=7, ha="center", va="center",
                    fontweight="bold")
        ax.set_title(f"{labels[k]}  (max {_peak(probs[k]):.2f})", fontsize=10)
    if shown is not None:
        cbar = fig.colorbar(shown, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02)
        cbar.set_label("class probability")
    if title_lines:
        fig.suptitle("\n".join(title_lines), fontsize=10)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
