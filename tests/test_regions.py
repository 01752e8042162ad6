"""Merged regions (``nofc.sinks.regions``): per class, the thresholded cells merged into
polygons with holes, checked against the union of the per-cell squares (shapely), the
per-cell GeoJSON, numpy on the cells, an RFC 7946 validator (geojson-validator) and the
GeoPackage / FlatGeobuf read back by pyogrio; the CLI once, end to end."""

from __future__ import annotations

import json
import sqlite3
from types import SimpleNamespace as Block

import numpy as np
import pytest

import nofc
from nofc.cli import main
from nofc.placement import Placement, placement_of
from nofc.sinks import GeoJsonOutput, MapFacts, RegionsOutput, merge_regions, output_for

shapely = pytest.importorskip("shapely")
pytest.importorskip("rasterio")
pyogrio = pytest.importorskip("pyogrio")

CLASSES = ["tumour", "stroma", "glass"]
GEO = nofc.geometry(nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32)), (1, 32, 32))  # stride 4
UTM = (10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0)
SLIDE = Placement(GEO, (4, 4), downsample=(2.0, 2.0), mpp=(0.25, 0.25))
SCENE = Placement(GEO, (4, 4), transform=UTM, crs="EPSG:32633")


def two_regions(h=24, w=32, seed=0) -> np.ndarray:
    """Logits of a map: glass everywhere; tumour in a ring (a hole of glass and a stroma
    island inside), stroma in an L; noise so that probabilities vary from cell to cell."""
    rng = np.random.default_rng(seed)
    label = np.full((h, w), 2)
    label[2:14, 3:15] = 0
    label[5:9, 6:10] = 2  # the hole
    label[10:12, 10:12] = 1  # a stroma island in the tumour (a second hole)
    label[15:22, 18:30] = 1
    label[15:18, 18:24] = 2  # the L
    label[1, 28] = 0  # a lone cell
    scores = rng.normal(0, 0.3, (3, h, w))
    scores[label, *np.indices((h, w))] += 3.0
    scores[:, 0, 0] = np.nan  # a cell masked out
    return scores


def reference(scores, placement, threshold=0.5):
    """Per class: the union of its cell squares, and each cell's probability (numpy)."""
    e = np.exp(scores - np.where(np.isnan(scores), np.inf, scores).min(0))
    probs = e / e.sum(0)
    top, p = np.nan_to_num(probs, nan=-1).argmax(0), np.nan_to_num(probs.max(0), nan=-1)
    a, b, c, d, e_, f = placement.cell_transform()
    squares = {}
    for k in range(scores.shape[0]):
        rows, cols = np.nonzero((top == k) & (p >= threshold))
        squares[k] = shapely.union_all([shapely.box(a * j + c, e_ * i + f, a * (j + 1) + c,
                                                    e_ * (i + 1) + f)
                                        for i, j in zip(rows, cols)])
    return squares, probs


def write(output, scores, placement, blocks=2):
    """Through the sink as tiling would: blocks of rows, then finalize."""
    facts = MapFacts(scores.shape, scores.dtype, placement=placement,
                     metadata={"classes": CLASSES})
    with output.open(facts) as sink:
        rows = np.array_split(np.arange(scores.shape[1]), blocks)
        for n, r in enumerate(rows):
            sink.aggregate(Block(index=(n, 0), out=(r[0], r[-1] + 1, 0, scores.shape[2])),
                           scores[:, r[0]:r[-1] + 1])
        return sink.finalize()


def test_regions_equal_the_union_of_the_thresholded_cells_with_holes_and_probabilities():
    scores = two_regions()
    squares, probs = reference(scores, SLIDE)
    found, unit = merge_regions(scores, SLIDE, names=CLASSES, exclude=["glass"])
    assert unit == "µm²" and {r.name for r in found} == {"tumour", "stroma"}
    level1 = placement_of(Block(mpp=(0.5, 0.5), downsample=(2.0, 2.0)), GEO, (4, 4))
    assert level1.mpp == (0.25, 0.25) and level1.cell_area() == (4.0, "µm²")  # 8x8 level-0 px
    for k in (0, 1):
        mine = shapely.union_all([r.polygon for r in found if r.cls == k])
        assert mine.symmetric_difference(squares[k]).area == pytest.approx(0, abs=1e-6)
        assert squares[k].area > 0
    tumour = max((r for r in found if r.cls == 0), key=lambda r: r.cells)
    assert len(tumour.polygon.interiors) == 2  # the glass hole and the stroma island
    assert sum(r.cls == 0 for r in found) == 2  # the ring and the lone cell
    a, _, c, _, e, f = SLIDE.cell_transform()
    centres = np.stack(np.meshgrid(a * (np.arange(32) + 0.5) + c, e * (np.arange(24) + 0.5) + f),
                       -1)
    for r in found:
        assert r.polygon.is_valid and r.polygon.exterior.is_ccw
        inside = shapely.contains_xy(r.polygon, centres[..., 0], centres[..., 1])
        cells = probs[r.cls][inside]
        assert r.cells == inside.sum() and (cells >= 0.5).all()
        # probabilities are float32 (nofc.scores), the reference float64
        assert r.mean == pytest.approx(cells.mean(), abs=1e-6)
        assert r.max == pytest.approx(cells.max(), abs=1e-6)
        assert r.area == pytest.approx(r.polygon.area * 0.25 * 0.25)  # level-0 px² -> µm²
        ring = np.array(r.polygon.exterior.coords)  # corners only: no vertex on a straight edge
        turn = np.cross(ring[1:-1] - ring[:-2], ring[2:] - ring[1:-1])
        assert (turn != 0).all()
    # every class (glass too, then it wraps the others) and the threshold
    every, _ = merge_regions(scores, SLIDE, threshold=0.9)
    assert {r.cls for r in every} == {0, 1, 2}
    squares9, _ = reference(scores, SLIDE, 0.9)
    assert shapely.union_all([r.polygon for r in every if r.cls == 2]).symmetric_difference(
        squares9[2]).area == pytest.approx(0, abs=1e-6)


def test_slide_regions_are_qupath_annotations_and_equal_the_per_cell_detections(tmp_path):
    scores = two_regions()
    cells, regions = tmp_path / "cells.geojson", tmp_path / "tissue.regions.geojson"
    back = write(output_for(regions, exclude="glass"), scores, SLIDE)
    np.testing.assert_array_equal(back, scores)  # the map, for the caller
    write(GeoJsonOutput(cells), scores, SLIDE)
    feats = json.loads(regions.read_text())["features"]
    detections = json.loads(cells.read_text())["features"]
    for name in ("tumour", "stroma"):
        mine = [shapely.geometry.shape(f["geometry"]) for f in feats
                if f["properties"]["classification"]["name"] == name]
        theirs = [shapely.geometry.shape(f["geometry"]) for f in detections
                  if f["properties"]["classification"]["name"] == name]
        assert shapely.union_all(mine).symmetric_difference(
            shapely.union_all(theirs)).area == pytest.approx(0, abs=1e-6)
    for f in feats:
        props = f["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"]["name"] in ("tumour", "stroma")
        assert len(props["classification"]["color"]) == 3
        assert set(props["measurements"]) == {"Area µm^2", "Mean probability",
                                              "Max probability", "Cells"}
    assert not list(tmp_path.glob(".*partial*"))


def rfc7946_errors(doc) -> dict:
    """What geojson-validator finds wrong by RFC 7946, and coordinates off WGS84 bounds."""
    gv = pytest.importorskip("geojson_validator")
    gv.configure_logging(enabled=False)
    errors = dict(gv.validate_structure(doc, check_crs=True))
    found = gv.validate_geometries(doc, criteria_problematic=["outside_lat_lon_boundaries",
                                                              "self_intersection"])
    errors.update(found["invalid"])
    errors.update(found["problematic"])
    return errors


def test_scene_regions_are_rfc_7946_and_gis_layers_keep_the_crs(tmp_path):
    scores = two_regions()
    squares, _ = reference(scores, SCENE)
    doc_path = tmp_path / "scene.regions.geojson"
    write(output_for(doc_path, exclude=[2]), scores, SCENE)
    doc = json.loads(doc_path.read_text())
    assert rfc7946_errors(doc) == {} and "crs" not in doc
    assert doc["nofc"]["crs"] == "EPSG:32633" and doc["nofc"]["area unit"] == "m²"
    found, _ = merge_regions(scores, SCENE, exclude=[2])
    from rasterio.warp import transform_geom

    for f, r in zip(doc["features"], found):  # WGS84, as rasterio reprojects the polygon
        want = shapely.geometry.shape(transform_geom("EPSG:32633", "EPSG:4326", r.polygon))
        got = shapely.geometry.shape(f["geometry"])
        assert got.symmetric_difference(want).area < 1e-6 * want.area
        assert f["properties"]["area_m2"] == pytest.approx(r.polygon.area)  # 10 m pixels
        assert f["properties"]["area_m2"] == 16 * 10 * 10 * f["properties"]["cells"]
    assert 14.9 < doc["bbox"][0] < doc["bbox"][2] < 15.1
    for suffix in (".gpkg", ".fgb"):
        path = tmp_path / f"scene{suffix}"
        write(output_for(path, exclude="glass"), scores, SCENE)
        info = pyogrio.read_info(path)
        assert info["crs"] == "EPSG:32633" and info["features"] == len(found)
        meta, _, wkb, fields = pyogrio.raw.read(path)
        polys = shapely.from_wkb(wkb)
        cls = list(fields[list(meta["fields"]).index("class")])
        for k, name in ((0, "tumour"), (1, "stroma")):
            mine = shapely.union_all(polys[[c == name for c in cls]])
            assert mine.symmetric_difference(squares[k]).area == pytest.approx(0, abs=1e-3)
        assert set(meta["fields"]) == {"class", "class_index", "area_m2", "mean_probability",
                                       "max_probability", "cells"}
    with sqlite3.connect(tmp_path / "scene.gpkg") as db:  # the GeoPackage's own tables
        srs = db.execute("SELECT organization, organization_coordsys_id FROM "
                         "gpkg_geometry_columns JOIN gpkg_spatial_ref_sys USING (srs_id) "
                         "WHERE table_name = 'regions'").fetchall()
    assert srs == [("EPSG", 32633)]


def test_scene_cells_geojson_is_rfc_7946(tmp_path):
    scores = two_regions()[:, :8, :10]
    path = tmp_path / "cells.geojson"
    write(GeoJsonOutput(path, threshold=0.0), scores, SCENE)
    doc = json.loads(path.read_text())
    assert rfc7946_errors(doc) == {} and "crs" not in doc
    assert len(doc["features"]) == 8 * 10 - 1  # the NaN cell has none
    ring = np.array(doc["features"][0]["geometry"]["coordinates"][0])
    assert shapely.Polygon(ring).exterior.is_ccw
    assert 14.9 < ring[:, 0].min() < 15.1 and 36 < ring[:, 1].min() < 36.2


def test_options_are_checked_before_any_work(tmp_path):
    with pytest.raises(nofc.NofcError, match="use .regions.geojson"):
        RegionsOutput(tmp_path / "r.tif")
    with pytest.raises(nofc.NofcError, match="exclude does not apply to .tif output"):
        output_for(tmp_path / "m.tif", exclude="glass")
    with pytest.raises(nofc.NofcError, match=r"cannot leave out class 'grass': the classes "
                                             r"are tumour, stroma, glass"):
        write(output_for(tmp_path / "r.gpkg", exclude="grass"), two_regions(), SLIDE)
    with pytest.raises(nofc.NofcError, match="threshold must be a probability"):
        output_for(tmp_path / "r.fgb", threshold=1.5)
    assert not list(tmp_path.iterdir())
    empty = tmp_path / "none.gpkg"  # nothing reaches the threshold: an empty layer
    write(output_for(empty, exclude=[0, 1, 2]), two_regions(), SLIDE)
    assert pyogrio.read_info(empty)["features"] == 0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A picture and the names of LeNet-5's ten classes (nofc's own model)."""
    d = tmp_path_factory.mktemp("cli")
    (d / "labels.txt").write_text("\n".join(CLASSES + [f"c{i}" for i in range(3, 10)]))
    from PIL import Image

    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (72, 88), dtype=np.uint8)).save(d / "img.png")
    return str(d / "img.png"), str(d / "labels.txt")


def test_cli_regions_end_to_end_and_bad_options(files, tmp_path, capsys):
    img, labels = files
    out, npz = tmp_path / "t.regions.geojson", tmp_path / "m.npz"
    base = ["heatmap", "nofc:lenet5", img, "--input-size", "1x32x32", "--labels", labels,
            "-o", str(tmp_path / "h.png")]
    assert main([*base, "--out", str(out), "--background", "glass", "--threshold", "0.1",
                 "--scores", str(npz)]) == 0, capsys.readouterr().err
    saved = np.load(npz)
    scores, boxes, step = saved["scores"], saved["boxes"], saved["step"]
    probs, _ = nofc.sinks.geojson.probabilities(scores)
    feats = json.loads(out.read_text())["features"]
    names = open(labels).read().split()
    for k in range(10):  # each cell: the step x step square centred on its window (--scores)
        cy, cx = (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2
        on = (probs.argmax(0) == k) & (probs.max(0) >= 0.1)
        squares = shapely.union_all(shapely.box(cx[on] - step[1] / 2, cy[on] - step[0] / 2,
                                                cx[on] + step[1] / 2, cy[on] + step[0] / 2))
        mine = shapely.union_all([shapely.geometry.shape(f["geometry"]) for f in feats
                                  if f["properties"]["classification"]["name"] == names[k]])
        if k == 2:  # glass: left out
            squares = shapely.Polygon()
        assert mine.symmetric_difference(squares).area == pytest.approx(0, abs=1e-9)
    assert feats and all(f["properties"]["classification"]["name"] != "glass" for f in feats)
    capsys.readouterr()
    for extra, needle in ((["--out", str(tmp_path / "r.gpkg"), "--background", "grass"],
                           "cannot leave out class 'grass'"),
                          (["--out", str(tmp_path / "r.tif"), "--regions"],
                           "cannot write regions to")):
        assert main([*base, "--force", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()  # an "image ... tiled" note may lead
        errors = [line for line in err if line.startswith("nofc: error: ")]
        assert errors == err[-1:] and needle in err[-1] and "Traceback" not in str(err), err
    assert not (tmp_path / "r.gpkg").exists() and not (tmp_path / "r.tif").exists()
