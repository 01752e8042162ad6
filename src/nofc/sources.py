"""Image sources: one way in for arrays, pictures, TIFF, whole-slide images and rasters.

Every image nofc reads, whole or tile by tile, locally or on Dask workers, is an
:class:`ImageSource`: its size, channels, dtype, pixel size (slides) or georeferencing
(rasters) when known, and ``read(rows, cols)`` giving a ``(C, h, w)`` region. Three rules
hold for every source, so every path sees the same pixels:

* **channels and alpha**: in a file, an alpha channel (RGBA, LA, a raster's alpha band,
  OpenSlide's transparent pixels outside the scanned area) is composited over white in
  the stored dtype, rounded; then, when the caller says how many channels it wants, gray
  becomes 3 identical channels and RGB becomes 1 (ITU-R 601 luma); other counts are
  refused. An array given in memory must already have the channels asked for.
* **scaling**: integers are divided by the largest value of their dtype (uint8 255,
  uint16 65535, int32 2**31 - 1), floats are kept as stored (:func:`scale_of`).
* **errors**: a region that cannot be decoded is a :class:`nofc.images.BadRegion` naming
  the file and the pixels; a file that cannot be opened is one NofcError line.

Whole-slide images (SVS, NDPI, MRXS, SCN, DICOM, pyramidal TIFF: what OpenSlide opens,
known by content, not by suffix) are read through OpenSlide at a ``level`` or a pixel
size ``mpp`` (resampled when it falls between levels); their ``downsample`` says how many
level-0 pixels one pixel read spans, so that maps can be put back in level-0 slide
coordinates. Rasters (GeoTIFF, COG, JPEG 2000, anything GDAL opens) are read through
rasterio by window, with band selection; ``transform`` and ``crs`` say where they lie.

>>> src = open_source(np.zeros((40, 50, 3), np.uint8))
>>> src.hw, src.channels, src.dtype, src.read(slice(0, 10), slice(0, 20)).shape
((40, 50), 3, dtype('uint8'), (3, 10, 20))
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import warnings
from pathlib import Path

import numpy as np

from .errors import NofcError, check_memory, first_line
from .images import BadRegion, default_scale, describe_pixels

__all__ = ["ImageSource", "open_source", "is_slide_folder", "load_image", "scale_of",
           "SLIDE_SUFFIXES", "MAX_PIXELS"]

SLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"}
TIFF_SUFFIXES = {".tif", ".tiff", ".btf", ".tf8"}
PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
_TIFF_MAGIC = {b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"}  # classic and BigTIFF
_PICTURE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")
_FOLDER_FILES = 1000  # files of a folder tried as DICOM (one header each) before giving up
_SAID = {"tiff": "TIFF"}  # kinds as users call the format
_LUMA = np.array([0.299, 0.587, 0.114])
_GEOKEYS = 34735  # GeoKeyDirectoryTag: a TIFF that carries georeferencing
_MPP_TOLERANCE = 0.01  # a requested pixel size within 1% of a level's is that level
MAX_PIXELS = 10**11  # declared pixels above which a file is refused unless max_pixels= says
_CHECKED_READ = 256 << 20  # bytes above which a read first checks that memory holds it

scale_of = default_scale  # the one integer-scaling rule (see the module docstring)


class ImageSource:
    """An image read region by region (see the module docstring).

    Attributes:
        hw: ``(H, W)`` of the pixels read (a slide's chosen level, resampled).
        channels, dtype: what :meth:`read` returns.
        path: the file, or None for an array.
        kind: ``"array"``, ``"picture"``, ``"tiff"``, ``"slide"`` or ``"raster"``.
        downsample: ``(dy, dx)`` level-0 pixels per pixel read (1 but for slides).
        mpp: ``(y, x)`` microns per pixel read, when the file says.
        transform: GDAL-order affine ``(a, b, c, d, e, f)`` of the pixels read (rasters).
        crs: the raster's coordinate reference system as WKT.
        nodata: the raster's nodata value.
        on_error: what a region that cannot be read (a corrupt or truncated tile) does in
            a tiled run: ``"raise"`` stops it in one line naming the file and the pixels,
            ``"skip"`` leaves that region's map blocks NaN (``open_source(on_error=)``).

    It is also array-like, ``(H, W, C)`` by ``[rows, cols]``, so that code written for
    arrays reads it unchanged.
    """

    kind = "array"
    path: str | None = None
    downsample = (1.0, 1.0)
    mpp: tuple[float, float] | None = None
    transform: tuple | None = None
    crs: str | None = None
    nodata = None
    on_error = "raise"

    background = (1.0, 1.0, 1.0)  # what alpha is composited over, in [0, 1]

    def __init__(self, hw, channels: int, dtype, want: int | None = None):
        self.hw = (int(hw[0]), int(hw[1]))
        self._stored, self._want = channels, want  # channels after alpha; asked for
        self._stored_dtype = np.dtype(dtype)
        self.dtype = np.dtype(dtype) if want is None or want == channels or channels == 1 \
            else np.dtype(np.float64)  # luma is computed in float
        self.channels = channels if want is None else want

    # -- what every source has
    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.hw, self.channels)

    @property
    def name(self) -> str:
        kind = _SAID.get(self.kind, self.kind)
        return f"{kind} {self.path}" if self.path else f"the {kind} image"

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        """Pixels ``[rows, cols]`` (steps allowed) as ``(C, h, w)``, channel rule applied.
        A read larger than the memory available is refused before anything is allocated."""
        h, w = len(range(*rows.indices(self.hw[0]))), len(range(*cols.indices(self.hw[1])))
        nbytes = h * w * max(self.channels, self._stored + self._has_alpha) * \
            max(self.dtype.itemsize, self._stored_dtype.itemsize)
        if nbytes > _CHECKED_READ:
            check_memory(nbytes, what=f"reading {self.name} at {describe_pixels(rows, cols)} "
                         f"({h}x{w} pixels)",
                         instead="read it in tiles: nofc heatmap --tile 2048 --out map.zarr "
                                 "(nofc.tiled_predict)")
        try:
            region = self._read(rows, cols)
        except (NofcError, OSError, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - decoders raise anything
            raise BadRegion(f"cannot read {self.name} at {describe_pixels(rows, cols)}: "
                            f"{first_line(exc)}") from None
        return _match(_composite(region, self._has_alpha, self.background), self._want,
                      self.name)

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = key
        return np.moveaxis(self.read(rows, cols), 0, -1)

    def for_channels(self, want: int | None) -> "ImageSource":
        """This source read as ``want`` channels (gray <-> RGB matched as in the module
        docstring); itself when nothing changes. A source opened for other channels, or an
        array in memory without them, is refused in one line."""
        if want is None or want == self._want or (self._want is None and want == self.channels):
            return self
        if self._want is not None:
            raise NofcError(f"{self.name} was opened for {self._want} channels; the network "
                            f"wants {want}")
        _check_channels(self._stored, want, self.name)
        other = copy.copy(self)
        ImageSource.__init__(other, self.hw, self._stored, self._stored_dtype, want)
        return other

    def reading(self) -> dict:
        """The options given when opening that change which pixels are read (a slide's
        level or mpp, a raster's bands), for a store's record of its arguments."""
        return {}

    def describe(self) -> dict:
        """What a map records about its image (``metadata["image"]``)."""
        d = {"path": None if self.path is None else str(Path(self.path).resolve()),
             "kind": self.kind, "shape": list(self.hw), "channels": self.channels,
             "dtype": str(self.dtype), "downsample": list(self.downsample)}
        d.update({k: v for k, v in (("mpp", self.mpp), ("transform", self.transform),
                                     ("crs", self.crs), ("nodata", self.nodata))
                  if v is not None})
        return d

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """``(C, h, w)`` image of at most ``max_side`` pixels a side and how many pixels
        read one of its pixels spans (every f-th pixel; slides use a low level)."""
        f = max(1, -(-max(self.hw) // max_side))
        return self.read(slice(None, None, f), slice(None, None, f)), float(f)

    # -- what each kind provides
    _has_alpha = False

    def _read(self, rows: slice, cols: slice) -> np.ndarray:
        raise NotImplementedError

    def __getstate__(self):  # ship the path, not an open file, to Dask workers
        state = dict(self.__dict__)
        state.pop("_local", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)


def _composite(region: np.ndarray, has_alpha: bool, background=(1.0, 1.0, 1.0)
               ) -> np.ndarray:
    """Colour channels with the last (alpha) channel composited over ``background`` (in
    [0, 1]), in the stored dtype (integers rounded).

    >>> _composite(np.array([[[200]], [[0]]], np.uint8), True)[:, 0, 0].tolist()
    [255]
    """
    if not has_alpha:
        return region
    colour, alpha = region[:-1], region[-1:]
    top = float(np.iinfo(region.dtype).max) if np.issubdtype(region.dtype, np.integer) \
        else 1.0
    if (alpha == top).all():
        return colour
    bg = np.asarray(background, np.float64)[: colour.shape[0], None, None] * top
    a = np.clip(alpha.astype(np.float64) / top, 0.0, 1.0)
    mixed = colour * a + bg * (1.0 - a)
    return (np.rint(mixed) if top != 1.0 else mixed).astype(region.dtype)


def _match(region: np.ndarray, want: int | None, name: str) -> np.ndarray:
    """Gray -> ``want`` identical channels, RGB -> luma; the same count unchanged."""
    have = region.shape[0]
    if want is None or want == have:
        return region
    if have == 1:
        return np.repeat(region, want, axis=0)
    if have == 3 and want == 1:
        return np.tensordot(_LUMA, region.astype(np.float64) * scale_of(region.dtype),
                            axes=1)[None]
    raise NofcError(f"{name} has {have} colour channels and the network expects {want}; "
                    "nofc converts only gray <-> RGB (select bands with bands=)")


def _check_channels(have: int, want: int | None, name: str) -> None:
    if want is not None and want != have and not (have == 1 or (have, want) == (3, 1)):
        _match(np.zeros((have, 1, 1), np.uint8), want, name)  # raises the one message


# --------------------------------------------------------------------------- arrays, files


class ArraySource(ImageSource):
    """A numpy/zarr/dask array or tensor, ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``."""

    def __init__(self, array, layout: str = "auto", want: int | None = None,
                 path: str | None = None, kind: str = "array"):
        shape = tuple(array.shape)
        _check_numbers(getattr(array, "dtype", np.float32))
        strict = path is None and want is not None  # an array in memory: as given
        lay = image_layout(shape, want, layout) if strict else \
            _array_layout(shape, want, layout)
        self.array, self.layout, self.path, self.kind = array, lay, path, kind
        self._layout_given = layout
        c = 1 if lay == "hw" else shape[2] if lay == "hwc" else shape[0]
        self._has_alpha = c in (2, 4) and want not in (2, 4) and not strict
        hw = shape[:2] if lay != "chw" else shape[1:]
        super().__init__(hw, c - self._has_alpha, getattr(array, "dtype", np.float32), want)
        _check_channels(self._stored, want, self.name)

    def for_channels(self, want: int | None) -> ImageSource:
        if self.path is None and self._want is None and want is not None:
            other = ArraySource(self.array, self._layout_given, want)  # as given: strict
            other.on_error = self.on_error
            return other
        return super().for_channels(want)

    def _read(self, rows, cols):
        a = self.array
        region = a[:, rows, cols] if self.layout == "chw" else a[rows, cols]
        region = region.compute() if hasattr(region, "compute") else region
        region = region.numpy() if hasattr(region, "numpy") else region
        region = np.asarray(region)
        if self.layout == "hw":
            return region[None]
        return np.moveaxis(region, -1, 0) if self.layout == "hwc" else region


def _check_numbers(dtype) -> None:
    """Refuse pixels that are not numbers (object, strings, complex, dates) in one line."""
    try:
        kind = np.dtype(dtype).kind
    except TypeError:
        kind = "?"
    if kind not in "biuf":
        raise NofcError(f"image pixels must be numbers (uint8, uint16, float32, ...), got "
                        f"dtype {dtype}; convert them first, e.g. "
                        "np.asarray(image, dtype=np.float32)")


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


def _array_layout(shape, want: int | None, layout: str) -> str:
    """Where the channels of an array are: the axis of ``want`` channels, else the small
    axis at either end (1 to 4: gray, gray + alpha, RGB, RGBA), the last first.

    >>> _array_layout((40, 50, 4), 3, "auto"), _array_layout((1, 40, 50), 3, "auto")
    ('hwc', 'chw')
    """
    if len(shape) == 2:
        return "hw"
    if len(shape) != 3:
        raise NofcError(f"image must be (H, W), (H, W, C) or (C, H, W), got shape {shape}")
    if layout in ("hwc", "chw"):
        return layout  # as the caller says; the channel count is checked after
    for axis, lay in ((2, "hwc"), (0, "chw")):
        if want is not None and shape[axis] == want:
            return lay
    for axis, lay in ((2, "hwc"), (0, "chw")):
        if shape[axis] <= 4:
            return lay
    return image_layout(shape, want or 3, layout)  # raises: no axis of that many channels


class _LazyTiff:
    """A TIFF's first image as a lazy array. A region decodes only the tiles or strips it
    touches, with tifffile's own decoder, in the calling thread: nothing runs on in the
    background when a tile fails (zarr's event loop, which tifffile's ``aszarr`` view
    reads through, left hundreds of pending tasks to print "Task was destroyed" at exit).
    A tile or strip the header declares but the file does not hold (no offset: a
    damaged or forged header) is an error, never zeros. Pickles as its path (Dask workers
    open their own)."""

    def __init__(self, path: str):
        try:
            import tifffile  # noqa: F401
        except ImportError:  # pragma: no cover - part of nofc[scale]
            raise NofcError("reading TIFF needs the scale extra: pip install 'nofc[scale]'"
                            ) from None
        self.path = str(path)
        self._local = threading.local()
        try:
            with _quiet_tifffile():  # header complaints: the region read says what matters
                tif = self._tif()
                series = tif.series[0]
                page = series.keyframe
                self.shape = tuple(series.shape)
                self.dtype = np.dtype(series.dtype)
                self.axes = series.axes
                self._shaped = tuple(page.shaped)  # (separate samples, depth, H, W, samples)
                self.one_page = page.size == int(np.prod(self.shape)) and \
                    self._shaped[1] == 1
                self.others = [(s.keyframe.index, tuple(s.shape)) for s in tif.series[1:]
                               if tuple(s.shape) != self.shape]
        except NofcError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise NofcError(f"cannot read TIFF {path}: {first_line(exc)}") from None

    def _tif(self):
        """This thread's open TiffFile (tiles decode in parallel threads)."""
        tif = getattr(self._local, "tif", None)
        if tif is None:
            import tifffile

            with _quiet_tifffile():
                tif = self._local.tif = tifffile.TiffFile(self.path)
        return tif

    def __getitem__(self, key):
        """``[rows, cols]`` (or ``[:, rows, cols]`` for separate planes), as stored."""
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (len(self.axes) - len(key))
        at = {a: k for a, k in zip(self.axes, key)}
        region = self._region(at["Y"], at["X"])  # (S, h, w, s)
        if self._shaped[0] > 1:
            region = region[..., 0]  # (S, h, w): planes stored apart
        elif len(self.axes) == 3:
            region = region[0]  # (h, w, s)
        else:
            region = region[0, :, :, 0]  # (h, w)
        extra = tuple(k for a, k in zip(self.axes, key) if a not in "YX")
        if any(k != slice(None) for k in extra):
            region = region[tuple(slice(None) if a in "YX" else at[a] for a in self.axes)]
        return region

    def _region(self, rows: slice, cols: slice) -> np.ndarray:
        """Pixels ``[rows, cols]`` as ``(separate samples, h, w, samples)``."""
        tif = self._tif()
        with _quiet_tifffile():
            page = tif.series[0].keyframe
            offsets, counts = page.dataoffsets, page.databytecounts
        nsep, _, H, W, nsamp = self._shaped
        tiled = page.is_tiled
        th, tw = (page.tilelength, page.tilewidth) if tiled else \
            (min(page.rowsperstrip or H, H), W)
        ny, nx = -(-H // th), -(-W // tw)
        ys, xs = np.arange(*rows.indices(H)), np.arange(*cols.indices(W))
        out = np.empty((nsep, len(ys), len(xs), nsamp), self.dtype)
        fh = tif.filehandle
        for ty in np.unique(ys // th):
            r = np.flatnonzero(ys // th == ty)  # rows of out from this tile row
            src_r = slice(ys[r[0]] - ty * th, ys[r[-1]] - ty * th + 1, rows.indices(H)[2])
            for tx in np.unique(xs // tw):
                c = np.flatnonzero(xs // tw == tx)
                src_c = slice(xs[c[0]] - tx * tw, xs[c[-1]] - tx * tw + 1, cols.indices(W)[2])
                for s in range(nsep):
                    i = int(s * ny * nx + ty * nx + tx)
                    if i >= len(offsets) or not offsets[i] or not counts[i]:
                        what = f"tile ({ty}, {tx})" if tiled else f"strip {ty}"
                        raise BadRegion(
                            f"cannot read TIFF {self.path} at {describe_pixels(rows, cols)}: "
                            f"{what} is not in the file (the header declares "
                            f"{ny * nx * nsep} {'tiles' if tiled else 'strips'}, the file "
                            f"holds {int(np.count_nonzero(np.asarray(counts)))}: a damaged "
                            "or forged header)")
                    fh.seek(offsets[i])
                    data = fh.read(counts[i])
                    seg = page.decode(data, i, jpegtables=page.jpegtables,
                                      jpegheader=page.jpegheader)[0]  # (1, th, tw, s)
                    out[s, r[0]:r[-1] + 1, c[0]:c[-1] + 1] = seg[0, src_r, src_c]
        return out

    def __getstate__(self):  # ship the path, not an open file, to Dask workers
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()


@contextlib.contextmanager
def _quiet_tifffile():
    """tifffile's warnings about a header (``incorrect StripOffsets count``) off while a
    file is opened: the region that cannot be read says it in nofc's one line."""
    import logging

    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.ERROR + 1)
    try:
        yield
    finally:
        log.setLevel(level)


class TiffFileSource(ArraySource):
    """A TIFF's first series read lazily through tifffile."""

    def __init__(self, path: str, want: int | None = None, max_pixels: int | None = MAX_PIXELS):
        tiff = _LazyTiff(path)
        if not tiff.one_page or len(tiff.shape) not in (2, 3) or "Y" not in tiff.axes \
                or "X" not in tiff.axes:
            raise NofcError(f"{path}: TIFF of shape {tiff.shape} ({tiff.axes}) is not a single "
                            "2D image (several pages or a volume?); save the image to read as "
                            "a TIFF of its own")
        _check_pixels(tiff.shape[tiff.axes.index("Y")], tiff.shape[tiff.axes.index("X")],
                      path, max_pixels)
        if tiff.others:
            warnings.warn(f"{path} holds {1 + len(tiff.others)} images of different shapes ("
                          + ", ".join(f"page {i}: {'x'.join(map(str, s))}"
                                      for i, s in [(0, tiff.shape), *tiff.others][:4])
                          + f"); reading the first, page 0 ({'x'.join(map(str, tiff.shape))}); "
                          "save the one you want as a TIFF of its own", stacklevel=4)
        shape = tiff.shape
        layout = "auto" if len(shape) == 2 else "chw" if tiff.axes[0] in "SC" else "hwc"
        super().__init__(tiff, layout, want, path=str(path), kind="tiff")


class PictureSource(ArraySource):
    """PNG, JPEG, BMP, ... read whole through Pillow (they cannot be read by region)."""

    def __init__(self, path: str, want: int | None = None, max_pixels: int | None = MAX_PIXELS):
        super().__init__(_read_picture(path, max_pixels), "auto", want, path=str(path),
                         kind="picture")


def _read_picture(path, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Pixels of a picture as stored: palettes expanded, 16-bit as uint16, bilevel 0/255;
    its declared size checked against ``max_pixels`` and the memory before decoding."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # a large scan is the point here: max_pixels limits it
    try:
        with Image.open(path) as im:
            w, h = im.size
            _check_pixels(h, w, path, max_pixels)
            check_memory(h * w * 4 * len(im.getbands()),
                         what=f"decoding {path} ({h}x{w} pixels; PNG and JPEG are read whole)",
                         instead="save it as a tiled TIFF, which nofc reads by tiles")
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
        raise NofcError(f"cannot read image {path}: {first_line(exc)}") from None
    arr = arr.astype(arr.dtype.newbyteorder("="))
    if mode.startswith("I") and arr.dtype != np.uint16 and arr.size and arr.min() >= 0 \
            and arr.max() <= 65535:
        arr = arr.astype(np.uint16)  # Pillow reads 16-bit PNGs as 32-bit "I"
    return arr


# --------------------------------------------------------------------------- slides


class SlideSource(ImageSource):
    """A whole-slide image through OpenSlide, at a ``level`` or a pixel size ``mpp``.

    With ``mpp`` the level is the coarsest one at least that fine; between two levels
    the pixels are resampled from it (box filter, so tiles agree where they meet).
    """

    kind = "slide"
    _has_alpha = True  # OpenSlide gives RGBA: transparent outside the scanned area

    def __init__(self, path: str, *, level: int | None = None, mpp: float | None = None,
                 want: int | None = None):
        self.path = str(path)
        slide = _open_slide(self.path)
        try:
            dims, downs = slide.level_dimensions, slide.level_downsamples
            props = slide.properties
            mpp0 = _slide_mpp(props)
        finally:
            slide.close()
        if level is not None and mpp is not None:
            raise NofcError("give level= or mpp=, not both")
        self._asked = {"level": level, "mpp": mpp}
        if level is None and mpp is None:
            level = 0
        if level is not None:
            if not 0 <= int(level) < len(dims):
                raise NofcError(f"{path} has levels 0..{len(dims) - 1} (downsamples "
                                f"{', '.join(f'{d:g}' for d in downs)}), not level {level}")
            self.level, factor = int(level), 1.0
            hw = dims[self.level][::-1]
            ds = (dims[0][1] / hw[0], dims[0][0] / hw[1])
        else:
            self.level, factor, hw, ds = _level_for_mpp(path, mpp, mpp0, dims, downs)
        self.factor = factor  # pixels of the level per pixel read (1: no resampling)
        self.level_downsample = float(downs[self.level])
        self.downsample = ds
        self.mpp = None if mpp0 is None else (mpp0[0] * ds[0], mpp0[1] * ds[1])
        self._local = threading.local()
        super().__init__(hw, 3, np.uint8, want)
        _check_channels(3, want, self.name)

    def reading(self) -> dict:
        return {k: v for k, v in self._asked.items() if v is not None}

    def _slide(self):
        slide = getattr(self._local, "slide", None) if hasattr(self, "_local") else None
        if slide is None:
            if not hasattr(self, "_local"):
                self._local = threading.local()
            slide = self._local.slide = _open_slide(self.path)
        return slide

    def _read(self, rows, cols):
        y0, y1, sy = rows.indices(self.hw[0])
        x0, x1, sx = cols.indices(self.hw[1])
        if (sy, sx) == (1, 1):
            return self._region(y0, y1, x0, x1, self.level, self.factor)
        # a preview (every s-th pixel): resampled from the coarsest level fine enough
        s = min(sy, sx)
        downs = self._slide().level_downsamples
        level = max(i for i, d in enumerate(downs) if d <= self.downsample[0] * s * 1.001)
        shape = (len(range(y0, y1, sy)), len(range(x0, x1, sx)))
        f = self.downsample[0] / downs[level]  # level pixels per pixel read
        out = self._region(y0, y1, x0, x1, level, f, shape)
        return out

    def _region(self, y0, y1, x0, x1, level, f, shape=None) -> np.ndarray:
        """Rows y0..y1, columns x0..x1 (pixels read), from ``level`` at ``f`` of its pixels
        per pixel read, as ``shape`` (default: one pixel each)."""
        level_hw = self._slide().level_dimensions[level][::-1]
        ly0, lx0 = int(np.floor(y0 * f)), int(np.floor(x0 * f))
        ly1 = min(level_hw[0], int(np.ceil(y1 * f)))
        lx1 = min(level_hw[1], int(np.ceil(x1 * f)))
        ds = self._slide().level_downsamples[level]
        try:
            im = self._slide().read_region((int(round(lx0 * ds)), int(round(ly0 * ds))),
                                           level, (lx1 - lx0, ly1 - ly0))
        except Exception:
            self._local.slide = None  # OpenSlide handles are unusable after an error
            raise
        h, w = shape or (y1 - y0, x1 - x0)
        if f != 1.0 or (h, w) != (y1 - y0, x1 - x0):  # box filter: the same grid every tile
            from PIL import Image

            im = im.resize((w, h), Image.Resampling.BOX,
                           box=(x0 * f - lx0, y0 * f - ly0, x1 * f - lx0, y1 * f - ly0))
        return np.moveaxis(np.asarray(im), -1, 0)

    def thumbnail(self, max_side: int = 2048):
        """From the finest level whose longest side is at most ``max_side`` (or the last)."""
        slide = self._slide()
        dims = slide.level_dimensions
        fits = [i for i, (w, h) in enumerate(dims) if max(w, h) <= max_side]
        level = fits[0] if fits else len(dims) - 1
        w, h = dims[level]
        region = np.moveaxis(np.asarray(slide.read_region((0, 0), level, (w, h))), -1, 0)
        per = slide.level_downsamples[level] / self.downsample[0]  # pixels read per pixel
        return _match(_composite(region, True, self.background), self._want, self.name), \
            float(per)


def _open_slide(path: str):
    try:
        import openslide
    except ImportError:
        raise NofcError("whole-slide images need OpenSlide: pip install 'nofc[slides]'"
                        ) from None
    if not Path(path).is_file():
        raise NofcError(f"image file not found: {path}")
    try:
        return openslide.OpenSlide(path)
    except Exception as exc:  # noqa: BLE001 - OpenSlideError, unsupported format
        raise NofcError(f"cannot read slide {path}: {first_line(exc)}") from None


def _slide_mpp(props) -> tuple[float, float] | None:
    try:
        return (float(props["openslide.mpp-y"]), float(props["openslide.mpp-x"]))
    except (KeyError, ValueError):
        return None


def _level_for_mpp(path, mpp, mpp0, dims, downs):
    """``(level, factor, (H, W), downsample)`` for a requested pixel size ``mpp``."""
    try:
        mpp = float(mpp)
    except (TypeError, ValueError):
        raise NofcError(f"mpp must be a number of microns per pixel, got {mpp!r}") from None
    if mpp0 is None:
        raise NofcError(f"{path} does not record its pixel size (no openslide.mpp-x); "
                        f"choose a level= instead (levels 0..{len(dims) - 1})")
    base = (mpp0[0] + mpp0[1]) / 2
    want = mpp / base  # level-0 pixels per pixel read
    if mpp <= 0 or want < 1 - _MPP_TOLERANCE:
        raise NofcError(f"mpp={mpp:g} is finer than level 0 of {path} ({base:g} microns per "
                        f"pixel); choose mpp >= {base:g}")
    level = max(i for i, d in enumerate(downs) if d <= want * (1 + _MPP_TOLERANCE))
    factor = want / downs[level]
    if abs(factor - 1) <= _MPP_TOLERANCE:
        hw = dims[level][::-1]
        return level, 1.0, hw, (dims[0][1] / hw[0], dims[0][0] / hw[1])
    lh, lw = dims[level][::-1]
    hw = (int(lh / factor), int(lw / factor))
    return level, factor, hw, (downs[level] * factor,) * 2


# --------------------------------------------------------------------------- rasters


class RasterSource(ImageSource):
    """A raster through rasterio (GeoTIFF, COG, JPEG 2000, ...), read by window.

    ``bands`` are 1-based band numbers (default: every band that is not alpha; an alpha
    band is composited like any alpha channel).
    """

    kind = "raster"

    def __init__(self, path: str, *, bands=None, want: int | None = None):
        self.path = str(path)
        self._local = threading.local()
        ds = self._dataset()
        try:
            from rasterio.enums import ColorInterp
        except ImportError:  # pragma: no cover - checked by _dataset
            raise
        alpha = [i + 1 for i, c in enumerate(ds.colorinterp) if c == ColorInterp.alpha]
        given = bands is not None
        if bands is None:
            bands = [b for b in range(1, ds.count + 1) if b not in alpha]
        bands = [int(b) for b in np.atleast_1d(bands)]
        bad = [b for b in bands if not 1 <= b <= ds.count]
        if bad or not bands:
            raise NofcError(f"{path} has bands 1..{ds.count}, not {bad or bands}; choose "
                            "bands among those")
        self._asked = {"bands": bands} if given else {}
        self.bands = bands + (alpha[:1] if alpha and alpha[0] not in bands else [])
        self._has_alpha = len(self.bands) > len(bands)
        dtypes = {ds.dtypes[b - 1] for b in self.bands}
        if len(dtypes) > 1:
            raise NofcError(f"{path}: bands {self.bands} have different types {sorted(dtypes)}; "
                            "choose bands of one type")
        t = ds.transform
        self.transform = (t.a, t.b, t.c, t.d, t.e, t.f)
        self.crs = ds.crs.to_wkt() if ds.crs else None
        self.nodata = ds.nodata
        super().__init__((ds.height, ds.width), len(bands), dtypes.pop(), want)
        _check_channels(len(bands), want, self.name)

    def reading(self) -> dict:
        return dict(self._asked)

    def _dataset(self):
        ds = getattr(self._local, "ds", None) if hasattr(self, "_local") else None
        if ds is None:
            try:
                import rasterio
            except ImportError:
                raise NofcError("rasters need rasterio: pip install 'nofc[geo]'") from None
            if not Path(self.path).is_file():
                raise NofcError(f"image file not found: {self.path}")
            try:
                ds = rasterio.open(self.path)
            except Exception as exc:  # noqa: BLE001 - RasterioIOError
                raise NofcError(f"cannot read raster {self.path}: {first_line(exc)}") from None
            if not hasattr(self, "_local"):
                self._local = threading.local()
            self._local.ds = ds
        return ds

    def _read(self, rows, cols):
        from rasterio.windows import Window

        y0, y1, sy = rows.indices(self.hw[0])
        x0, x1, sx = cols.indices(self.hw[1])
        shape = (len(self.bands), len(range(y0, y1, sy)), len(range(x0, x1, sx)))
        # steps (previews): GDAL decimates, from overviews when the file has them
        return self._dataset().read(self.bands, window=Window(x0, y0, x1 - x0, y1 - y0),
                                    out_shape=shape)

    def valid_mask(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """Where the raster has data (GDAL's mask: nodata, alpha), at most ``max_side``
        pixels a side, and how many pixels read one mask pixel spans."""
        ds = self._dataset()
        f = max(1, -(-max(self.hw) // max_side))
        shape = (-(-self.hw[0] // f), -(-self.hw[1] // f))
        return ds.dataset_mask(out_shape=shape) > 0, float(f)


def _is_geotiff(path: Path) -> bool:
    """Whether a TIFF carries georeferencing (GeoKeys, or a model transform)."""
    try:
        import tifffile

        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            return _GEOKEYS in tags or 33922 in tags or 34264 in tags
    except Exception:  # noqa: BLE001 - not a TIFF tifffile reads: OpenSlide or GDAL may
        return False


def _slide_format(path: Path) -> str | None:
    """OpenSlide's name for the format of ``path`` (``"aperio"``, ``"dicom"``,
    ``"generic-tiff"``, ...) from its content, or None (not a slide, or no OpenSlide)."""
    try:
        import openslide
    except ImportError:
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001
        return None


def _content(path: Path) -> str | None:
    """``"tiff"`` or ``"picture"`` from a file's first bytes, None for anything else.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "looks.tif")
    >>> _ = open(p, "wb").write(b"\\x89PNG\\r\\n\\x1a\\n" + bytes(8))
    >>> _content(Path(p))
    'picture'
    """
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    if any(head.startswith(m) for m in _PICTURE_MAGIC) or \
            (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "picture"
    return None


def _pyramid_levels(path: Path) -> int:
    """Levels OpenSlide reads from a generic tiled TIFF whose pixels it gives as stored
    (8-bit RGB or RGBA), else 0: OpenSlide turns 16-bit, float and other channel counts
    into 8-bit RGB, which would change the numbers."""
    try:
        import openslide
        import tifffile

        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            if page.dtype != np.uint8 or page.samplesperpixel not in (3, 4):
                return 0
        with contextlib.closing(openslide.OpenSlide(str(path))) as slide:
            return slide.level_count
    except Exception:  # noqa: BLE001 - unreadable: the reader chosen says why
        return 0


def is_slide_folder(path) -> bool:
    """Whether ``path`` is a folder holding a DICOM whole-slide image (one slide, read
    through one of its files), not a folder of images.

    >>> import tempfile
    >>> is_slide_folder(tempfile.mkdtemp()), is_slide_folder("no/such/folder")
    (False, False)
    """
    try:
        return Path(path).is_dir() and _dicom_in(Path(path)) is not None
    except NofcError:
        return False


def _dicom_in(folder: Path) -> Path:
    """The first file of ``folder`` that OpenSlide opens as a DICOM whole-slide image
    (OpenSlide finds the series' other files, its levels, beside it); one NofcError line
    when there is none.

    >>> import tempfile
    >>> _dicom_in(Path(tempfile.mkdtemp()))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    nofc.errors.NofcError: ... is a folder without a DICOM whole-slide image; give an ...
    """
    try:
        names = sorted(folder.iterdir())
    except OSError as exc:
        raise NofcError(f"cannot read folder {folder}: {exc.strerror or exc}") from None
    for p in names[:_FOLDER_FILES]:
        if p.is_file() and _slide_format(p) == "dicom":
            return p
    mrxs = folder.parent / f"{folder.name}.mrxs"  # MIRAX: a file beside its data folder
    raise NofcError(f"{folder} is a folder without a DICOM whole-slide image"
                    + ("" if len(names) <= _FOLDER_FILES else
                       f" among its first {_FOLDER_FILES} files")
                    + (f"; give the slide's file, {mrxs}" if mrxs.is_file() else
                       "; give an image file (a folder is read only when it holds a DICOM "
                       "WSI series)"))


# --------------------------------------------------------------------------- one way in


def open_source(image, *, channels: int | None = None, layout: str = "auto", level=None,
                mpp=None, bands=None, on_error: str = "raise",
                max_pixels: int | None = MAX_PIXELS) -> ImageSource:
    """The :class:`ImageSource` for what the user gives; the options of reading a file
    travel with it (``tiled_predict(open_source("scan.svs", mpp=0.5), ...)``).

    Args:
        image: an array (numpy, memmap, zarr, dask, torch), an :class:`ImageSource`, or a
            path, read by its content whatever its suffix (:func:`file_kind`): slides
            (SVS, NDPI, MRXS, SCN, DICOM: a file of the series or its folder, a pyramidal
            8-bit RGB TIFF, one level of a tiled one when ``level`` or ``mpp`` is given)
            through OpenSlide; a TIFF with georeferencing, or any other file GDAL opens,
            through rasterio; other TIFFs through tifffile (lazily); PNG/JPEG whole.
        channels: the channels the network wants (gray <-> RGB matched), or None.
        layout: where an array's channels are: ``"auto"``, ``"hwc"`` or ``"chw"``.
        level, mpp: a slide's level, or microns per pixel (pick the level, resample).
        bands: a raster's 1-based bands.
        on_error: ``"raise"`` or ``"skip"``: what a region that cannot be read does in a
            tiled run (``ImageSource.on_error``).
        max_pixels: a file whose header declares more pixels (height x width read) is
            refused before any pixel is read: a forged or corrupt header (a decompression
            bomb) would otherwise start a run of years or an allocation of terabytes.
            Default ``MAX_PIXELS`` (10**11); None: no limit.

    >>> open_source(np.zeros((2, 30, 20), np.float32), channels=2).hw
    (30, 20)
    >>> open_source("scan.svs", on_error="retry")
    Traceback (most recent call last):
    ...
    nofc.errors.NofcError: on_error must be 'raise' or 'skip', got 'retry'
    """
    if on_error not in ("raise", "skip"):
        raise NofcError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if layout not in ("auto", "hwc", "chw"):
        raise NofcError(f"layout must be 'auto', 'hwc' or 'chw', got {layout!r}")
    max_pixels = _pixel_limit(max_pixels)
    if isinstance(image, ImageSource):
        if level is not None or mpp is not None or bands is not None or layout != "auto":
            raise NofcError("the image is already open: give layout=, level=, mpp= and "
                            "bands= to the open_source call that opened it")
        src = image.for_channels(channels)
        if on_error != "raise" and src.on_error != on_error:
            src = copy.copy(src) if src is image else src
            src.on_error = on_error
        return src
    src = _open(image, channels, layout, level, mpp, bands, max_pixels)
    src.on_error = on_error
    return src


def _pixel_limit(max_pixels) -> int | None:
    """``max_pixels`` as a positive int (``1e12`` is fine), or None."""
    if max_pixels is None:
        return None
    try:
        limit = float(max_pixels)
    except (TypeError, ValueError):
        limit = float("nan")
    if isinstance(max_pixels, bool) or not (np.isfinite(limit) and limit >= 1):
        raise NofcError(f"max_pixels must be a positive number of pixels (or None: no "
                        f"limit), got {max_pixels!r}")
    return int(limit)


def _check_pixels(h: int, w: int, path, max_pixels: int | None) -> None:
    """Refuse a file whose header declares more than ``max_pixels`` pixels."""
    def mpix(n: int) -> str:
        return f"{n / 1e6:,.0f}" if n >= 1e6 else f"{n / 1e6:.3g}"

    if max_pixels is not None and h * w > max_pixels:
        raise NofcError(f"{path} declares {h}x{w} pixels ({mpix(h * w)} Mpix), more than "
                        f"the limit of {mpix(max_pixels)} Mpix (a corrupt or forged "
                        f"header?); if the image is that large, raise the limit: "
                        f"--max-pixels {h * w} (open_source(max_pixels=))")


def _open(image, channels, layout, level, mpp, bands, max_pixels) -> ImageSource:
    if not isinstance(image, (str, os.PathLike)):
        if level is not None or mpp is not None or bands is not None:
            raise NofcError("level=, mpp= and bands= apply to slide and raster files, not "
                            "to arrays")
        if hasattr(image, "detach"):
            image = image.detach().cpu().numpy()
        if not (hasattr(image, "shape") and hasattr(image, "__getitem__")):
            raise NofcError(f"image must be an array, a tensor or a file path, got "
                            f"{type(image).__name__}")
        return ArraySource(image, layout, channels)
    path = Path(image)
    if path.is_dir():
        path = _dicom_in(path)  # a DICOM series' folder: OpenSlide opens it by one file
    elif not path.is_file():
        raise NofcError(f"image file not found: {image}")
    if path.stat().st_size == 0:
        raise NofcError(f"cannot read image {image}: the file is empty")
    slide_args = level is not None or mpp is not None
    if bands is not None and slide_args:
        raise NofcError("bands= applies to rasters, level=/mpp= to slides: not both")
    kind = file_kind(path, slide=slide_args, bands=bands is not None)
    read_as = f"{image} is read as a {_SAID.get(kind, kind)} ({_READS[kind]})"
    if slide_args and kind != "slide":
        raise NofcError("level= and mpp= apply to whole-slide images (files OpenSlide reads: "
                        f"SVS, NDPI, MRXS, SCN, DICOM, pyramidal RGB TIFF); {read_as}")
    if bands is not None and kind != "raster":
        raise NofcError(f"bands= applies to rasters; {read_as}")
    if kind == "tiff":
        return TiffFileSource(str(path), want=channels, max_pixels=max_pixels)
    if kind == "picture":
        return PictureSource(str(path), want=channels, max_pixels=max_pixels)
    src = SlideSource(str(path), level=level, mpp=mpp, want=channels) if kind == "slide" \
        else RasterSource(str(path), bands=bands, want=channels)
    _check_pixels(*src.hw, image, max_pixels)  # from the header: no pixel read yet
    return src


def file_kind(path: Path, *, slide: bool = False, bands: bool = False) -> str:
    """How a file is read, decided by its content, whatever its suffix: ``"slide"``
    (OpenSlide: SVS, NDPI, MRXS, SCN, DICOM, ... and a pyramidal 8-bit RGB tiled TIFF, or
    one level of it when ``slide``: level/mpp asked), ``"raster"`` (rasterio: a GeoTIFF, a
    TIFF whose ``bands`` are asked for, anything else GDAL opens), ``"tiff"`` (tifffile:
    other TIFFs) or ``"picture"`` (Pillow: PNG, JPEG, BMP, GIF, WebP). A file whose
    content says nothing (or without OpenSlide installed) goes by its suffix.

    >>> file_kind(Path("scan.svs")), file_kind(Path("scene.jp2")), file_kind(Path("a.png"))
    ('slide', 'raster', 'picture')
    """
    fmt = _slide_format(path)
    if fmt not in (None, "generic-tiff"):
        return "slide"  # a vendor's format, DICOM included
    content = _content(path)
    if content == "tiff":
        if _is_geotiff(path):
            return "raster"
        if fmt == "generic-tiff" and _pyramid_levels(path) > (0 if slide else 1):
            return "slide"
        return "raster" if bands else "tiff"
    if content == "picture":
        return "picture"
    suffix = path.suffix.lower()
    if suffix in SLIDE_SUFFIXES:
        return "slide"  # unreadable, or no OpenSlide: opening it says which
    if suffix in TIFF_SUFFIXES:
        return "tiff"
    return "picture" if suffix in PICTURE_SUFFIXES else "raster"


_READS = {"slide": "choose level= or mpp= instead",
          "raster": "choose bands= instead",
          "tiff": "one image, read as stored; bands= reads a multi-band TIFF as a raster",
          "picture": "read whole, as stored; nothing to choose"}


def load_image(path, *, channels: int = 3, background=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Read an image file as float32 ``(channels, H, W)`` in [0, 1] (floats: as stored),
    through the same source, channel, alpha and scaling rules as tiling
    (``nofc.sources``).

    >>> import numpy as np, PIL.Image, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "a.png")
    >>> PIL.Image.fromarray(np.zeros((5, 7), np.uint8)).save(p)
    >>> load_image(p, channels=3).shape
    (3, 5, 7)
    """
    src = open_source(path, channels=channels)
    src.background = tuple(background)
    region = src.read(slice(None), slice(None))
    return np.ascontiguousarray(region.astype(np.float32) * np.float32(scale_of(region.dtype)))
