"""What a map's scores mean: class probabilities, the top class, a colour per class.

A map holds the network's raw outputs (logits), ``(K, ...)`` with the classes first. The
probability of class ``k`` is the softmax over the classes; a network with a single output
is a binary classifier whose probability is the sigmoid of that output (a softmax over one
class would be 1 everywhere). A cell with a NaN score (masked out, or it saw NaN pixels)
has NaN probabilities and no top class. Every map written for people to look at uses these
rules (the GeoTIFF's probability and class bands).
"""

from __future__ import annotations

import colorsys

import numpy as np

__all__ = ["probabilities", "top_class", "class_colour", "CLASS_COLOURS"]

# matplotlib's tab10, the colours QuPath detections get (nofc.sinks.geojson), and tab20
# for up to twenty classes
CLASS_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
                 (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127),
                 (188, 189, 34), (23, 190, 207))
_TAB20 = ((31, 119, 180), (174, 199, 232), (255, 127, 14), (255, 187, 120), (44, 160, 44),
          (152, 223, 138), (214, 39, 40), (255, 152, 150), (148, 103, 189), (197, 176, 213),
          (140, 86, 75), (196, 156, 148), (227, 119, 194), (247, 182, 210), (127, 127, 127),
          (199, 199, 199), (188, 189, 34), (219, 219, 141), (23, 190, 207), (158, 218, 229))


def probabilities(scores: np.ndarray) -> np.ndarray:
    """``(K, ...)`` float32 probabilities of ``(K, ...)`` logits: softmax over axis 0, or
    the sigmoid for ``K == 1``; a cell with any NaN score is NaN in every class.

    >>> probabilities(np.array([[0.0], [np.log(3)]])).round(2).tolist()
    [[0.25], [0.75]]
    >>> probabilities(np.array([[0.0, np.nan]])).tolist()
    [[0.5, nan]]
    """
    x = np.asarray(scores, dtype=np.float32)
    bad = np.isnan(x).any(0)
    with np.errstate(invalid="ignore", over="ignore"):
        if x.shape[0] == 1:
            p = 1.0 / (1.0 + np.exp(-x))
        else:
            e = np.exp(x - x.max(axis=0, keepdims=True))
            p = e / e.sum(axis=0, keepdims=True)
    p[:, bad] = np.nan
    return p.astype(np.float32, copy=False)


def top_class(scores: np.ndarray, *, nodata: int) -> np.ndarray:
    """The index of the highest score of each cell of ``(K, ...)`` scores (logits or
    probabilities: the same class), ``nodata`` where a score is NaN; the smallest
    unsigned integer type that holds ``nodata``.

    >>> top_class(np.array([[0.1, 2.0, np.nan], [0.5, 1.0, 0.0]]), nodata=255).tolist()
    [1, 0, 255]
    """
    x = np.asarray(scores)
    bad = np.isnan(x).any(0)
    top = np.nan_to_num(x, nan=-np.inf).argmax(0)
    dtype = np.uint8 if nodata <= np.iinfo(np.uint8).max else np.uint16
    return np.where(bad, nodata, top).astype(dtype)


def class_colour(k: int, classes: int) -> tuple[int, int, int]:
    """The RGB colour of class ``k`` of a map with ``classes`` classes, the same in every
    file and page nofc makes (GeoTIFF colour table, QuPath GeoJSON, regions, the viewer's
    class view): matplotlib's tab10 up to ten classes, tab20 up to twenty, then evenly
    spaced hues, so no two classes share a colour.

    >>> class_colour(0, 2), class_colour(1, 12), class_colour(1, 30)
    ((31, 119, 180), (174, 199, 232), (255, 51, 0))
    """
    if not 0 <= k < classes:
        raise ValueError(f"class {k} of {classes}")
    if classes <= len(CLASS_COLOURS):
        return CLASS_COLOURS[k]
    if classes <= len(_TAB20):
        return _TAB20[k]
    r, g, b = colorsys.hsv_to_rgb(k / classes, 1.0, 1.0)
    return int(r * 255 + 0.5), int(g * 255 + 0.5), int(b * 255 + 0.5)
