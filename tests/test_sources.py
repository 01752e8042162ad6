"""The field's own images in and maps out: one image path for arrays, PNG, TIFF, slides
(OpenSlide, at a level or a pixel size) and rasters (rasterio); masks; GeoTIFF and QuPath
GeoJSON outputs; and the CLI on them. Every file is built here: pyramidal tiled TIFF
slides written with tifffile (OpenSlide opens them as generic-tiff) and GeoTIFFs written
with rasterio in a projected CRS (UTM 33N)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import nofc
from nofc.sinks import GeoJsonOutput, GeoTiffOutput, output_for
from nofc import NofcError
from nofc.cli import main
from nofc.sources import load_image
from nofc.sources import open_source

openslide = pytest.importorskip("openslide")
rasterio = pytest.importorskip("rasterio")
tifffile = pytest.importorskip("tifffile")
shapely = pytest.importorskip("shapely.geometry")

SIZE = (3, 16, 16)
F64 = torch.float64
RNG = np.random.default_rng(0)
IMG = RNG.integers(0, 256, (96, 128, 3), dtype=np.uint8)
CLASSES = ["tumour", "stroma", "glass"]


class Tiny(nn.Module):
    """Window 16 (every pixel of it seen), stride 4, no padding: cells equal crops."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 4, stride=2), nn.ReLU(),
                                      nn.Conv2d(4, 6, 3, stride=2), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 3 * 3, 3))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def fcn():
    torch.manual_seed(0)
    return nofc.convert(Tiny().eval(), SIZE).to(F64)


def _run(fcn, image, **kw):
    return nofc.tiled_predict(fcn, image, SIZE, tile=32, progress=False, dtype=F64, **kw)


def write_slide(path, img, levels=3, mpp=0.25, tile=32):
    """A pyramidal tiled TIFF (level k: every 2**k-th pixel) with its pixel size."""
    with tifffile.TiffWriter(path) as tw:
        for k in range(levels):
            res = 1e4 / (mpp * 2 ** k)
            tw.write(img[:: 2 ** k, :: 2 ** k], tile=(tile, tile), photometric="rgb",
                     compression="zlib", resolution=(res, res), resolutionunit="CENTIMETER",
                     subfiletype=0 if k == 0 else 1)
    return path


TRANSFORM = (10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0)


def write_geotiff(path, bands, nodata=None, **kw):
    """A (C, H, W) array as a tiled GeoTIFF, 10 m pixels in UTM 33N."""
    from affine import Affine

    c, h, w = bands.shape
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=c,
                       dtype=bands.dtype.name, crs="EPSG:32633", transform=Affine(*TRANSFORM),
                       tiled=True, blockxsize=32, blockysize=32, nodata=nodata, **kw) as dst:
        dst.write(bands)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    from PIL import Image

    Image.fromarray(IMG).save(d / "img.png")
    tifffile.imwrite(d / "img.tif", IMG, tile=(32, 32))
    return {"numpy": IMG, "png": str(d / "img.png"), "tiff": str(d / "img.tif"),
            "slide": str(write_slide(d / "slide.tif", IMG)),
            "svs-like": str(write_slide(d / "slide2.tif", IMG)),
            "geotiff": str(write_geotiff(d / "scene.tif", np.moveaxis(IMG, -1, 0))),
            "dir": d}


# --------------------------------------------------------------------------- one way in


def test_same_map_from_numpy_png_tiff_slide_geotiff_whole_tiled_dask(fcn, files):
    whole = nofc.dense_predict(fcn, torch.from_numpy(np.moveaxis(IMG, -1, 0) / 255.0)[None],
                               SIZE)[0].numpy()
    ref = _run(fcn, IMG)
    np.testing.assert_allclose(ref, whole, rtol=0, atol=1e-10)
    for kind in ("png", "tiff", "slide", "geotiff"):
        got = _run(fcn, open_source(files[kind], level=0) if kind == "slide" else files[kind])
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10, err_msg=kind)
    kinds = {k: open_source(files[k]).kind for k in ("png", "tiff", "slide", "geotiff")}
    # by content: a pyramid of 8-bit RGB levels is a slide, one tiled level a TIFF
    assert kinds == {"png": "picture", "tiff": "tiff", "slide": "slide", "geotiff": "raster"}
    assert open_source(files["tiff"], level=0).kind == "slide"
    # the source travels by path, with its options
    dask = _run(fcn, open_source(files["slide"], level=0), backend="dask")
    np.testing.assert_allclose(dask, ref, rtol=0, atol=1e-10)


def test_level_and_mpp_equal_the_level_array_and_boxes_are_level_0(fcn, files, tmp_path):
    level1 = np.ascontiguousarray(IMG[::2, ::2])
    ref = _run(fcn, level1)
    for src in (open_source(files["slide"], level=1), open_source(files["slide"], mpp=0.5)):
        np.testing.assert_allclose(_run(fcn, src), ref, rtol=0, atol=1e-10)
    src = open_source(files["slide"], mpp=0.5)
    assert (src.level, src.downsample, src.mpp) == (1, (2.0, 2.0), (0.5, 0.5))
    geo = nofc.geometry(fcn, SIZE)
    from nofc.placement import placement_of

    boxes = placement_of(src, geo, geo.stride).boxes(src.hw)
    np.testing.assert_array_equal(boxes, geo.boxes(src.hw) * 2)
    between = open_source(files["slide"], mpp=0.75)  # between levels 1 and 2: resampled
    assert between.hw == (32, 42) and between.level == 1
    assert between.read(slice(0, 32), slice(0, 42)).shape == (3, 32, 42)
    out = tmp_path / "map.tif"
    _run(fcn, open_source(files["slide"], level=1),
         out=GeoTiffOutput(str(out), metadata={"classes": CLASSES}))
    with rasterio.open(out) as ds:  # the map's pixels are in level-0 slide coordinates
        ys, xs = geo.centers(src.hw)
        assert ds.xy(2, 3) == pytest.approx((xs[3] * 2, ys[2] * 2))
        assert ds.descriptions == tuple(CLASSES)


@pytest.mark.parametrize("step", [None, 2])
def test_geotiff_georeferencing_follows_the_window_centres(fcn, files, tmp_path, step):
    out = tmp_path / "map.tif"
    got = _run(fcn, files["geotiff"], out=GeoTiffOutput(str(out), values="logits"), step=step)
    ref = _run(fcn, IMG, step=step)
    geo = nofc.geometry(fcn, SIZE)
    ys, xs = geo.centers(IMG.shape[:2], step=step)
    a, b, c, d, e, f = TRANSFORM
    with rasterio.open(out) as ds:
        np.testing.assert_allclose(ds.read(), ref, rtol=0, atol=1e-6)  # float32 file
        assert ds.crs.to_epsg() == 32633
        for i, j in ((0, 0), (5, 7), (len(ys) - 1, len(xs) - 1)):
            assert ds.xy(i, j) == pytest.approx((a * xs[j] + c, e * ys[i] + f))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-6)


def test_bands_nodata_and_auto_mask_of_a_raster(fcn, tmp_path):
    bands = np.concatenate([np.moveaxis(IMG, -1, 0), np.full((1, 96, 128), 7, np.uint8)])
    bands[:, :, 64:] = 0  # the right half is nodata
    path = write_geotiff(tmp_path / "five.tif", bands, nodata=0, photometric="MINISBLACK")
    src = open_source(str(path), bands=[3, 2, 1], channels=3)
    assert src.read(slice(0, 2), slice(0, 2)).tolist() == bands[[2, 1, 0], :2, :2].tolist()
    stats = {}
    got = _run(fcn, open_source(str(path), bands=[1, 2, 3]), mask="auto", stats=stats)
    assert np.isnan(got[:, :, -5:]).all() and np.isfinite(got[:, :, :5]).all()
    assert stats["computed"] < stats["windows"]
    named = tmp_path / "scan.svs"  # the content decides, not the suffix
    named.write_bytes(path.read_bytes())
    assert open_source(str(named), bands=[3, 2, 1]).kind == "raster"
    svs = write_slide(tmp_path / "pyramid.tif", IMG)
    with pytest.raises(NofcError, match=r"bands= applies to rasters; .*pyramid.tif is read "
                                        r"as a slide \(choose level= or mpp= instead\)"):
        open_source(str(svs), bands=[1, 2, 3])
    with pytest.raises(NofcError, match="has bands 1..4, not"):
        open_source(str(path), bands=[5])


# --------------------------------------------------------------------------- masks


def _glass_slide(path):
    """A 256 x 256 slide: tissue (saturated colours) in the top-left 27%, white glass
    (the tissue ends where a block of map cells does: tile 32, step 4)."""
    img = np.full((256, 256, 3), 240, np.uint8)
    img += RNG.integers(0, 8, img.shape, dtype=np.uint8)  # glass is not perfectly flat
    tissue = RNG.integers(0, 256, (134, 134, 3), dtype=np.uint8)
    tissue[..., 0] = 200  # pink-ish, saturated
    tissue[..., 1] //= 3
    img[:134, :134] = tissue
    return write_slide(path, img, tile=64), img


def test_auto_mask_computes_a_third_and_keeps_foreground_cells(fcn, tmp_path):
    path, img = _glass_slide(tmp_path / "glass.tif")
    stats = {}
    full = _run(fcn, img)
    masked = _run(fcn, open_source(str(path), level=0), mask="auto", stats=stats)
    assert stats["computed"] <= 0.35 * stats["windows"], stats
    fg = np.isfinite(masked).all(0)
    assert fg.any() and (~fg).any()
    # tiles under a mask, bands without: the same cells to float64's tolerance
    np.testing.assert_allclose(masked[:, fg], full[:, fg], rtol=0, atol=1e-10)
    with pytest.raises(NofcError, match="not the same aspect"):
        _run(fcn, img, mask=np.ones((10, 30), bool))


def test_mask_array_and_file(fcn, tmp_path):
    mask = np.zeros((48, 64), bool)
    mask[:24, :32] = True  # half resolution: the top-left quarter
    got = _run(fcn, IMG, mask=mask)
    from PIL import Image

    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    np.testing.assert_array_equal(_run(fcn, IMG, mask=str(tmp_path / "m.png")), got)
    assert np.isnan(got[:, -1, -1]).all() and np.isfinite(got[:, 0, 0]).all()


# --------------------------------------------------------------------------- outputs


def test_qupath_geojson_is_valid_in_slide_pixels_with_class_measurements(fcn, files,
                                                                          tmp_path):
    out = tmp_path / "cells.geojson"
    scores = _run(fcn, open_source(files["slide"], level=1),
                  out=GeoJsonOutput(str(out), threshold=0.0, metadata={"classes": CLASSES}))
    doc = json.loads(out.read_text())
    assert doc["type"] == "FeatureCollection"
    feats = doc["features"]
    assert len(feats) == scores.shape[1] * scores.shape[2]
    for feat in feats[:50]:
        poly = shapely.shape(feat["geometry"])
        assert poly.is_valid and poly.area == pytest.approx(8 * 8)  # step 4 at level 1
        minx, miny, maxx, maxy = poly.bounds
        assert 0 <= minx and maxx <= 128 and 0 <= miny and maxy <= 96  # level-0 pixels
        props = feat["properties"]
        assert props["objectType"] == "detection"
        assert set(CLASSES) <= set(props["measurements"])
        assert props["classification"]["name"] in CLASSES
    none = tmp_path / "none.geojson"
    _run(fcn, IMG, out=output_for(none, threshold=1.0))
    assert json.loads(none.read_text())["features"] == []
    with pytest.raises(nofc.NofcError, match=r"unknown output suffix '\.shp'.*\.zarr"):
        _run(fcn, IMG, out=str(tmp_path / "cells.shp"))
    with pytest.raises(nofc.NofcError, match=r"threshold does not apply to \.zarr output"):
        output_for(tmp_path / "m.zarr", threshold=0.5)
    assert not (tmp_path / "cells.shp").exists() and not (tmp_path / "m.zarr").exists()


# --------------------------------------------------------------------------- regressions


def test_regressions_of_the_three_image_paths(fcn, tmp_path):
    # RGBA TIFF: composited over white on both paths (the tiled path used to refuse it)
    rgba = np.dstack([IMG, np.full(IMG.shape[:2], 255, np.uint8)])
    rgba[:10, :10, 3] = 0
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, tile=(32, 32))
    flat = IMG.copy()
    flat[:10, :10] = 255
    np.testing.assert_allclose(_run(fcn, str(tmp_path / "rgba.tif")), _run(fcn, flat),
                               rtol=0, atol=1e-10)
    np.testing.assert_allclose(load_image(tmp_path / "rgba.tif"),
                               np.moveaxis(flat, -1, 0) / 255.0, atol=1e-7)
    # int32: scaled by the dtype (2**31 - 1) on both paths, not by the value range
    big = (IMG.astype(np.int32) << 20)
    tifffile.imwrite(tmp_path / "i32.tif", big)
    np.testing.assert_allclose(load_image(tmp_path / "i32.tif"),
                               np.moveaxis(big, -1, 0) / (2 ** 31 - 1), rtol=1e-6)
    # std 0 is refused by the tiled path too (it used to give a map of NaN)
    with pytest.raises(NofcError, match="--std values must be positive"):
        _run(fcn, str(tmp_path / "rgba.tif"), normalize=nofc.Normalize(std=(0, 0, 0)))
@pytest.fixture(scope="module")
def spec(tiny_spec):
    return tiny_spec


def test_cli_slide_and_scene_to_geotiff_and_geojson(spec, files, tmp_path, capsys):
    png, tif, gj = tmp_path / "heat.png", tmp_path / "map.tif", tmp_path / "cells.geojson"
    args = ["heatmap", spec, files["slide"], "--input-size", "3x16x16", "--mpp", "0.5",
            "--mask", "auto", "-o", str(png), "--out", str(tif)]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert png.exists() and tif.exists() and "windows computed" in out
    args = ["heatmap", spec, files["geotiff"], "--input-size", "3x16x16", "-o",
            str(tmp_path / "scene.png"), "--out", str(gj), "--threshold", "0.2"]
    assert main(args) == 0, capsys.readouterr().err
    doc = json.loads(gj.read_text())  # RFC 7946: WGS84, no crs member; the CRS beside it
    assert "crs" not in doc and doc["nofc"]["crs"] == "EPSG:32633"


def _cli_error(capsys, args, needle):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()  # an "image ... tiled" note may lead
    errors = [line for line in err if line.startswith("nofc: error: ")]
    assert code == 2 and errors == err[-1:] and needle in err[-1], (code, err)
    assert "Traceback" not in "\n".join(err)


def test_cli_bad_inputs_one_line_exit_2_no_output(spec, files, tmp_path, capsys):
    png, tif = tmp_path / "heat.png", tmp_path / "map.tif"
    base = [spec, "--input-size", "3x16x16", "-o", str(png), "--out", str(tif)]
    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_bytes(b"II*\x00" + RNG.bytes(500))
    truncated = tmp_path / "truncated.tif"
    data = open(files["slide"], "rb").read()
    truncated.write_bytes(data[: len(data) // 3])
    from PIL import Image

    Image.fromarray(np.ones((40, 40), np.uint8)).save(tmp_path / "square.png")
    cases = [
        ([str(corrupt)], "cannot read TIFF"),  # its content: a TIFF header, nothing else
        ([files["geotiff"], "--bands", "4"], "has bands 1..3, not [4]"),
        ([files["slide"], "--mpp", "0.1"], "finer than level 0"),
        ([files["slide"], "--level", "1", "--mask", str(tmp_path / "square.png")], "not the same aspect"),
        ([str(truncated), "--level", "0"], "truncated.tif"),
    ]
    for where, needle in cases:
        _cli_error(capsys, ["heatmap", base[0], *where, *base[1:]], needle)
        assert not png.exists() and not tif.exists()
        assert not list(tmp_path.glob(".map.tif*")), list(tmp_path.iterdir())
