"""Formats by content: a file is a slide when OpenSlide opens it (SVS, DICOM WSI, a
pyramidal RGB TIFF, ...) whatever its suffix, a raster when GDAL must read it, a picture
last; options that do not apply to the kind of file are one line, exit 2; unknown output
suffixes are refused; every file and folder the CLI writes gets the umask's mode.

The DICOM whole-slide image is written here with pydicom (VL Whole Slide Microscopy Image
instances, one per level, uncompressed RGB frames, TILED_FULL), so its pixels are exact
and its maps can equal those of the same pixels in a TIFF read by tifffile."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import nofc
from nofc.cli import main
from nofc.io import load_model
from nofc.sources import open_source

openslide = pytest.importorskip("openslide")
pydicom = pytest.importorskip("pydicom")
tifffile = pytest.importorskip("tifffile")

SIZE = (3, 16, 16)
F64 = torch.float64
IMG = np.random.default_rng(1).integers(0, 256, (96, 128, 3), dtype=np.uint8)
WSI_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def write_dicom_wsi(folder, img, levels=3, mpp=0.25, tile=32):
    """``img`` as a DICOM WSI series in ``folder``: level k is every 2**k-th pixel, one
    file per level, uncompressed RGB tiles (TILED_FULL), pixel spacing ``mpp`` microns."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(levels):
        a = img[:: 2 ** k, :: 2 ** k]
        h, w = a.shape[:2]
        ny, nx = -(-h // tile), -(-w // tile)
        padded = np.zeros((ny * tile, nx * tile, 3), np.uint8)
        padded[:h, :w] = a
        frames = padded.reshape(ny, tile, nx, tile, 3).swapaxes(1, 2)  # row-major tiles
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = WSI_CLASS
        meta.MediaStorageSOPInstanceUID = uid = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = WSI_CLASS, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.InstanceNumber = "SM", k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if k == 0 else \
            ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        ds.Rows = ds.Columns = tile
        ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = h, w
        ds.TotalPixelMatrixFocalPlanes = 1
        ds.NumberOfFrames = ny * nx
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        spacing = Dataset()
        spacing.PixelSpacing = [mpp * 2 ** k / 1000] * 2  # millimetres
        spacing.SliceThickness = 0.001
        shared = Dataset()
        shared.PixelMeasuresSequence = Sequence([spacing])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        ds.PixelData = frames.tobytes()
        ds.save_as(folder / f"level{k}.dcm", enforce_file_format=True)
    return folder


def write_pyramid(path, img, levels=3, tile=32):
    """A pyramidal tiled TIFF (level k: every 2**k-th pixel): a generic-tiff slide."""
    with tifffile.TiffWriter(path) as tw:
        for k in range(levels):
            tw.write(img[:: 2 ** k, :: 2 ** k], tile=(tile, tile), photometric="rgb",
                     compression="zlib", subfiletype=0 if k == 0 else 1)
    return path


@pytest.fixture(scope="module")
def fcn(tiny_spec):
    return nofc.convert(load_model(tiny_spec).eval(), SIZE).to(F64)


def _run(fcn, image):
    return nofc.tiled_predict(fcn, image, SIZE, tile=32, progress=False, dtype=F64)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    from PIL import Image

    for k in (0, 1):  # the reference: each level's pixels as a plain TIFF (tifffile)
        tifffile.imwrite(d / f"level{k}.tif", np.ascontiguousarray(IMG[:: 2 ** k, :: 2 ** k]))
    Image.fromarray(IMG).save(d / "img.png")
    Image.fromarray(IMG).save(d / "png.tif", format="PNG")  # a PNG under a TIFF's name
    tifffile.imwrite(d / "gray16.tif", (IMG[..., 0].astype(np.uint16) * 257), tile=(32, 32))
    return {"dicom": write_dicom_wsi(d / "dicom", IMG),
            "svs": write_pyramid(d / "generic.svs", IMG), "dir": d}


def test_dicom_wsi_is_a_slide_and_its_maps_equal_the_tiff_maps(fcn, files):
    folder = files["dicom"]
    one = folder / "level1.dcm"  # any file of the series opens it all
    slide = openslide.OpenSlide(str(one))
    assert (slide.detect_format(str(one)), slide.level_count) == ("dicom", 3)
    assert slide.level_dimensions == ((128, 96), (64, 48), (32, 24))
    src = open_source(str(one))
    assert (src.kind, src.hw, src.mpp, src.downsample) == ("slide", (96, 128), (0.25, 0.25),
                                                           (1.0, 1.0))
    assert open_source(str(folder)).kind == "slide"  # the folder of the series too
    ref0 = _run(fcn, str(files["dir"] / "level0.tif"))
    assert open_source(str(files["dir"] / "level0.tif")).kind == "tiff"  # another reader
    for image in (str(one), str(folder)):
        np.testing.assert_allclose(_run(fcn, image), ref0, rtol=0, atol=1e-12)
    ref1 = _run(fcn, str(files["dir"] / "level1.tif"))
    for src in (open_source(str(folder), level=1), open_source(str(one), mpp=0.5)):
        assert (src.level, src.downsample, src.mpp) == (1, (2.0, 2.0), (0.5, 0.5))
        np.testing.assert_allclose(_run(fcn, src), ref1, rtol=0, atol=1e-12)


def test_svs_named_generic_tiff_and_renamed_png_go_by_content(fcn, files):
    svs = open_source(str(files["svs"]))
    assert (svs.kind, svs.hw) == ("slide", (96, 128))
    assert openslide.OpenSlide(str(files["svs"])).level_count == 3
    ref = _run(fcn, str(files["dir"] / "level0.tif"))
    np.testing.assert_allclose(_run(fcn, svs), ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(_run(fcn, open_source(str(files["svs"]), level=1)),
                               _run(fcn, str(files["dir"] / "level1.tif")), rtol=0, atol=1e-12)
    png = open_source(str(files["dir"] / "png.tif"))
    assert png.kind == "picture"
    np.testing.assert_allclose(_run(fcn, png), ref, rtol=0, atol=1e-12)


def _cli_error(capsys, args, needle):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("nofc: error: ") \
        and needle in err[0], (code, err)


def test_options_that_do_not_apply_and_unknown_outputs_are_one_line(tiny_spec, files, tmp_path,
                                                                      capsys):
    d, png = files["dir"], tmp_path / "heat.png"
    base = ["heatmap", tiny_spec, "--input-size", "3x16x16", "-o", str(png)]
    empty, mirax = tmp_path / "empty", tmp_path / "scan"
    empty.mkdir()
    mirax.mkdir()  # a MIRAX slide's data folder, beside its file
    (tmp_path / "scan.mrxs").write_text("[GENERAL]\n")
    cases = [
        ([str(files["dicom"]), "--bands", "1,2,3"],
         "is read as a slide (choose level= or mpp= instead)"),
        ([str(files["svs"]), "--bands", "1"], "generic.svs is read as a slide"),
        ([str(d / "img.png"), "--level", "0"], "img.png is read as a picture"),
        ([str(d / "png.tif"), "--mpp", "0.5"], "png.tif is read as a picture"),
        ([str(d / "img.png"), "--bands", "1"], "bands= applies to rasters; "),
        ([str(d / "gray16.tif"), "--level", "0"], "gray16.tif is read as a TIFF"),
        ([str(empty)], "is a folder without a DICOM whole-slide image; give an image file"),
        ([str(mirax)], f"give the slide's file, {mirax}.mrxs"),
        ([str(d / "img.png"), "--out", str(tmp_path / "x.shp")],
         "unknown output suffix '.shp'; use .zarr (a resumable store), .tif (a GeoTIFF), "
         ".geojson (QuPath detections), .regions.geojson, .gpkg or .fgb"),
        ([str(d / "img.png"), "--out", str(tmp_path / "x.png")], "unknown output suffix '.png'"),
    ]
    for where, needle in cases:
        _cli_error(capsys, base[:2] + where + base[2:], needle)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "scan", "scan.mrxs"]


def _modes(root):
    """``{relative path: mode}`` of every file and folder under ``root``."""
    out = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            p = os.path.join(folder, name)
            out[os.path.relpath(p, root)] = os.stat(p).st_mode & 0o777
    return out


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_output_gets_the_umask_mode(tiny_spec, files, tmp_path, umask):
    image, out = str(files["dir"] / "img.png"), tmp_path / "out"
    out.mkdir()
    heat = ["heatmap", tiny_spec, image, "--input-size", "3x16x16"]
    old = os.umask(umask)
    try:
        assert main([*heat, "-o", str(out / "a.png"), "--scores", str(out / "a.npz"),
                     "--out", str(out / "map.zarr")]) == 0
        assert main([*heat, "-o", str(out / "b.png"), "--out", str(out / "map.tif")]) == 0
        assert main([*heat, "-o", str(out / "c.png"), "--out", str(out / "cells.geojson"),
                     "--threshold", "0.2"]) == 0
        assert main(["convert", tiny_spec, "--input-size", "3x16x16", "-o",
                     str(out / "fcn.pt")]) == 0
        assert main(["view", str(out / "map.zarr"), image, "--export", str(out / "site")]) == 0
    finally:
        os.umask(old)
    modes = _modes(out)
    assert {"a.png", "a.npz", "map.zarr/zarr.json", "map.tif", "cells.geojson", "fcn.pt",
            "site/index.html"} <= set(modes), sorted(modes)
    want = {p: (0o777 if (out / p).is_dir() else 0o666) & ~umask for p in modes}
    assert modes == want, {p: oct(m) for p, m in modes.items() if m != want[p]}
