"""The heatmap job, what ``nofc heatmap`` does: load, normalise, convert, predict, draw.

Two ways to the map, one way on from it. An image up to ``TILE_ABOVE`` pixels is loaded
whole and predicted in one ``dense_predict``; a larger one (or one with ``tile``, ``out``,
a Dask backend or a mask) goes through ``tiled_predict``, read by region, and is drawn
on a thumbnail. Either gives a ``_Map``; the classes to draw, the PNG, the saved scores
and the summary are then made the same way for both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .crops import map_network
from .dense import dense_predict
from .errors import NofcError, check_writable, refuse_overwrite
from .images import BadRegion, IMAGENET_MEAN, IMAGENET_STD, Normalize, default_scale
from .io import atomic_output
from .placement import placement_of
from .receptive import cached_geometry
from .render import render_heatmap
from .scores import probabilities
from .sinks import output_for
from .sources import open_source
from .tiling import Dask, check_tileable, default_tile, num_outputs, tiled_predict
from .verification import verify as _verify

__all__ = ["heatmap", "class_summary", "class_names", "default_normalize"]

TILE_ABOVE = 4096 * 4096  # pixels: larger images are tiled automatically
_THUMB = 2048  # longest side of the image drawn under a tiled map
_BLOCK_BYTES = 64 << 20  # softmax over the map in row blocks of about this size


@dataclass
class _Map:
    """A computed map and what it is drawn on, whichever way it was computed."""

    scores: object  # (K, h, w) raw logits: a numpy array or a zarr array
    geo: object  # the network's Geometry
    steps: tuple[int, int]  # pixels between windows
    picture: np.ndarray  # (C, h', w') in [0, 1]: the image, or a thumbnail of it
    image_shape: tuple[int, int, int]  # (C, H, W) at full resolution
    info: dict  # geometry and run facts: printed, and saved with the scores
    every: int = 1  # draw every f-th cell (a map larger than the picture can show)
    placement: object = None  # nofc.placement.Placement: boxes in level-0 / world coords
    names: list | None = None  # the name of each band of scores (default: the model's)
    ids: list | None = None  # the class of each band of scores (default: band k is class k)

    @property
    def tiled(self) -> bool:
        return "tile" in self.info


def heatmap(
    model,
    image,
    input_size,
    output,
    *,
    spec: str = "",
    cls: int | None = None,
    top: int | None = None,
    step=None,
    method: str = "auto",
    scores_path=None,
    normalize=None,
    labels_file=None,
    device=None,
    force: bool = False,
    progress: bool = True,
    tile: int | None = None,
    out=None,
    backend="local",
    verify: bool = False,
    mask=None,
    edges: str = "inside",
    check: bool = True,
    precision: str = "fp32",
    engine: str = "torch",
) -> dict:
    """Load, normalise, convert, predict densely, draw; what ``nofc heatmap`` does.

    ``image`` is a file path or an image opened with its options
    (``nofc.open_source(path, level=1, on_error="skip")``: a slide's level or pixel size,
    a raster's bands, unreadable regions left NaN). ``normalize`` is a
    ``nofc.Normalize``; its mean and std, when it gives neither, are the model's own (a
    timm model's pretrained config, ImageNet's for torchvision RGB models), else none.
    The conversion is checked against the classifier at ``input_size`` before the map
    is computed (``check=False`` skips that); ``method``, ``edges``, ``precision`` and
    ``engine`` are
    ``dense_predict``'s (``"crops"``: the classifier on every window, which ``"auto"``
    also does where ``convert`` refuses it).

    Images above ``TILE_ABOVE`` pixels (or with ``tile``, ``out``, a Dask ``backend`` or
    a ``mask`` given, or opened with options) go through :func:`nofc.tiled_predict`: TIFF
    is read lazily, the map can be written to a zarr store ``out``, and the PNG is drawn
    on a downsampled image. Slides and rasters are always tiled; their boxes are in
    level-0 slide pixels. With a mask ``info["windows_computed"]`` says how many windows
    were computed. ``out`` may also be a GeoTIFF ``.tif``, a QuPath ``.geojson``, merged
    regions (``.regions.geojson``, ``.gpkg``, ``.fgb``) or an output object with its
    options (``nofc.sinks.output_for``).

    Writes ``output`` (PNG) and, when given, ``scores_path``: ``.npz`` with ``scores``
    (K, h, w) raw logits, ``boxes`` (h, w, 4) window of every cell, ``step``, ``stride``,
    ``offset``, ``window``, ``exact``, ``image_shape`` and ``geometry`` (JSON text); or
    ``.npy`` with the scores and the same fields in a ``.json`` file next to it.
    With ``verify``, the original classifier also runs crop by crop (float32, at the
    network stride) and ``info["verify"]`` is ``nofc.verify``'s report of the measured
    difference between the map and the crops (whole images only).
    Returns a summary (classes drawn, map shape, geometry).
    """
    out_path = getattr(out, "path", out)
    check_outputs(output, scores_path, out_path if isinstance(out_path, (str, os.PathLike))
                  else None, force=force)
    if out is not None:
        out = output_for(out)
        out.check(force=force)
        if scores_path and (getattr(out, "values", "logits") != "logits"
                            or getattr(out, "classes", None) is not None):
            raise NofcError("--scores keeps the logits of every class, which this GeoTIFF "
                            "does not hold: add --values logits (without --classes), or "
                            "write the map to a .zarr store")
        if getattr(out, "values", None) == "logits" and getattr(out, "classes", None):
            raise NofcError("--classes with --values logits: the heatmap's probabilities "
                            "need the logits of every class; keep --values probs, or drop "
                            "--classes")
    if top is not None and top < 1:
        raise NofcError(f"--top must be at least 1, got {top}")
    if normalize is not None and not isinstance(normalize, Normalize):
        raise NofcError(f"normalize must be a nofc.Normalize(mean=, std=, scale=), got "
                        f"{type(normalize).__name__}")
    size = tuple(input_size)
    src = open_source(image, channels=size[0])
    if normalize is None or (normalize.mean is None and normalize.std is None):
        # only scale= / offset= given (--scale, --offset): the model's mean and std stay
        normalize = default_normalize(model, spec, size[0], given=normalize)
    normalize.check(size[0])
    if tile is not None or out is not None or isinstance(backend, Dask) or backend == "dask" \
            or src.on_error == "skip" or mask is not None or src.reading() \
            or src.kind in ("slide", "raster") or src.hw[0] * src.hw[1] > TILE_ABOVE:
        computed = _tiled_map(model, src, size, normalize=normalize, step=step, method=method,
                              device=device, progress=progress, tile=tile, out=out,
                              backend=backend, mask=mask, labels_file=labels_file,
                              edges=edges, check=check, cls=cls, precision=precision,
                              engine=engine)
    else:
        computed = _whole_map(model, src, size, normalize=normalize, step=step, method=method,
                              device=device, progress=progress, verify=verify,
                              edges=edges, check=check, precision=precision,
                              engine=engine)
    return _draw(computed, model, src.path or "image", output, cls=cls, top=top,
                 labels_file=labels_file, scores_path=scores_path, force=force)


def check_outputs(output, scores_path, out_path=None, *, force: bool) -> None:
    """Refuse bad, existing, unwritable or shared output paths (``-o``, ``--scores``,
    ``--out``) before the long part; the CLI calls it before loading the model."""
    named = [("-o", Path(output))] + ([("--scores", Path(scores_path))] if scores_path else [])
    if scores_path and Path(scores_path).suffix.lower() == ".npy":
        named.append(("--scores (its .json)", Path(scores_path).with_suffix(".json")))
    if scores_path and Path(scores_path).suffix.lower() not in (".npz", ".npy"):
        raise NofcError(f"--scores must end in .npz or .npy, got {scores_path}")
    if Path(output).suffix.lower() != ".png":
        raise NofcError(f"the heatmap is a PNG: give an output ending in .png, got {output}")
    for _, p in named:
        refuse_overwrite(p, force=force)
    if out_path is not None:
        named.append(("--out", Path(out_path)))
    seen: dict = {}
    for flag, p in named:
        key = os.path.normcase(os.path.abspath(p))
        if key in seen:
            raise NofcError(f"{seen[key]} and {flag} are the same file {p}; give each output "
                            "its own path")
        seen[key] = flag
        check_writable(p)


# --------------------------------------------------------------------------- the two ways


def _whole_map(model, src, size, *, normalize, step, method, device, progress, verify,
               edges="inside", check=True, precision="fp32", engine="torch") -> _Map:
    """The image read whole, one dense pass."""
    region = src.read(slice(None), slice(None))  # (C, H, W) as stored
    raw = region.astype(np.float32) * np.float32(default_scale(region.dtype))  # to draw on
    x = torch.from_numpy(normalize(region))
    fcn, geo, steps = _network(model, size, step, method, check=check)
    logits = dense_predict(fcn, x, size, steps, method=method, device=device,
                           progress=progress, edges=edges, precision=precision,
                           engine=engine)[0]
    geo = geo.with_edges(raw.shape[1:], edges, step=steps)  # the windows of this map
    scores = logits.float().cpu().numpy()  # (K, h, w)
    extra = {}
    if verify:
        extra["verify"] = str(_verify(model, fcn, size, image=x, dtype=torch.float32,
                                      device=device))
    info = _info(geo, steps, raw.shape, scores.shape[1:], normalize, **extra)
    return _Map(scores, geo, steps, raw, raw.shape, info)


def _tiled_map(model, src, size, *, normalize, step, method, device, progress, tile, out,
               backend, mask=None, labels_file=None, edges="inside", check=True,
               cls=None, precision="fp32", engine="torch") -> _Map:
    """The image read by region, tile by tile (optionally to a zarr store, a GeoTIFF, a
    GeoJSON, or on Dask); slides at a level, rasters by band, masked."""
    H, W = src.hw
    fcn, geo, steps = _network(model, size, step, method, check=check)
    tile = default_tile(geo) if tile is None else tile
    check_tileable(fcn, geo, tile)  # a refusal before the status line, not after it
    print(f"image {H}x{W} ({H * W / 1e6:.1f} Mpix, {src.kind}"
          + (f", downsample {src.downsample[0]:g}" if src.downsample != (1.0, 1.0) else "")
          + f"): tiled with tile {tile} (tiling is automatic above {TILE_ABOVE / 1e6:.1f} "
          f"Mpix), backend {_backend_name(backend)}"
          + (f", map to {out.path}" if out is not None else ""), file=sys.stderr)
    stats: dict = {}
    names = _class_names(model, num_outputs(fcn, size), labels_file)
    if out is not None and out.path is not None and not out.metadata:
        out = dataclasses.replace(out, metadata={"classes": names})
    bands = out.bands(len(names)) if hasattr(out, "bands") else None  # a GeoTIFF's classes
    if cls is not None and bands is not None and cls not in bands:  # before the long part
        raise NofcError(f"--class {cls} is not among the classes the GeoTIFF keeps "
                        f"({', '.join(map(str, bands))})")
    scores = tiled_predict(fcn, src, size, tile=tile, out=output_for(out), backend=backend,
                           step=None if steps == geo.stride else steps, method=method,
                           normalize=normalize, device=device, progress=progress, mask=mask,
                           stats=stats, edges=edges, check=False, precision=precision,
                           engine=engine)
    h, w = scores.shape[1:]
    geo = geo.with_edges((H, W), edges, step=steps)  # the windows of this map
    place = placement_of(src, geo, steps)
    extra = {"placement": place.as_dict()}
    if mask is not None:
        extra["windows_computed"] = [stats["computed"], stats["windows"]]
    info = _info(geo, steps, (size[0], H, W), (h, w), normalize, tile=tile, **extra)
    picture = _thumbnail(src, (H, W), skip_bad=src.on_error == "skip")
    kept = getattr(scores, "classes", None)  # a GeoTIFF of some classes (RasterMap)
    return _Map(scores, geo, steps, picture, (size[0], H, W), info,
                every=_every((h, w)), placement=place,
                names=None if kept is None else [names[i] for i in kept], ids=kept)


def _backend_name(backend) -> str:
    scheduler, workers = getattr(backend, "scheduler", None), getattr(backend, "workers", None)
    return ("dask" + (f" at {scheduler}" if scheduler else "")
            + (f" on {workers} local workers" if workers else "")) \
        if backend != "local" else "local"


def _network(model, size, step, method="auto", *, check=True):
    """The converted network (checked against the classifier unless ``check`` is False),
    its geometry and the map step ``(sy, sx)``."""
    fcn = map_network(model, size, method=method, step=step, check=check)
    geo = cached_geometry(fcn, size)
    return fcn, geo, geo.check_step(step)


def _info(geo, steps, image_shape, map_shape, normalize, **extra) -> dict:
    """The geometry and the facts of the run, as plain Python (saved as JSON)."""
    info = geo.as_dict()
    info.update(step=list(steps), image_shape=list(image_shape), map_shape=list(map_shape),
                mean=None if normalize.mean is None else list(normalize.mean),
                std=None if normalize.std is None else list(normalize.std), **extra)
    if normalize.scale is not None:
        info["scale"] = normalize.scale
    if normalize.offset is not None:
        info["offset"] = list(normalize.offset)
    return info


# --------------------------------------------------------------------------- one way on


def _draw(m: _Map, model, image_path, output, *, cls, top, labels_file, scores_path,
          force) -> dict:
    """Choose the classes, draw the PNG, save the scores; the summary."""
    k, h, w = m.scores.shape
    peaks = _peaks(m.scores)
    ids = m.ids or list(range(k))
    if cls is not None and m.ids is not None:  # a GeoTIFF of some classes: --class K's band
        cls = ids.index(cls)  # (_tiled_map checked that it is there)
    chosen, labels = _choose_classes(cls, top, peaks,
                                     m.names or _class_names(model, k, labels_file), ids)
    probs = _drawn(m.scores, chosen, m.every)
    f = m.every
    with atomic_output(output, force=force) as tmp:
        render_heatmap(tmp, m.picture, probs, labels, m.geo, (m.steps[0] * f, m.steps[1] * f),
                       title=_title(image_path, m), image_hw=m.image_shape[1:])
        if scores_path:
            boxes = m.geo.boxes(m.image_shape[1:], step=m.steps) if m.placement is None \
                else m.placement.boxes(m.image_shape[1:])  # level-0 slide pixels
            _save_scores(scores_path, np.asarray(m.scores[:]), boxes, m.info, force=force)
    return {"classes": [ids[c] for c in chosen], "labels": labels, "map_shape": (h, w),
            "geometry": m.info, "max_prob": [float(peaks[c]) for c in chosen]}


def _title(image_path, m: _Map) -> str:
    h, w = m.scores.shape[1:]
    return (f"{Path(str(image_path)).name}: {h}x{w} windows of {m.geo.window[0]}x"
            f"{m.geo.window[1]}, step {m.steps[0]}x{m.steps[1]}"
            + (", tiled" if m.tiled else "")
            + ("" if m.geo.exact else " (padded net: not exact)")
            + (f", drawn every {_ordinal(m.every)} cell" if m.every > 1 else ""))


def _ordinal(k: int) -> str:
    """2nd, 3rd, 4th, 11th, 21st."""
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def _probabilities(scores, chosen=slice(None)):
    """Probabilities (``nofc.scores.probabilities``) of a ``(K, h, w)`` logit map in
    blocks of rows, so that a map on disk is never in memory whole: ``(first row, (N,
    rows, w) probabilities)`` for the ``chosen`` classes of each block. A GeoTIFF of
    probabilities (``values == "probs"``) is read as it is."""
    k, h, w = scores.shape
    rows = max(1, _BLOCK_BYTES // max(1, 4 * k * w))
    given = getattr(scores, "values", "logits") == "probs"
    for r in range(0, h, rows):
        block = np.asarray(scores[:, r:r + rows], dtype=np.float32)
        yield r, torch.from_numpy(block if given else probabilities(block))[chosen]


def _peaks(scores) -> np.ndarray:
    """``(K,)`` highest probability of each class over the finite cells (NaN cells saw
    NaN or Inf pixels); NaN for a class without any."""
    peak = np.full(scores.shape[0], -np.inf, dtype=np.float32)
    for _, probs in _probabilities(scores):
        peak = np.fmax(peak, probs.nan_to_num(nan=-np.inf).amax((1, 2)).numpy())
    return np.where(np.isfinite(peak), peak, np.nan)


def class_summary(scores, *, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``(above, mean)``, each ``(K,)``: for every class, the fraction of the map's finite
    cells whose probability (softmax over the classes) is at least ``threshold``, and its
    mean probability over them; NaN for a map without finite cells. NaN cells (background
    of a mask, NaN pixels, unreadable regions) are left out. Read in blocks of rows.

    >>> above, mean = class_summary(np.zeros((2, 3, 4), np.float32), threshold=0.5)
    >>> above.tolist(), mean.tolist()
    ([1.0, 1.0], [0.5, 0.5])
    """
    k = scores.shape[0]
    above, total, cells = np.zeros(k), np.zeros(k), 0
    for _, probs in _probabilities(scores):
        p = probs.numpy().reshape(k, -1)
        p = p[:, np.isfinite(p).all(0)]  # (K, finite cells)
        above += (p >= threshold).sum(1)
        total += p.sum(1, dtype=np.float64)
        cells += p.shape[1]
    if not cells:
        return np.full(k, np.nan), np.full(k, np.nan)
    return above / cells, total / cells


def _drawn(scores, chosen, f: int) -> np.ndarray:
    """``(N, ceil(h / f), ceil(w / f))`` probabilities of the ``chosen`` classes, every
    ``f``-th cell."""
    k, h, w = scores.shape
    out = np.zeros((len(chosen), -(-h // f), -(-w // f)), dtype=np.float32)
    for r, probs in _probabilities(scores, [int(c) for c in chosen]):
        first = (-r) % f  # first row of this block on the f-grid
        kept = probs.numpy()[:, first::f, ::f]
        out[:, (r + first) // f:(r + first) // f + kept.shape[1]] = kept
    return out


def _every(map_shape) -> int:
    """Draw every f-th cell of a map with more cells than the picture has pixels."""
    return max(1, -(-max(map_shape) // _THUMB))


def _thumbnail(src, hw, skip_bad: bool = False) -> np.ndarray:
    """``(C, h, w)`` float image in [0, 1], every f-th pixel, for drawing under the map;
    with ``skip_bad``, parts that cannot be read are drawn black."""
    f = _every(hw)
    try:
        region = src.read(slice(None, None, f), slice(None, None, f))
    except BadRegion:
        if not skip_bad:
            raise
        region = _readable_parts(src, hw, f)
    return (region.astype(np.float32) * default_scale(region.dtype)).clip(0, 1)


def _readable_parts(src, hw, f: int, part: int = 128) -> np.ndarray:
    """The thumbnail read part by part, zero where a part cannot be read."""
    part *= f
    parts = []
    for y in range(0, hw[0], part):
        row = []
        for x in range(0, hw[1], part):
            rows, cols = slice(y, min(y + part, hw[0]), f), slice(x, min(x + part, hw[1]), f)
            try:
                row.append(src.read(rows, cols))
            except BadRegion:
                row.append(np.zeros((src.channels, len(range(*rows.indices(hw[0]))),
                                     len(range(*cols.indices(hw[1])))), src.dtype))
        parts.append(np.concatenate(row, axis=2))
    return np.concatenate(parts, axis=1)


# --------------------------------------------------------------------------- helpers


def _choose_classes(cls, top, peaks, names, ids=None):
    """The bands to draw (``--class`` or the ``--top`` peaks) and their panel titles;
    ``ids`` is the class of each band (default: band k is class k)."""
    k = len(names)
    ids = list(range(k)) if ids is None else ids
    if cls is not None:
        if not 0 <= cls < k:
            raise NofcError(f"--class {cls} is out of range: the model has classes 0..{k - 1}")
        chosen = [cls]
    else:
        chosen = list(np.argsort(-np.nan_to_num(peaks, nan=-1.0), kind="stable")[: top or 1])
    labels = [f"{names[c]} ({ids[c]})" if names[c] != str(ids[c]) else f"class {ids[c]}"
              for c in chosen]
    return chosen, labels


def _class_names(model, k: int, labels_file=None) -> list[str]:
    """Names for the K outputs: a labels file, the names the checkpoint kept, torchvision's
    ImageNet list, or indices."""
    if labels_file is not None:
        p = Path(labels_file)
        if not p.is_file():
            raise NofcError(f"labels file not found: {labels_file}")
        names = [line.strip() for line in p.read_text().splitlines() if line.strip()]
        if len(names) != k:
            raise NofcError(f"{labels_file} has {len(names)} names, the model {k} classes")
        return names
    kept = getattr(model, "nofc_class_names", None)
    if kept is not None and len(kept) == k:
        return list(kept)
    if k == 1000 and type(model).__module__.startswith("torchvision."):
        try:
            from torchvision.models import ResNet50_Weights

            return list(ResNet50_Weights.DEFAULT.meta["categories"])
        except Exception:  # noqa: BLE001 - names are a nicety
            pass
    return [str(i) for i in range(k)]


def default_normalize(model, spec: str, channels: int, *, given: Normalize | None = None
                      ) -> Normalize:
    """The normalisation ``nofc heatmap`` uses when no mean and std are given (see
    ``heatmap``): the model's, with the ``scale`` and ``offset`` of ``given``.

    >>> default_normalize(None, "torchvision:resnet18", 3).mean
    (0.485, 0.456, 0.406)
    >>> default_normalize(None, "torchvision:resnet18", 3, given=Normalize(scale=1e-4)).scale
    0.0001
    """
    given = given or Normalize()
    return Normalize(*_default_norm(model, spec, channels), given.scale, given.offset)


def class_names(model, k: int, labels_file=None) -> list[str]:
    """Names for the ``k`` outputs of ``model``: a labels file (one per line), the names
    its checkpoint kept, torchvision's ImageNet list, or the indices.

    >>> class_names(None, 3)
    ['0', '1', '2']
    """
    return _class_names(model, k, labels_file)


def _default_norm(model, spec: str, channels: int):
    """The normalisation the model was trained with, when it is known: a timm model's
    pretrained config (``timm:NAME``), or ImageNet's for torchvision's RGB models."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and "mean" in cfg and "std" in cfg and \
            len(cfg["mean"]) == len(cfg["std"]) == channels:
        return tuple(cfg["mean"]), tuple(cfg["std"])
    if str(spec).startswith("torchvision:") and channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return None, None


def _save_scores(path, scores, boxes, info, *, force) -> None:
    """``.npz`` with the scores, the boxes and the geometry; or ``.npy`` and a ``.json``."""
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
