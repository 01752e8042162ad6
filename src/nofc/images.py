"""Reading images for dense prediction, and normalising them.

``load_image`` returns a float32 ``(C, H, W)`` array scaled to [0, 1] from PNG, JPEG or
TIFF files, whatever their pixel format, with each case decided explicitly:

* 8-bit grayscale, RGB: divided by 255; 16-bit grayscale (PNG ``I;16``, TIFF) by 65535;
  float TIFFs are kept as they are; 1-bit images become 0.0 / 1.0;
* palette images are expanded to RGB (RGBA when the palette has transparency);
* an alpha channel (RGBA, LA) is composited over ``background`` (white by default),
  because a classifier has no notion of transparency;
* CMYK and YCbCr are converted to RGB;
* the channel count is then matched to the network: gray -> 3 identical channels,
  RGB -> 1 channel (ITU-R 601 luma); anything else is refused with a NofcError.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import NofcError

__all__ = ["load_image", "normalize", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _read_tiff(path: Path) -> np.ndarray | None:
    """TIFF through tifffile when installed (16-bit RGB, float, many pages); else None."""
    try:
        import tifffile
    except ImportError:
        return None
    try:
        arr = tifffile.imread(path)
    except Exception as exc:  # noqa: BLE001
        raise NofcError(f"cannot read TIFF {path}: {type(exc).__name__}: {exc}") from None
    if arr.ndim == 3 and arr.shape[0] in (1, 2, 3, 4) and arr.shape[-1] not in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar (C, H, W) -> (H, W, C)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4)):
        raise NofcError(f"{path}: TIFF of shape {arr.shape} is not a single 2D image with "
                        "1 to 4 channels (several pages or a volume?)")
    return arr


def _scale(arr: np.ndarray, path) -> np.ndarray:
    """Integers to [0, 1] by their bit depth; floats unchanged; bools to 0/1."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 65535:  # PIL reads 16-bit PNGs as 32-bit "I"
            return arr.astype(np.float32) / (255.0 if hi <= 255 and arr.dtype.itemsize == 1
                                             else 65535.0)
        raise NofcError(f"{path}: {arr.dtype} pixels in [{lo}, {hi}] have no known scale; "
                        "convert the image to 8 or 16 bits")
    raise NofcError(f"{path}: pixels of type {arr.dtype} are not supported")


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode == "PA":
                im = im.convert("RGBA")
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            elif mode == "1":
                im = im.convert("L")
            elif mode not in ("L", "LA", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L", "F"):
                raise NofcError(f"{path}: image mode {mode!r} is not supported; save it as "
                                "grayscale, RGB or RGBA")
            arr = np.array(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise NofcError(f"cannot read image {path}: {exc}") from None
    if mode == "I;16B" or arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def load_image(path, *, channels: int = 3, background=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Read an image file as float32 ``(channels, H, W)`` in [0, 1] (floats: as stored).

    >>> import numpy as np, PIL.Image, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "a.png")
    >>> PIL.Image.fromarray(np.zeros((5, 7), np.uint8)).save(p)
    >>> load_image(p, channels=3).shape
    (3, 5, 7)
    """
    p = Path(path)
    if not p.is_file():
        raise NofcError(f"image file not found: {path}")
    arr = None
    if p.suffix.lower() in (".tif", ".tiff"):
        arr = _read_tiff(p)
    if arr is None:
        arr = _read_pil(p)
    img = _scale(arr, path)
    if img.ndim == 2:
        img = img[..., None]  # (H, W, 1)
    if img.shape[-1] in (2, 4):  # alpha last: composite over the background
        alpha = np.clip(img[..., -1:], 0.0, 1.0)
        colour = img[..., :-1]
        bg = np.asarray(background, dtype=np.float32)[: colour.shape[-1]]
        img = colour * alpha + bg * (1.0 - alpha)
    have = img.shape[-1]
    if have == channels:
        pass
    elif have == 1 and channels == 3:
        img = np.repeat(img, 3, axis=-1)
    elif have == 3 and channels == 1:
        img = (img @ _LUMA)[..., None]
    else:
        raise NofcError(f"{path} has {have} colour channels and the network expects {channels}; "
                        "nofc converts only gray <-> RGB")
    return np.ascontiguousarray(np.moveaxis(img, -1, 0), dtype=np.float32)


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
