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

from .errors import NofcError, refuse_overwrite

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
    fig, axes = plt.subplots(rows, cols, squeeze=False,
                             figsize=(panel * cols + 0.9, panel * aspect * rows + 0.7))
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
    tile: int | None = None,
    out=None,
    scheduler: str | None = None,
    workers: int | None = None,
    verify: bool = False,
) -> dict:
    """Load, normalise, convert, predict densely, draw; what ``nofc heatmap`` does.

    Images above ``TILE_ABOVE`` pixels (or with ``tile``, ``out``, ``scheduler`` or
    ``workers`` given) go through :func:`nofc.tiled_predict`: TIFF is read lazily, the map
    can be written to a zarr store ``out``, and the PNG is drawn on a downsampled image.

    Writes ``output`` (PNG) and, when given, ``scores_path``: ``.npz`` with ``scores``
    (K, h, w) raw logits, ``boxes`` (h, w, 4) window of every cell, ``step``, ``stride``,
    ``offset``, ``window``, ``exact``, ``image_shape`` and ``geometry`` (JSON text); or
    ``.npy`` with the scores and the same fields in a ``.json`` file next to it.
    With ``verify``, the original classifier also runs crop by crop (float32, at the
    network stride) and ``info["verify"]`` is ``nofc.verify``'s report of the measured
    difference between the map and the crops.
    Returns a summary (classes drawn, map shape, geometry).
    """
    from pathlib import Path

    import torch

    from .dense import dense_predict
    from .windows import cached_geometry
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
        refuse_overwrite(p, force=force)
    if top is not None and top < 1:
        raise NofcError(f"--top must be at least 1, got {top}")

    from .conversion import convert

    size = tuple(input_size)
    if tile is not None or out is not None or scheduler is not None or workers is not None \
            or _pixels(image_path) > TILE_ABOVE:
        return _heatmap_tiled(model, image_path, size, output, spec=spec, cls=cls, top=top,
                              step=step, scores_path=scores_path, mean=mean, std=std,
                              labels_file=labels_file, device=device, force=force,
                              progress=progress, tile=tile or 2048, out=out,
                              scheduler=scheduler, workers=workers)
    raw = load_image(image_path, channels=size[0])  # (C, H, W) in [0, 1]
    if mean is None and std is None:
        mean, std = _default_norm(model, spec, size[0])
    x = torch.from_numpy(normalize(raw, mean, std))
    fcn = convert(model, size)
    geo = cached_geometry(fcn, size)
    steps = geo.check_step(step)
    logits = dense_predict(fcn, x, size, steps, device=device, progress=progress)[0]
    logits = logits.float().cpu()  # (K, h, w)
    probs = torch.softmax(logits, dim=0).numpy()
    k = probs.shape[0]
    names = _class_names(model, k, labels_file)
    chosen, labels = _choose_classes(cls, top, np.array([_peak(p) for p in probs]), names)
    h, w = probs.shape[1:]
    info = geo.as_dict()
    if verify:
        from .verification import verify as _verify

        info["verify"] = str(_verify(model, fcn, size, image=x, dtype=torch.float32,
                                     device=device))
    info.update(step=list(steps), image_shape=list(raw.shape), map_shape=[h, w],
                mean=None if mean is None else list(map(float, np.ravel(mean))),
                std=None if std is None else list(map(float, np.ravel(std))))
    boxes = geo.boxes(raw.shape[1:], step=steps)
    title = (f"{Path(str(image_path)).name}: {h}x{w} windows of {geo.window[0]}x{geo.window[1]}, "
             f"step {steps[0]}x{steps[1]}" + ("" if geo.exact else " (padded net: not exact)"))
    with atomic_output(output, force=force) as tmp:
        render_heatmap(tmp, raw, probs[chosen], labels, geo, steps, title=title)
        if scores_path:
            _save_scores(scores_path, logits.numpy(), boxes, info, force=force)
    return {"classes": [int(c) for c in chosen], "labels": labels, "map_shape": (h, w),
            "geometry": info, "max_prob": [_peak(probs[c]) for c in chosen]}


def _choose_classes(cls, top, peaks, names):
    """The classes to draw (``--class`` or the ``--top`` peaks) and their panel titles."""
    k = len(names)
    if cls is not None:
        if not 0 <= cls < k:
            raise NofcError(f"--class {cls} is out of range: the model has classes 0..{k - 1}")
        chosen = [cls]
    else:
        chosen = list(np.argsort(-np.nan_to_num(peaks, nan=-1.0), kind="stable")[: top or 1])
    labels = [f"{names[c]} ({c})" if names[c] != str(c) else f"class {c}" for c in chosen]
    return chosen, labels


TILE_ABOVE = 4096 * 4096  # pixels: larger images are tiled automatically
_THUMB = 2048  # longest side of the image drawn under a tiled map


def _pixels(image_path) -> int:
    """Pixel count of an image file without decoding it (0 when unknown)."""
    from pathlib import Path

    p = Path(image_path)
    try:
        if p.suffix.lower() in (".tif", ".tiff", ".btf"):
            import tifffile

            with tifffile.TiffFile(p) as tif:
                shape = tif.series[0].shape
                axes = tif.series[0].axes
            return int(np.prod([n for n, a in zip(shape, axes) if a in "YX"]))
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None
        with Image.open(p) as im:
            return im.size[0] * im.size[1]
    except Exception:  # noqa: BLE001 - unreadable files fail later with a clear message
        return 0


def _thumbnail(src, layout: str, hw, channels: int) -> np.ndarray:
    """``(C, h, w)`` float image in [0, 1], every f-th pixel, for drawing under the map."""
    f = max(1, -(-max(hw) // _THUMB))
    if layout == "chw":
        arr = np.asarray(src[:, ::f, ::f])
        arr = np.moveaxis(arr, 0, -1)
    else:
        arr = np.asarray(src[::f, ::f])
    if hasattr(arr, "compute"):
        arr = arr.compute()
    arr = arr.astype(np.float32) * (1.0 / np.iinfo(arr.dtype).max
                                    if np.issubdtype(np.asarray(src[:1, :1]).dtype, np.integer)
                                    else 1.0)
    if arr.ndim == 2:
        arr = arr[..., None]
    return np.moveaxis(arr, -1, 0).clip(0, 1)


def _heatmap_tiled(model, image_path, size, output, *, spec, cls, top, step, scores_path, mean,
                   std, labels_file, device, force, progress, tile, out, scheduler, workers):
    """The heatmap of a large image: tiled map (optionally to zarr), drawn downsampled."""
    import sys
    from pathlib import Path

    import torch

    from .conversion import convert
    from .windows import cached_geometry
    from .io import atomic_output
    from .tiling import _layout, _spatial_shape, open_image_array, tiled_predict

    src = open_image_array(image_path)
    layout = _layout(tuple(src.shape), size[0], "auto")
    H, W = _spatial_shape(tuple(src.shape), layout)
    if mean is None and std is None:
        mean, std = _default_norm(model, spec, size[0])
    fcn = convert(model, size)
    geo = cached_geometry(fcn, size)
    steps = geo.check_step(step)
    backend = "dask" if scheduler is not None or workers is not None else "local"
    print(f"image {H}x{W} ({H * W / 1e6:.1f} Mpix): tiled with tile {tile} (tiling is "
          f"automatic above {TILE_ABOVE / 1e6:.1f} Mpix), backend {backend}"
          + (f", map to {out}" if out else ""), file=sys.stderr)
    names_meta = None
    scores = tiled_predict(fcn, src, size, tile=tile, out=out, backend=backend,
                           step=None if steps == geo.stride else steps, layout=layout,
                           mean=mean, std=std, scheduler=scheduler, workers=workers,
                           device=device, progress=progress, metadata=names_meta)
    k, h, w = scores.shape
    rows = max(1, (64 << 20) // max(1, 4 * k * w))  # softmax in blocks of about 64 MB
    peak = np.zeros(k, dtype=np.float32)
    for r in range(0, h, rows):
        block = torch.from_numpy(np.asarray(scores[:, r:r + rows], dtype=np.float32))
        peak = np.fmax(peak, torch.softmax(block, 0).nan_to_num(nan=-1.0).amax((1, 2)).numpy())
    chosen, labels = _choose_classes(cls, top, peak, _class_names(model, k, labels_file))
    # the drawn map: every f-th cell when the map is larger than the picture can show
    f = max(1, -(-max(h, w) // _THUMB))
    probs = np.zeros((len(chosen), -(-h // f), -(-w // f)), dtype=np.float32)
    for r in range(0, h, rows):
        block = torch.from_numpy(np.asarray(scores[:, r:r + rows], dtype=np.float32))
        first = (-r) % f  # first row of this block on the f-grid
        kept = torch.softmax(block, 0).numpy()[chosen][:, first::f, ::f]
        probs[:, (r + first) // f:(r + first) // f + kept.shape[1]] = kept
    drawn_steps = (steps[0] * f, steps[1] * f)
    info = geo.as_dict()
    info.update(step=list(steps), image_shape=[size[0], H, W], map_shape=[h, w],
                mean=None if mean is None else list(map(float, np.ravel(mean))),
                std=None if std is None else list(map(float, np.ravel(std))), tile=tile)
    thumb = _thumbnail(src, layout, (H, W), size[0])
    if thumb.shape[0] != size[0] and thumb.shape[0] in (2, 4):
        thumb = thumb[:-1]
    title = (f"{Path(str(image_path)).name}: {h}x{w} windows of {geo.window[0]}x{geo.window[1]}"
             f", step {steps[0]}x{steps[1]}, tiled" + ("" if geo.exact else " (padded net)")
             + (f", drawn every {f}th cell" if f > 1 else ""))
    with atomic_output(output, force=force) as tmp:
        render_heatmap(tmp, thumb, probs, labels, geo, drawn_steps, title=title,
                       image_hw=(H, W))
        if scores_path:
            _save_scores(scores_path, np.asarray(scores[:]), geo.boxes((H, W), step=steps),
                         info, force=force)
    return {"classes": [int(c) for c in chosen], "labels": labels, "map_shape": (h, w),
            "geometry": info, "max_prob": [float(peak[c]) for c in chosen]}


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
