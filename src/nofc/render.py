"""Heatmap pictures: class probability maps drawn over the image where the windows are.

Cell ``(i, j)`` of a map computed with step ``(ty, tx)`` is drawn as a ``ty x tx`` square
centred on its window's centre ``(oy + i*ty + wh/2, ox + j*tx + ww/2)`` (pixel ``k`` spans
``[k, k+1)``), and the squares are smoothed by bilinear interpolation. The half window at
each border has no cell centre and stays uncoloured. One dashed box shows the size of one
window. Uses matplotlib with the Agg backend (no display needed).
"""

from __future__ import annotations

import math

import numpy as np

from .errors import NofcError

__all__ = ["render_heatmap", "map_extent"]


def map_extent(geo, step, shape) -> tuple[float, float, float, float]:
    """matplotlib ``extent`` (left, right, bottom, top) of an ``(h, w)`` map in pixels.

    >>> from types import SimpleNamespace as N
    >>> map_extent(N(offset=(0, 0), window=(32, 32)), (4, 4), (9, 3))
    (14.0, 26.0, 50.0, 14.0)
    """
    h, w = shape
    ty, tx = step
    cy0 = geo.offset[0] + geo.window[0] / 2
    cx0 = geo.offset[1] + geo.window[1] / 2
    return (cx0 - tx / 2, cx0 + (w - 1) * tx + tx / 2,
            cy0 + (h - 1) * ty + ty / 2, cy0 - ty / 2)


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
    """
    plt = _pyplot()
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3 or len(labels) != probs.shape[0]:
        raise NofcError(f"internal: {probs.shape} maps for {len(labels)} labels")
    img = np.moveaxis(np.asarray(image, dtype=np.float32), 0, -1).clip(0, 1)  # (H, W, C)
    gray = img.shape[-1] == 1
    H, W = img.shape[:2]
    n = probs.shape[0]
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    aspect = H / W
    fig, axes = plt.subplots(rows, cols, squeeze=False,
                             figsize=(panel * cols + 0.9, panel * aspect * rows + 0.7))
    extent = map_extent(geo, step, probs.shape[1:])
    shown = None
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(img[..., 0] if gray else img, cmap="gray" if gray else None, vmin=0, vmax=1,
                  extent=(0, W, H, 0), interpolation="nearest")
        shown = ax.imshow(probs[k], cmap=cmap, vmin=0.0, vmax=1.0, alpha=alpha,
                          extent=extent, interpolation="bilinear")
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        wy, wx = geo.window
        ax.add_patch(plt.Rectangle((geo.offset[1], geo.offset[0]), wx, wy, fill=False,
                                   edgecolor="cyan", linestyle="--", linewidth=1.0))
        for y, x, text in marks or ():
            ax.text(x, y, text, color="cyan", fontsize=7, ha="center", va="center",
                    fontweight="bold")
        ax.set_title(f"{labels[k]}  (max {probs[k].max():.2f})", fontsize=10)
    if shown is not None:
        cbar = fig.colorbar(shown, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02)
        cbar.set_label("class probability")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)


def _class_names(model, k: int, labels_file=None) -> list[str]:
    """Names for the K outputs: a labels file, torchvision's ImageNet list, or indices."""
    if labels_file is not None:
        from pathlib import Path

        p = Path(labels_file)
        if not p.is_file():
            raise NofcError(f"labels file not found: {labels_file}")
        names = [line.strip() for line in p.read_text().splitlines() if line.strip()]
        if len(names) != k:
            raise NofcError(f"{labels_file} has {len(names)} names, the model {k} classes")
        return names
    if k == 1000 and type(model).__module__.startswith("torchvision."):
        try:
            from torchvision.models import ResNet50_Weights

            return list(ResNet50_Weights.DEFAULT.meta["categories"])
        except Exception:  # noqa: BLE001 - names are a nicety
            pass
    return [str(i) for i in range(k)]


def _default_norm(model, spec: str, channels: int):
    """The normalisation the model was trained with, when it is known."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and "mean" in cfg and "std" in cfg:
        return tuple(cfg["mean"]), tuple(cfg["std"])
    if str(spec).startswith("torchvision:") and channels == 3:
        from .images import IMAGENET_MEAN, IMAGENET_STD

        return IMAGENET_MEAN, IMAGENET_STD
    return None, None


def heatmap(
    model,
    image_path,
    input_size,
    output,
    *,
    spec: str = "",
    cls: int | None = None,
    top: int | None = None,
    step=None,
    scores_path=None,
    mean=None,
    std=None,
    labels_file=None,
    device=None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Load, normalise, convert, predict densely, draw; what ``nofc heatmap`` does.

    Writes ``output`` (PNG) and, when given, ``scores_path``: ``.npz`` with ``scores``
    (K, h, w) raw logits, ``boxes`` (h, w, 4) window of every cell, ``step``, ``stride``,
    ``offset``, ``window``, ``exact``, ``image_shape`` and ``geometry`` (JSON text); or
    ``.npy`` with the scores and the same fields in a ``.json`` file next to it.
    Returns a summary (classes drawn, map shape, geometry).
    """
    from pathlib import Path

    import torch

    from .dense import _check_step, _geometry, dense_predict
    from .images import load_image, normalize
    from .io import atomic_output

    outputs = [Path(output)] + ([Path(scores_path)] if scores_path else [])
    if scores_path and Path(scores_path).suffix.lower() == ".npy":
        outputs.append(Path(scores_path).with_suffix(".json"))
    if scores_path and Path(scores_path).suffix.lower() not in (".npz", ".npy"):
        raise NofcError(f"--scores must end in .npz or .npy, got {scores_path}")
    if Path(output).suffix.lower() != ".png":
        raise NofcError(f"the heatmap is a PNG: give an output ending in .png, got {output}")
    for p in outputs:  # refuse before the long part
        if p.exists() and not force:
            raise NofcError(f"{p} exists; pass --force to overwrite it")
    if top is not None and top < 1:
        raise NofcError(f"--top must be at least 1, got {top}")

    from .convert import convert

    size = tuple(input_size)
    raw = load_image(image_path, channels=size[0])  # (C, H, W) in [0, 1]
    if mean is None and std is None:
        mean, std = _default_norm(model, spec, size[0])
    x = torch.from_numpy(normalize(raw, mean, std))
    fcn = convert(model, size)
    geo = _geometry(fcn, size)
    steps = _check_step(step, geo)
    logits = dense_predict(fcn, x, size, steps, device=device, progress=progress)[0]
    logits = logits.float().cpu()  # (K, h, w)
    probs = torch.softmax(logits, dim=0).numpy()
    k = probs.shape[0]
    names = _class_names(model, k, labels_file)
    if cls is not None:
        if not 0 <= cls < k:
            raise NofcError(f"--class {cls} is out of range: the model has classes 0..{k - 1}")
        chosen = [cls]
    else:
        chosen = list(np.argsort(-probs.reshape(k, -1).max(1), kind="stable")[: top or 1])
    labels = [f"{names[c]} ({c})" if names[c] != str(c) else f"class {c}" for c in chosen]
    h, w = probs.shape[1:]
    info = geo.as_dict()
    info.update(step=list(steps), image_shape=list(raw.shape), map_shape=[h, w],
                mean=None if mean is None else list(map(float, np.ravel(mean))),
                std=None if std is None else list(map(float, np.ravel(std))))
    ys = geo.offset[0] + steps[0] * np.arange(h)
    xs = geo.offset[1] + steps[1] * np.arange(w)
    boxes = np.stack(np.broadcast_arrays(ys[:, None], xs[None, :], ys[:, None] + geo.window[0],
                                         xs[None, :] + geo.window[1]), -1).astype(np.int64)
    title = (f"{Path(str(image_path)).name}: {h}x{w} windows of {geo.window[0]}x{geo.window[1]}, "
             f"step {steps[0]}x{steps[1]}" + ("" if geo.exact else " (padded net: not exact)"))
    with atomic_output(output, force=force) as tmp:
        render_heatmap(tmp, raw, probs[chosen], labels, geo, steps, title=title)
        if scores_path:
            _save_scores(scores_path, logits.numpy(), boxes, info, force=force)
    return {"classes": [int(c) for c in chosen], "labels": labels, "map_shape": (h, w),
            "geometry": info, "max_prob": [float(probs[c].max()) for c in chosen]}


def _save_scores(path, scores, boxes, info, *, force) -> None:
    import json
    from pathlib import Path

    from .io import atomic_output

    if Path(path).suffix.lower() == ".npz":
        with atomic_output(path, force=force) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, scores=scores, boxes=boxes,
                         step=np.array(info["step"]), stride=np.array(info["stride"]),
                         offset=np.array(info["offset"]), window=np.array(info["window"]),
                         exact=np.array(info["exact"]), image_shape=np.array(info["image_shape"]),
                         geometry=np.array(json.dumps(info)))
        return
    side = Path(path).with_suffix(".json")
    with atomic_output(side, force=force) as tmp_json:
        Path(tmp_json).write_text(json.dumps(info, indent=2))
        with atomic_output(path, force=force) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, scores)
