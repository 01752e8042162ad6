"""GeoTIFF maps (issue 24): Cloud Optimized by construction at any size (checked with
rio-cogeo's validator), probabilities or logits, a top-class band with a colour table and
class names, a subset of classes, a slide's cell size in microns, and ``--scale`` /
``--offset`` for integer rasters. Every number is checked against an independent
reference: the zarr store of the same run read back and put through torch's softmax and
argmax, the TIFF tags read back with tifffile, OpenSlide's reading of them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import nofc
from nofc import NofcError
from nofc.cli import main
from nofc.placement import Placement
from nofc.sinks import GeoTiffOutput, MapFacts, ZarrOutput, output_for
from nofc.sources import open_source

rasterio = pytest.importorskip("rasterio")
tifffile = pytest.importorskip("tifffile")
cogeo = pytest.importorskip("rio_cogeo.cogeo")

SIZE = (3, 16, 16)
CLASSES = ["tumour", "stroma", "glass"]
RNG = np.random.default_rng(0)
IMG = RNG.integers(0, 256, (3, 120, 152), dtype=np.uint8)


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 4, stride=2), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(54, 3)).eval()


@pytest.fixture(scope="module")
def fcn():
    return nofc.convert(_tiny(), SIZE)


def _valid_cog(path) -> list:
    """rio-cogeo's verdict (strict: warnings count) and the overview factors."""
    ok, errors, warnings = cogeo.cog_validate(str(path), strict=True, quiet=True)
    assert ok and not errors and not warnings, (path, errors, warnings)
    with rasterio.open(path) as ds:
        return ds.overviews(1)


@pytest.mark.parametrize("h,w", [(16, 16), (300, 280),
                                 pytest.param(2000, 2000, marks=pytest.mark.slow)])
def test_maps_of_any_size_are_valid_cogs_with_overviews(tmp_path, h, w):
    """Written block by block through the sink (no network: the layout is what counts)."""
    geo = nofc.geometry(nofc.convert(_tiny(), SIZE), SIZE)
    path = tmp_path / "map.tif"
    k, side = 3, 500
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
    logits = np.stack([yy, xx, 1 - yy]) * 4  # smooth, so deflate is quick
    with GeoTiffOutput(str(path)).open(MapFacts((k, h, w), np.float32,
                                                placement=Placement(geo, (4, 4)))) as sink:
        for a in range(0, h, side):
            for c in range(0, w, side):
                b, d = min(a + side, h), min(c + side, w)
                sink.aggregate(_Tile((a // side, c // side), (a, b, c, d)),
                               logits[:, a:b, c:d])
        sink.finalize()
    for p in (path, tmp_path / "map.classes.tif"):
        assert len(_valid_cog(p)) >= 1, p  # every map has at least one overview
    assert sorted(q.name for q in tmp_path.iterdir()) == ["map.classes.tif", "map.tif"]
    with rasterio.open(path) as ds:  # the probabilities of the logits, torch's softmax
        got = ds.read(window=((h // 2, h // 2 + 16), (w // 2, w // 2 + 16)))
    ref = torch.softmax(torch.from_numpy(logits[:, h // 2:h // 2 + 16, w // 2:w // 2 + 16]),
                        0).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


class _Tile:
    def __init__(self, index, out):
        self.index, self.out = index, out


def _both(fcn, image, tmp_path, mask=None, **tif):
    """The same run to a zarr store (logits) and to a GeoTIFF (``tif`` options)."""
    store = nofc.tiled_predict(fcn, image, SIZE, tile=48, progress=False, mask=mask,
                               out=ZarrOutput(str(tmp_path / "map.zarr")))
    tif_path = tmp_path / "map.tif"
    written = nofc.tiled_predict(fcn, image, SIZE, tile=48, progress=False, mask=mask,
                                 out=GeoTiffOutput(str(tif_path),
                                                   metadata={"classes": CLASSES}, **tif))
    return np.asarray(store[:]), tif_path, written


def test_probabilities_and_class_band_equal_the_stores_logits(fcn, tmp_path):
    mask = np.ones(IMG.shape[1:], bool)
    mask[:, :40] = False  # NaN cells: nodata in both files
    logits, tif, written = _both(fcn, IMG, tmp_path, mask=mask)
    nan = np.isnan(logits).any(0)
    assert nan.any() and not nan.all()
    ref = torch.softmax(torch.from_numpy(logits), 0).numpy()
    with rasterio.open(tif) as ds:
        probs = ds.read()
        assert ds.descriptions == tuple(CLASSES) and np.isnan(ds.nodata)
    np.testing.assert_allclose(probs[:, ~nan], ref[:, ~nan], rtol=0, atol=1e-6)
    assert np.isnan(probs[:, nan]).all()
    np.testing.assert_allclose(np.asarray(written), probs)  # what tiled_predict returns
    assert (written.values, written.classes) == ("probs", [0, 1, 2])
    with rasterio.open(tmp_path / "map.classes.tif") as ds:  # what QGIS reads
        top = ds.read(1)
        assert ds.dtypes[0] == "uint8" and ds.nodata == 255
        cmap = ds.colormap(1)
        names = {int(k[6:]): v for k, v in ds.tags(1).items() if k.startswith("CLASS_")}
    ref_top = np.where(nan, 255, np.nan_to_num(logits, nan=0).argmax(0))
    np.testing.assert_array_equal(top, ref_top)
    assert names == dict(enumerate(CLASSES))
    assert [cmap[i][:3] for i in range(3)] == [(31, 119, 180), (255, 127, 14), (44, 160, 44)]
    for p in (tif, tmp_path / "map.classes.tif"):
        _valid_cog(p)


def test_logits_and_a_subset_of_classes(fcn, tmp_path):
    logits, tif, written = _both(fcn, IMG, tmp_path, values="logits",
                                 classes=("glass", 0), class_band=False)
    with rasterio.open(tif) as ds:
        assert ds.descriptions == ("glass", "tumour")
        np.testing.assert_allclose(ds.read(), logits[[2, 0]], rtol=0, atol=1e-6)
    assert (written.values, written.classes) == ("logits", [2, 0])
    assert not (tmp_path / "map.classes.tif").exists()
    with pytest.raises(NofcError, match=r"--classes: 'bone' is not one of the map's 3 "
                                        r"classes; give indices 0..2 or names \(tumour"):
        _both(fcn, IMG, tmp_path / "..", classes=["bone"])
    with pytest.raises(NofcError, match="--values must be probs or logits, got 'prob'"):
        GeoTiffOutput("m.tif", values="prob")
    with pytest.raises(NofcError, match="values does not apply to .zarr output"):
        output_for("m.zarr", values="logits")


def _slide(path, img, mpp=0.25, levels=3):
    """A pyramidal tiled TIFF with its pixel size (OpenSlide opens it as generic-tiff)."""
    with tifffile.TiffWriter(path) as tw:
        for k in range(levels):
            res = 1e4 / (mpp * 2 ** k)
            tw.write(np.moveaxis(img, 0, -1)[:: 2 ** k, :: 2 ** k], tile=(32, 32),
                     photometric="rgb", compression="zlib", resolution=(res, res),
                     resolutionunit="CENTIMETER", subfiletype=0 if k == 0 else 1)
    return str(path)


def test_a_slides_map_records_its_cell_size_in_microns(fcn, tmp_path):
    openslide = pytest.importorskip("openslide")
    src = open_source(_slide(tmp_path / "slide.tif", IMG), level=1)  # 0.5 um per pixel
    nofc.tiled_predict(fcn, src, SIZE, tile=48, progress=False,
                       out=GeoTiffOutput(str(tmp_path / "map.tif")))
    cell = 4 * 2 * 0.25  # stride 4 pixels of level 1, each 2 level-0 pixels of 0.25 um
    for name in ("map.tif", "map.classes.tif"):
        with tifffile.TiffFile(tmp_path / name) as t:  # the tags, read by another reader
            tags = t.pages[0].tags
            assert tags["ResolutionUnit"].value == 3  # centimetre
            xres, yres = tags["XResolution"].value, tags["YResolution"].value
        assert 1e4 * xres[1] / xres[0] == pytest.approx(cell)
        assert 1e4 * yres[1] / yres[0] == pytest.approx(cell)
    with rasterio.open(tmp_path / "map.tif") as ds:
        assert ds.crs is None and ds.transform.a == pytest.approx(8.0)  # level-0 pixels
    props = openslide.OpenSlide(str(tmp_path / "map.classes.tif")).properties
    assert float(props["openslide.mpp-x"]) == pytest.approx(cell)


def test_scale_and_offset_equal_the_float_image(fcn, tmp_path):
    """Sentinel-2 L2A style: reflectance = DN * 1e-4 - 0.1, from uint16 digital numbers."""
    dn = RNG.integers(1000, 12000, IMG.shape, dtype=np.uint16)
    reflectance = dn.astype(np.float64) * 1e-4 - 0.1
    ref = nofc.tiled_predict(fcn, reflectance.astype(np.float32), SIZE, tile=48,
                             progress=False)
    got = nofc.tiled_predict(fcn, dn, SIZE, tile=48, progress=False,
                             normalize=nofc.Normalize(scale=1e-4, offset=-0.1))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    with pytest.raises(NofcError, match="--offset has 2 values and the image 3 channels"):
        nofc.tiled_predict(fcn, dn, SIZE, progress=False,
                           normalize=nofc.Normalize(offset=(0.1, 0.2)))


def _model_file(tmp_path):
    torch.save(_tiny().state_dict(), tmp_path / "w.pt")
    (tmp_path / "tiny.py").write_text(
        "import torch.nn as nn\n\ndef build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 4, stride=2), nn.ReLU(), nn.Conv2d(4, 6, 3, "
        "stride=2),\n                         nn.ReLU(), nn.Flatten(), nn.Linear(54, 3))\n")
    return [f"{tmp_path / 'tiny.py'}:build", "--weights", str(tmp_path / "w.pt"),
            "--input-size", "3x16x16"]


def test_cli_scale_values_classes_and_one_line_errors(tmp_path, capsys):
    model = _model_file(tmp_path)
    dn = RNG.integers(0, 10000, IMG.shape, dtype=np.uint16)
    tifffile.imwrite(tmp_path / "dn.tif", dn, photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "refl.tif", (dn * np.float32(1e-4)).astype(np.float32),
                     photometric="rgb", planarconfig="separate")
    runs = {}
    for name, extra in (("dn", ["--scale", "0.0001"]), ("refl", [])):
        args = ["heatmap", *model, str(tmp_path / f"{name}.tif"), "-o",
                str(tmp_path / f"{name}.png"), "--scores", str(tmp_path / f"{name}.npz"),
                "--no-check", *extra]
        assert main(args) == 0, capsys.readouterr().err
        runs[name] = np.load(tmp_path / f"{name}.npz")["scores"]
    np.testing.assert_allclose(runs["dn"], runs["refl"], rtol=0, atol=1e-5)
    tif = tmp_path / "m.tif"
    args = ["heatmap", *model, str(tmp_path / "dn.tif"), "-o", str(tmp_path / "m.png"),
            "--scale", "1e-4", "--out", str(tif), "--values", "logits", "--no-class-band",
            "--no-check"]
    assert main(args) == 0, capsys.readouterr().err
    with rasterio.open(tif) as ds:
        np.testing.assert_allclose(ds.read(), runs["dn"], rtol=0, atol=1e-5)
    assert not (tmp_path / "m.classes.tif").exists()
    probs = torch.softmax(torch.from_numpy(runs["dn"]), 0).numpy()
    args = ["heatmap", *model, str(tmp_path / "dn.tif"), "-o", str(tmp_path / "m.png"),
            "--scale", "1e-4", "--out", str(tif), "--classes", "2,0", "--force",
            "--no-check", "--class", "0"]
    assert main(args) == 0, capsys.readouterr().err
    assert f"  class 0: peak probability {probs[0].max():.3f}" in capsys.readouterr().out
    with rasterio.open(tif) as ds:
        np.testing.assert_allclose(ds.read(), probs[[2, 0]], rtol=0, atol=1e-5)
    capsys.readouterr()
    bad = tmp_path / "bad.tif"
    base = ["heatmap", *model, str(tmp_path / "dn.tif"), "-o", str(tmp_path / "bad.png")]
    for extra, needle in (
            (["--out", str(bad), "--values", "prob"], "--values must be probs or logits"),
            (["--out", str(bad), "--classes", "7"], "--classes: '7' is not one of the map's"),
            (["--out", str(tmp_path / "bad.zarr"), "--values", "logits"],
             "values does not apply to .zarr output"),
            (["--out", str(bad), "--scores", str(tmp_path / "bad.npz")],
             "--scores keeps the logits of every class"),
            (["--scale", "-1"], "scale must be a positive finite number"),
            (["--out", str(bad), "--classes", "2,0", "--class", "1"],
             "--class 1 is not among the classes the GeoTIFF keeps (2, 0)"),
            (["--out", str(bad), "--classes", "2", "--values", "logits"],
             "--classes with --values logits: the heatmap's probabilities need")):
        assert main(base + extra) == 2
        err = [line for line in capsys.readouterr().err.splitlines()
               if not line.startswith("image ")]
        assert len(err) == 1 and needle in err[0], err
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(("bad", ".bad"))]


def test_a_checkpoints_mean_and_std_are_the_default(tmp_path, capsys):
    """Per-band statistics kept in the checkpoint normalise like --mean/--std given."""
    model = _model_file(tmp_path)
    stats = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.25, 2.0]}
    torch.save({"state_dict": _tiny().state_dict(), **stats}, tmp_path / "w.pt")
    tifffile.imwrite(tmp_path / "img.tif", IMG, photometric="rgb", planarconfig="separate")
    runs = []
    for extra in ([], ["--mean", "0.1,0.2,0.3", "--std", "0.5,0.25,2"], ["--scale", "1"]):
        npz = tmp_path / f"s{len(runs)}.npz"
        args = ["heatmap", *model, str(tmp_path / "img.tif"), "-o", str(tmp_path / "s.png"),
                "--scores", str(npz), "--no-check", "--force", *extra]
        assert main(args) == 0, capsys.readouterr().err
        runs.append(np.load(npz))
    np.testing.assert_array_equal(runs[0]["scores"], runs[1]["scores"])
    assert not np.allclose(runs[2]["scores"], runs[0]["scores"])  # x255: the mean stays
    info = [json.loads(str(r["geometry"])) for r in runs]
    assert info[0]["mean"] == info[2]["mean"] == stats["mean"] and info[2]["scale"] == 1.0


def test_the_heatmap_drawn_from_a_geotiff_of_probabilities_is_the_stores(tmp_path):
    """heatmap reads a probability GeoTIFF as probabilities (not a softmax of them)."""
    from nofc.heatmap import heatmap

    peaks = {}
    for out in ("map.zarr", "map.tif"):
        info = heatmap(_tiny(), IMG, SIZE, str(tmp_path / f"{out}.png"), top=3,
                       out=str(tmp_path / out), progress=False, check=False)
        peaks[out] = dict(zip(info["classes"], info["max_prob"]))
    assert peaks["map.tif"] == pytest.approx(peaks["map.zarr"], abs=1e-6)


def test_a_failed_cog_copy_leaves_nothing(tmp_path, monkeypatch):
    import rasterio.shutil

    def broken(*args, **kwargs):
        raise rasterio.errors.RasterioError("disk gone")

    geo = nofc.geometry(nofc.convert(_tiny(), SIZE), SIZE)
    monkeypatch.setattr(rasterio.shutil, "copy", broken)
    sink = GeoTiffOutput(str(tmp_path / "map.tif")).open(
        MapFacts((3, 20, 20), np.float32, placement=Placement(geo, (4, 4))))
    with sink:
        sink.aggregate(_Tile((0, 0), (0, 20, 0, 20)), np.zeros((3, 20, 20), np.float32))
    with pytest.raises(rasterio.errors.RasterioError, match="disk gone"):
        sink.finalize()
    assert list(tmp_path.iterdir()) == []
