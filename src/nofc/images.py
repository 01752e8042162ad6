"""Pixels as the network wants them: normalisation, tensors, array layouts and regions.

Files and arrays come in through ``nofc.sources`` (``load_image``, ``open_source``,
``open_image_array``); this module holds what sits below it: ``read_region`` (the pixels
of a region as stored, or a :class:`BadRegion` naming them), the layout of an array, the
scale of an integer dtype, ``normalize`` and ``to_tensor``.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .errors import NofcError, first_line

__all__ = ["normalize", "BadRegion", "IMAGENET_MEAN", "IMAGENET_STD", "read_region",
           "image_layout", "to_tensor", "default_scale", "describe_pixels"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
def normalize(image: np.ndarray, mean=None, std=None) -> np.ndarray:
    """``(image - mean) / std`` per channel of a ``(C, H, W)`` array (None: unchanged).

    >>> normalize(np.ones((3, 2, 2), np.float32), IMAGENET_MEAN, IMAGENET_STD)[:, 0, 0].round(3)
    array([2.249, 2.429, 2.64 ], dtype=float32)
    """
    c = image.shape[0]
    out = image.astype(np.float32, copy=True)
    for name, values in (("mean", mean), ("std", std)):
        if values is None:
            continue
        v = np.asarray(values, dtype=np.float32).reshape(-1)
        if v.size == 1:
            v = np.repeat(v, c)
        if v.size != c:
            raise NofcError(f"--{name} has {v.size} values and the image {c} channels; give "
                            f"one value or {c}")
        if name == "std" and (v <= 0).any():
            raise NofcError(f"--std values must be positive, got {v.tolist()}")
        if name == "mean":
            out -= v[:, None, None]
        else:
            out /= v[:, None, None]
    return out


# --------------------------------------------------------------------------- region sources
#
# Large images are not loaded whole: tiling reads them region by region through these.


class TiffSource:
    """A TIFF page read lazily, region by region, through tifffile's zarr view."""

    def __init__(self, path: str):
        try:
            import tifffile
            import zarr
        except ImportError:  # pragma: no cover - part of nofc[scale]
            raise NofcError("reading TIFF needs the scale extra: pip install 'nofc[scale]'"
                            ) from None
        self.path = str(path)
        try:
            with tifffile.TiffFile(self.path) as tif:
                page = tif.series[0]
                self.shape = tuple(page.shape)
                self.dtype = np.dtype(page.dtype)
                self.axes = page.axes
        except Exception as exc:  # noqa: BLE001
            raise NofcError(f"cannot read TIFF {path}: {first_line(exc)}") from None
        self._zarr = zarr
        self._arr = None

    def _open(self):
        if self._arr is None:
            import tifffile

            store = tifffile.imread(self.path, aszarr=True)
            arr = self._zarr.open(store, mode="r")
            if hasattr(arr, "keys") and not hasattr(arr, "shape"):  # a multiscale group
                arr = arr[sorted(arr.keys())[0]]
            self._arr = arr
        return self._arr

    def __getitem__(self, key):
        return np.asarray(self._open()[key])

    def __getstate__(self):  # ship the path, not an open file, to Dask workers
        return {"path": self.path, "shape": self.shape, "dtype": self.dtype, "axes": self.axes}

    def __setstate__(self, state):
        import zarr

        self.__dict__.update(state)
        self._zarr = zarr
        self._arr = None


def image_layout(shape: tuple[int, ...], channels: int, layout: str = "auto") -> str:
    """``"hw"``, ``"hwc"`` or ``"chw"``: where the ``channels`` of an array of ``shape`` are.

    >>> image_layout((40, 50, 3), 3), image_layout((3, 40, 50), 3), image_layout((40, 50), 1)
    ('hwc', 'chw', 'hw')
    """
    if len(shape) == 2:
        if channels != 1:
            raise NofcError(f"image is grayscale {shape} but the model expects {channels} "
                            "channels")
        return "hw"
    if len(shape) != 3:
        raise NofcError(f"image must be (H, W), (H, W, C) or (C, H, W), got shape {shape}")
    if layout in ("hwc", "chw"):
        c = shape[2] if layout == "hwc" else shape[0]
        if c != channels:
            raise NofcError(f"image has {c} channels ({layout} {shape}) but the model expects "
                            f"{channels}")
        return layout
    if shape[2] == channels:
        return "hwc"
    if shape[0] == channels:
        return "chw"
    raise NofcError(f"image of shape {shape} has no axis of {channels} channels; pass "
                    "layout='hwc' or 'chw' and the right number of channels")


def spatial_shape(shape, layout: str) -> tuple[int, int]:
    """``(H, W)`` of an array of ``shape`` in ``layout``."""
    return (shape[1], shape[2]) if layout == "chw" else (shape[0], shape[1])


class BadRegion(NofcError):
    """A region of the image cannot be read (a corrupt or truncated tile): the message
    names the file and the pixels. Reading it again gives the same error, so tiling does
    not retry it; with ``on_error="skip"`` its blocks are left NaN instead."""


def read_region(src, layout: str, rows: slice, cols: slice) -> np.ndarray:
    """The pixels ``[rows, cols]`` of a source as a ``(C, h, w)`` array, as stored.

    A region that cannot be decoded raises :class:`BadRegion`, one line naming the source
    and the pixels; an ``OSError`` (a file that vanished, a network read that was cut) is
    left as it is, for the caller to retry.

    >>> read_region(np.zeros((40, 50, 3)), "hwc", slice(0, 10), slice(0, 50, 5)).shape
    (3, 10, 10)
    """
    try:
        region = src[:, rows, cols] if layout == "chw" else src[rows, cols]
        region = np.asarray(region.compute() if hasattr(region, "compute") else region)
    except (NofcError, OSError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise anything (zlib.error, ...)
        raise BadRegion(f"cannot read {_source_name(src)} at {describe_pixels(rows, cols)}: "
                        f"{first_line(exc)}") from None
    if layout == "hw":
        return region[None]
    if layout == "hwc":
        return np.moveaxis(region, -1, 0)
    return region


def _source_name(src) -> str:
    """``TIFF scan.tif`` for a file source, else the array's type."""
    path = getattr(src, "path", None)
    return f"TIFF {path}" if path else f"the {type(src).__name__} image"


def describe_pixels(rows: slice, cols: slice) -> str:
    """``rows 0..64, columns 32..96`` (ends exclusive), with the step when there is one.

    >>> describe_pixels(slice(0, 64), slice(None, None, 4))
    'rows 0..64, columns 0..end step 4'
    """
    def part(name, s):
        text = f"{name} {s.start or 0}..{'end' if s.stop is None else s.stop}"
        return text + (f" step {s.step}" if s.step not in (None, 1) else "")

    return f"{part('rows', rows)}, {part('columns', cols)}"


def default_scale(dtype) -> float:
    """What brings pixels of ``dtype`` to [0, 1]: ``1 / max`` for integers, else 1.

    >>> default_scale(np.uint8) == 1 / 255, default_scale(np.float32)
    (True, 1.0)
    """
    if np.issubdtype(dtype, np.integer):
        return 1.0 / float(np.iinfo(dtype).max)
    return 1.0


def to_tensor(region: np.ndarray, scale, mean, std, dtype, device) -> torch.Tensor:
    """A ``(C, h, w)`` region as a tensor, normalised: ``(x * scale - mean) / std``."""
    x = torch.from_numpy(np.ascontiguousarray(region)).to(device=device, dtype=dtype)
    if scale != 1.0:
        x = x * scale
    if mean is not None:
        x = x - torch.as_tensor(mean, dtype=dtype, device=device).view(-1, 1, 1)
    if std is not None:
        x = x / torch.as_tensor(std, dtype=dtype, device=device).view(-1, 1, 1)
    return x
