"""Cohorts (issue 25): many images in one call, a summary table, skip and resume, fault
isolation, one stream over a Dask cluster, the CLI's exit codes.

Real files: small tiled TIFFs (one pyramidal with its pixel size, one mostly glass), one
that is not a TIFF at all and one whose tiles are corrupt (it opens, its tiles fail).
Every map is checked against ``tiled_predict`` on the same file, the class columns
against a softmax computed here with numpy, the CSV against its Parquet twin.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile
import torch

import nofc
import nofc.tiling as tiling
from nofc import NofcError
from nofc.cli import main
from nofc.cohort import COLUMNS, cohort_inputs, is_cohort
from test_sources import Tiny, spec, write_slide  # noqa: F401 - spec: a fixture

zarr = pytest.importorskip("zarr")
pq = pytest.importorskip("pyarrow.parquet")

SIZE = (3, 16, 16)
F64 = torch.float64
RNG = np.random.default_rng(25)


@pytest.fixture(scope="module")
def fcn():
    torch.manual_seed(0)
    return nofc.convert(Tiny().eval(), SIZE).to(F64)


def _glass(hw, tissue):
    """An RGB image of white glass with a saturated square of ``tissue`` pixels."""
    img = np.full((*hw, 3), 240, np.uint8) + RNG.integers(0, 8, (*hw, 3), dtype=np.uint8)
    t = RNG.integers(0, 256, (tissue, tissue, 3), dtype=np.uint8)
    t[..., 0], t[..., 1] = 200, t[..., 1] // 3
    img[:tissue, :tissue] = t
    return img


def _corrupt(path):
    """A zlib tiled TIFF that opens but whose tiles cannot be decompressed."""
    tifffile.imwrite(path, RNG.integers(0, 256, (128, 128, 3), dtype=np.uint8),
                     tile=(32, 32), compression="zlib", photometric="rgb")
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    write_slide(d / "a.tif", RNG.integers(0, 256, (96, 128, 3), dtype=np.uint8), levels=1)
    write_slide(d / "b.tif", RNG.integers(0, 256, (160, 96, 3), dtype=np.uint8), levels=2)
    write_slide(d / "c.tif", _glass((128, 128), 48), levels=1)
    (d / "d.tif").write_bytes(b"II*\x00 this is not a TIFF" * 4)
    (d / "notes.txt").write_text("not an image: left out of the folder's listing")
    return d


def _run(fcn, inputs, out, **kw):
    return nofc.predict_many(fcn, inputs, SIZE, out, tile=32, dtype=F64, progress=False, **kw)


def _single(fcn, image, **kw):
    return nofc.tiled_predict(fcn, image, SIZE, tile=32, dtype=F64, progress=False, **kw)


def _softmax_columns(scores, threshold=0.5):
    """The class columns computed independently: numpy's softmax over finite cells."""
    s = np.asarray(scores, dtype=np.float64).reshape(scores.shape[0], -1)
    s = s[:, np.isfinite(s).all(0)]
    e = np.exp(s - s.max(0))
    p = e / e.sum(0)
    return (p >= threshold).mean(1), p.mean(1)


# --------------------------------------------------------------------------- inputs


def test_inputs_patterns_folders_and_manifests(slides, tmp_path):
    got = cohort_inputs(slides, tmp_path / "{parent}" / "{name}.zarr")
    assert [os.path.basename(i.path) for i in got] == ["a.tif", "b.tif", "c.tif", "d.tif"]
    assert got[0].out == str(tmp_path / slides.name / "a.tif.zarr")
    manifest = tmp_path / "m.tsv"
    manifest.write_text(f"path\tlevel\tmask\n{slides / 'b.tif'}\t1\t\nc.tif\t\tauto\n")
    with pytest.raises(NofcError, match="needs a 'path' column"):
        (tmp_path / "bad.csv").write_text("file,level\nx.tif,0\n")
        cohort_inputs(tmp_path / "bad.csv", "{stem}.zarr")
    rows = cohort_inputs(manifest, "{stem}.zarr")
    assert (rows[0].level, rows[0].mask, rows[1].mask) == (1, None, "auto")
    assert rows[1].path == str(tmp_path / "c.tif")  # relative to the manifest's folder
    with pytest.raises(NofcError, match=r"need an --out pattern with \{stem\}"):
        cohort_inputs(["a.tif", "b.tif"], "maps.zarr")
    assert is_cohort([str(slides)]) and is_cohort(["m.tsv"]) and not is_cohort(["a.tif"])


# --------------------------------------------------------------------------- one process


def test_folder_maps_equal_single_calls_summary_and_rerun(fcn, slides, tmp_path):
    out = tmp_path / "maps" / "{stem}.zarr"
    cohort = _run(fcn, slides, out, threshold=0.4)
    status = {os.path.basename(r["input"])[0]: r for r in cohort.rows}
    assert [status[n]["status"] for n in "abcd"] == ["done"] * 3 + ["failed"]
    assert cohort.failed == 1 and "d.tif" in status["d"]["reason"]
    for n in "abc":
        got = zarr.open_array(str(tmp_path / "maps" / f"{n}.zarr"))[:]
        ref = _single(fcn, str(slides / f"{n}.tif"))
        np.testing.assert_array_equal(got, ref)
        row = status[n]
        assert row["windows"] == row["windows_computed"] == ref.shape[1] * ref.shape[2]
        assert row["masked_fraction"] == 0.0 and row["seconds"] > 0 and row["peak_rss_mb"] > 0
        above, mean = _softmax_columns(ref, 0.4)
        np.testing.assert_allclose([row[f"{k}_above"] for k in range(3)], above, atol=1e-12)
        np.testing.assert_allclose([row[f"{k}_mean"] for k in range(3)], mean, atol=1e-6)
    # the files: CSV and Parquet hold the same rows, the log a line per input
    folder = tmp_path / "maps"
    with open(folder / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    table = pq.read_table(folder / "summary.parquet").to_pylist()
    assert list(rows[0]) == COLUMNS + [f"{k}_{w}" for k in range(3) for w in ("above", "mean")]
    assert [r["status"] for r in rows] == [r["status"] for r in table] == \
        ["done", "done", "done", "failed"]
    for r, t in zip(rows, table):
        assert (int(r["windows"]) if r["windows"] else None) == t["windows"]
        assert (float(r["0_mean"]) if r["0_mean"] else None) == t["0_mean"]
    log = (folder / "cohort.log").read_text()
    assert log.count("done ") == 3 and log.count("failed ") == 1
    # a rerun skips what is finished, computes nothing, and the maps stay
    again = _run(fcn, slides, out, threshold=0.4)
    assert [r["status"] for r in again.rows] == ["skipped"] * 3 + ["failed"]
    assert [r["0_mean"] for r in again.rows] == [r["0_mean"] for r in cohort.rows]
    assert all(r["windows_computed"] == 0 for r in again.rows[:3])
    assert "3 skipped, 1 failed" in repr(again) and "d.tif" in str(again)
    with pytest.raises(NofcError, match="d.tif: cannot read TIFF.*--fail-fast"):
        _run(fcn, [slides / "d.tif", slides / "a.tif"], out, fail_fast=True)


def test_manifest_level_and_mask_per_row(fcn, slides, tmp_path):
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"path,level,mask\n{slides / 'b.tif'},1,\n{slides / 'c.tif'},,auto\n")
    cohort = _run(fcn, manifest, tmp_path / "out" / "{stem}.zarr", summary=tmp_path / "s")
    assert [r["status"] for r in cohort.rows] == ["done", "done"], cohort.rows
    b = zarr.open_array(str(tmp_path / "out" / "b.zarr"))[:]
    np.testing.assert_array_equal(b, _single(fcn, nofc.open_source(str(slides / "b.tif"),
                                                                    level=1)))
    c = zarr.open_array(str(tmp_path / "out" / "c.zarr"))[:]
    stats: dict = {}
    ref = _single(fcn, str(slides / "c.tif"), mask="auto", stats=stats)
    np.testing.assert_array_equal(c, ref)
    row = cohort.rows[1]
    assert row["masked_fraction"] == pytest.approx(np.isnan(ref).all(0).mean())
    assert 0.4 < row["masked_fraction"] < 1 and row["windows_computed"] == stats["computed"]
    assert (tmp_path / "s" / "summary.csv").exists()  # summary= puts it elsewhere


def test_a_corrupt_tile_fails_its_input_only(fcn, slides, tmp_path):
    bad = _corrupt(tmp_path / "bad.tif")
    cohort = _run(fcn, [bad, slides / "a.tif"], tmp_path / "m" / "{stem}.zarr")
    assert [r["status"] for r in cohort.rows] == ["failed", "done"]
    assert "cannot read TIFF" in cohort.rows[0]["reason"]
    assert "\n" not in cohort.rows[0]["reason"]


_KILLED = textwrap.dedent("""
    import os, signal, sys
    import torch, nofc
    import nofc.sinks.store as store
    sys.path.insert(0, sys.argv[3])
    from test_cohort import Tiny, SIZE

    torch.set_num_threads(1)
    torch.manual_seed(0)
    fcn = nofc.convert(Tiny().eval(), SIZE).to(torch.float64)
    write, seen = store.ZarrSink._write, []

    def killed(self, tile, block):
        write(self, tile, block)
        seen.append(tile)
        if len(seen) == int(sys.argv[4]):
            os.kill(os.getpid(), signal.SIGKILL)

    store.ZarrSink._write = killed
    nofc.predict_many(fcn, sys.argv[1], SIZE, sys.argv[2], tile=32, dtype=torch.float64,
                      progress=False)
""")


def test_sigkill_mid_cohort_then_rerun_resumes_to_the_same_maps(fcn, slides, tmp_path):
    """Killed after 20 blocks (a.tif has 12, b.tif 15): a.tif done, b.tif partial."""
    script = tmp_path / "killed.py"
    script.write_text(_KILLED)
    out = str(tmp_path / "maps" / "{stem}.zarr")
    inputs = tmp_path / "two.csv"
    inputs.write_text(f"path\n{slides / 'a.tif'}\n{slides / 'b.tif'}\n")
    res = subprocess.run([sys.executable, str(script), str(inputs), out,
                          os.path.dirname(__file__), "20"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    cohort = _run(fcn, inputs, out)
    a, b = cohort.rows
    assert a["status"] == "skipped" and a["windows_computed"] == 0
    assert b["status"] == "done" and b["reason"].startswith("resumed: 8 of 15 blocks")
    assert 0 < b["windows_computed"] < b["windows"]
    for n in "ab":  # b resumed band by band from its first block row not written
        np.testing.assert_allclose(zarr.open_array(str(tmp_path / "maps" / f"{n}.zarr"))[:],
                                   _single(fcn, str(slides / f"{n}.tif")), rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- cluster


def test_cluster_stream_ships_the_model_once_isolates_failures_and_survives_a_lost_worker(
        fcn, slides, tmp_path, monkeypatch):
    """One stream over a real 2-process cluster; a worker is SIGKILLed after the 4th block
    is written (while the first slide computes): its blocks in flight are recomputed
    elsewhere, every block of every good slide is written exactly once, and the maps equal
    single ``tiled_predict`` calls."""
    distributed = pytest.importorskip("distributed")
    import nofc.sinks as sinks

    bad = _corrupt(tmp_path / "bad.tif")
    inputs = [slides / "a.tif", bad, slides / "d.tif", slides / "b.tif", slides / "c.tif"]
    written, hooks = [], {}

    def counted(self, tile, block, _orig=sinks.ZarrSink._write):
        _orig(self, tile, block)
        written.append((str(self.path), tile.index))
        hooks.pop(len(written), lambda: None)()

    monkeypatch.setattr(sinks.ZarrSink, "_write", counted)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        client.wait_for_workers(2, timeout=120)
        victim = min(client.run(os.getpid).values())
        hooks[4] = lambda: os.kill(victim, signal.SIGKILL)
        cohort = _run(fcn, inputs, tmp_path / "maps" / "{stem}.zarr",
                      backend=nofc.Dask(scheduler=cluster.scheduler_address))
        shipped = client.run(lambda: tiling._UNPICKLED)
    assert not hooks, "the worker was never killed"
    assert victim not in shipped  # it is gone (its nanny may have started another)
    assert [r["status"] for r in cohort.rows] == ["done", "failed", "failed", "done", "done"]
    assert "cannot read TIFF" in cohort.rows[1]["reason"]
    # the model went to each worker at most once (a worker its nanny restarted after the
    # stream ended never got it: the plugin is gone with the run)
    assert max(shipped.values()) == 1 and set(shipped.values()) <= {0, 1}, shipped
    assert len(written) == len(set(written))  # no block written twice
    for n in "abc":
        store = tmp_path / "maps" / f"{n}.zarr"
        np.testing.assert_allclose(zarr.open_array(str(store))[:],
                                   _single(fcn, str(slides / f"{n}.tif")), rtol=0, atol=1e-12)
        assert len([w for w in written if w[0] == str(store)]) == len(
            list((store / ".nofc_done").iterdir()))


# --------------------------------------------------------------------------- CLI


def _cli(capsys, args):
    code = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, [line for line in err.splitlines() if line.startswith("nofc: error")]


def test_cli_cohort_exit_codes_and_one_line_refusals(spec, slides, tmp_path, capsys):
    base = ["heatmap", spec, "--input-size", "3x16x16", "--tile", "32", "--quiet"]
    pattern = str(tmp_path / "r" / "{stem}.tif")
    code, out, errors = _cli(capsys, base + [str(slides / "a.tif"), str(slides / "c.tif"),
                                             "--out", pattern])
    assert code == 0 and errors == [] and out.count(" done ") == 2, out
    assert (tmp_path / "r" / "a.tif").exists() and (tmp_path / "r" / "summary.parquet").exists()
    code, out, errors = _cli(capsys, base + [str(slides), "--out", pattern])
    assert code == 2 and errors == [f"nofc: error: 1 of 4 inputs failed (their reasons: "
                                    f"{tmp_path / 'r' / 'summary.csv'})"]
    assert out.count(" skipped ") == 2 and out.count(" done ") == 1  # the GeoTIFFs exist
    for extra, needle in [(["--out", str(tmp_path / "one.zarr")], "need an --out pattern"),
                          ([], "need --out with a pattern"),
                          (["--out", pattern, "-o", "x.png"], "-o is for one image"),
                          (["--out", pattern, "--fail-fast"], "--fail-fast;")]:
        code, out, errors = _cli(capsys, base + [str(slides), *extra])
        assert code == 2 and len(errors) == 1 and needle in errors[0], (extra, errors)
    code, _, errors = _cli(capsys, base + [str(slides / "a.tif"), "--out", "x.zarr"])
    assert code == 2 and "give -o OUTPUT.png" in errors[0]  # one image: as before


def test_an_output_object_as_the_pattern_keeps_its_options(fcn, slides, tmp_path):
    """out= an output object whose path is the pattern: every input's output takes its
    options (here a GeoTIFF of logits, no class file) and the classes' names."""
    import rasterio

    from nofc.sinks import GeoTiffOutput

    pattern = GeoTiffOutput(str(tmp_path / "{stem}.tif"), values="logits", class_band=False)
    cohort = _run(fcn, [slides / "a.tif", slides / "b.tif"], pattern, classes=["x", "y", "z"])
    assert [r["status"] for r in cohort.rows] == ["done", "done"]
    for stem in "ab":
        with rasterio.open(tmp_path / f"{stem}.tif") as f:
            got, names = f.read(), f.descriptions
        np.testing.assert_allclose(got, _single(fcn, slides / f"{stem}.tif"), rtol=1e-12)
        assert names == ("x", "y", "z") and not (tmp_path / f"{stem}.classes.tif").exists()
