"""Pixels as the network wants them: the scale of an integer dtype and :class:`Normalize`.

Files and arrays come in through ``nofc.sources`` (``open_source``: every image is an
``ImageSource`` read region by region); this module holds what sits below it: the pixel
rules every source and every run share, and :class:`BadRegion`, the error of a region
that cannot be read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .errors import NofcError, first_line

__all__ = ["Normalize", "BadRegion", "IMAGENET_MEAN", "IMAGENET_STD", "default_scale",
           "describe_pixels"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalize:
    """How stored pixels become the network's input: ``(x * scale + offset - mean) / std``
    per channel. The one normalisation option of ``tiled_predict`` and ``heatmap``.

    Attributes:
        mean, std: one value, or one per channel (None: 0 and 1).
        scale: what multiplies the stored pixels first; None: ``1 / max`` for integer
            images (255 for uint8, :func:`default_scale`), 1 for floats.
        offset: what is added after ``scale`` (GDAL's band offset: Sentinel-2 L2A
            reflectance is ``DN * 0.0001 - 0.1`` since processing baseline 04.00);
            one value, or one per channel.

    >>> imagenet = Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    >>> imagenet(np.ones((3, 2, 2), np.float32))[:, 0, 0].round(3)
    array([2.249, 2.429, 2.64 ], dtype=float32)
    >>> l2a = Normalize(scale=1e-4, offset=-0.1)  # Sentinel-2 L2A digital numbers
    >>> l2a(np.full((1, 1, 1), 3000, np.uint16))[0, 0, 0].round(4)
    np.float32(0.2)
    >>> Normalize(std=float("nan"))
    Traceback (most recent call last):
    ...
    nofc.errors.NofcError: --std must be finite numbers, got [nan]
    """

    mean: tuple | float | None = None
    std: tuple | float | None = None
    scale: float | None = None
    offset: tuple | float | None = None

    def __post_init__(self):
        for name in ("mean", "std", "offset"):
            values = getattr(self, name)
            if values is None:
                continue
            try:
                v = np.asarray(values, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                raise NofcError(f"--{name} must be numbers, got {values!r}") from None
            if v.size == 0 or not np.isfinite(v).all():
                raise NofcError(f"--{name} must be finite numbers, got {v.tolist()}")
            if name == "std" and (v <= 0).any():
                raise NofcError(f"--std values must be positive, got {v.tolist()}")
            object.__setattr__(self, name, tuple(float(t) for t in v))
        if self.scale is not None:
            try:
                scale = float(self.scale)
            except (TypeError, ValueError):
                raise NofcError(f"scale must be a number, got {self.scale!r}") from None
            if not (np.isfinite(scale) and scale > 0):
                raise NofcError(f"scale must be a positive finite number, got {scale}")
            object.__setattr__(self, "scale", scale)

    def check(self, channels: int) -> None:
        """Refuse a mean, std or offset whose count is neither 1 nor ``channels``."""
        for name in ("mean", "std", "offset"):
            v = getattr(self, name)
            if v is not None and len(v) not in (1, channels):
                raise NofcError(f"--{name} has {len(v)} values and the image {channels} "
                                f"channels; give one value or {channels}")

    def for_pixels(self, dtype) -> "Normalize":
        """This normalisation with ``scale`` decided for pixels of ``dtype``."""
        if self.scale is not None:
            return self
        return Normalize(self.mean, self.std, default_scale(np.dtype(dtype)), self.offset)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """A ``(C, H, W)`` array normalised, as float32."""
        self.check(image.shape[0])
        scale = self.for_pixels(image.dtype).scale
        out = image.astype(np.float32, copy=True)
        if scale != 1.0:
            out *= np.float32(scale)
        if self.offset is not None:
            out += np.asarray(self.offset, np.float32)[:, None, None]
        if self.mean is not None:
            out -= np.asarray(self.mean, np.float32)[:, None, None]
        if self.std is not None:
            out /= np.asarray(self.std, np.float32)[:, None, None]
        return out

    def tensor(self, region: np.ndarray, *, dtype, device) -> torch.Tensor:
        """A ``(C, h, w)`` region as a normalised tensor of ``dtype`` on ``device``
        (``scale`` already decided: :meth:`for_pixels`)."""
        x = torch.from_numpy(np.ascontiguousarray(region)).to(device=device, dtype=dtype)
        if self.scale not in (None, 1.0):
            x = x * self.scale
        if self.offset is not None:
            x = x + torch.as_tensor(self.offset, dtype=dtype, device=device).view(-1, 1, 1)
        if self.mean is not None:
            x = x - torch.as_tensor(self.mean, dtype=dtype, device=device).view(-1, 1, 1)
        if self.std is not None:
            x = x / torch.as_tensor(self.std, dtype=dtype, device=device).view(-1, 1, 1)
        return x


class BadRegion(NofcError):
    """A region of the image cannot be read (a corrupt or truncated tile): the message
    names the file and the pixels. Reading it again gives the same error, so tiling does
    not retry it; with ``on_error="skip"`` its blocks are left NaN instead."""


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
