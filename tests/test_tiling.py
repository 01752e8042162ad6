"""Halo tiling equals the whole-image dense map; zarr output resumes; Dask agrees."""

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import nofc
from nofc import NofcError
from nofc.zoo import LeNet5

F64 = torch.float64


class PaddedNet(nn.Module):
    """A small padded CNN (like VGG): padding makes tiles need a halo beyond the window."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


def _fcn(model, size, dtype=F64):
    torch.manual_seed(0)
    return nofc.convert(model.eval(), input_size=size).to(dtype)


def _dense(fcn, img_chw, size, step=None):
    x = torch.from_numpy(np.ascontiguousarray(img_chw))[None].to(next(fcn.parameters()).dtype)
    return nofc.dense_predict(fcn, x, input_size=size, step=step)[0].numpy()


@pytest.mark.parametrize("hw, tile", [((300, 203), 64), ((37, 45), 2048), ((130, 97), 40)])
def test_lenet_tiles_equal_dense(hw, tile):
    fcn = _fcn(LeNet5(), (1, 32, 32))
    img = np.random.default_rng(0).random(hw)
    got = nofc.tiled_predict(fcn, img, input_size=(1, 32, 32), tile=tile, progress=False,
                             dtype=F64)
    ref = _dense(fcn, img[None], (1, 32, 32))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("hw, tile", [((150, 131), 32), ((47, 61), 16), ((16, 16), 64)])
def test_padded_net_tiles_equal_dense(hw, tile):
    fcn = _fcn(PaddedNet(), (3, 16, 16))
    geo = nofc.geometry(fcn, (3, 16, 16))
    assert not geo.exact and geo.receptive_field[0] > 16  # the halo must exceed the window
    img = np.random.default_rng(1).random((*hw, 3))  # HWC
    got = nofc.tiled_predict(fcn, img, input_size=(3, 16, 16), tile=tile, progress=False,
                             dtype=F64)
    ref = _dense(fcn, np.moveaxis(img, -1, 0), (3, 16, 16))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10)


def test_resnet18_tiles_equal_dense_float64_and_float32():
    model = torchvision.models.resnet18(num_classes=7)
    fcn = _fcn(model, (3, 64, 64))
    img = np.random.default_rng(2).random((3, 136, 100))  # CHW
    got = nofc.tiled_predict(fcn, img, input_size=(3, 64, 64), tile=64, progress=False, dtype=F64)
    ref = _dense(fcn, img, (3, 64, 64))
    assert got.shape == ref.shape == (7, 3, 2)  # windows inside: (136 - 64) // 32 + 1, ...
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10)
    fcn32 = fcn.float()
    got32 = nofc.tiled_predict(fcn32, img.astype(np.float32), input_size=(3, 64, 64), tile=96,
                               progress=False)
    assert got32.dtype == np.float32
    err = np.abs(got32 - ref).max() / np.abs(ref).max()
    assert err <= 1e-4


def test_shift_and_stitch_tiles_equal_dense():
    fcn = _fcn(LeNet5(), (1, 32, 32))
    img = np.random.default_rng(3).random((120, 90))
    for step in (1, 2):
        got = nofc.tiled_predict(fcn, img, input_size=(1, 32, 32), tile=32, step=step,
                                 progress=False, dtype=F64)
        ref = _dense(fcn, img[None], (1, 32, 32), step=step)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10)
    fcn = _fcn(PaddedNet(), (3, 16, 16))
    img = np.random.default_rng(4).random((3, 70, 53))
    got = nofc.tiled_predict(fcn, img, input_size=(3, 16, 16), tile=16, step=2, progress=False,
                             dtype=F64)
    np.testing.assert_allclose(got, _dense(fcn, img, (3, 16, 16), step=2), rtol=0, atol=1e-10)


def test_uint8_images_are_scaled_and_normalised():
    fcn = _fcn(PaddedNet(), (3, 16, 16))
    img = np.random.default_rng(5).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    got = nofc.tiled_predict(fcn, img, input_size=(3, 16, 16), tile=16, progress=False,
                             normalize=nofc.Normalize(mean=mean, std=std), dtype=F64)
    x = (np.moveaxis(img, -1, 0) / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(got, _dense(fcn, x, (3, 16, 16)), rtol=0, atol=1e-10)


def test_sources_tiff_zarr_dask_memmap(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    zarr = pytest.importorskip("zarr")
    da = pytest.importorskip("dask.array")
    fcn = _fcn(PaddedNet(), (3, 16, 16), dtype=torch.float32)
    img = np.random.default_rng(6).integers(0, 256, (90, 77, 3), dtype=np.uint8)
    ref = nofc.tiled_predict(fcn, img, input_size=(3, 16, 16), tile=32, progress=False)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, img, tile=(32, 32), bigtiff=True)
    z = zarr.create_array(str(tmp_path / "img.zarr"), shape=img.shape, chunks=(32, 32, 3),
                          dtype="uint8")
    z[:] = img
    mm = np.lib.format.open_memmap(tmp_path / "img.npy", mode="w+", dtype=np.uint8,
                                   shape=img.shape)
    mm[:] = img
    mm.flush()
    for source in (str(path), z, da.from_array(img, chunks=(40, 40, 3)),
                   np.load(tmp_path / "img.npy", mmap_mode="r")):
        got = nofc.tiled_predict(fcn, source, input_size=(3, 16, 16), tile=32, progress=False)
        np.testing.assert_array_equal(got, ref)


def test_zarr_output_metadata_and_refusal(tmp_path):
    zarr = pytest.importorskip("zarr")
    fcn = _fcn(LeNet5(), (1, 32, 32), dtype=torch.float32)
    img = np.random.default_rng(7).random((100, 80)).astype(np.float32)
    store = tmp_path / "map.zarr"
    classes = {"classes": [str(i) for i in range(10)]}
    arr = nofc.tiled_predict(fcn, img, input_size=(1, 32, 32), tile=32, progress=False,
                             out=nofc.sinks.ZarrOutput(store, metadata=classes))
    ref = nofc.tiled_predict(fcn, img, input_size=(1, 32, 32), tile=32, progress=False)
    np.testing.assert_array_equal(arr[:], ref)
    meta = dict(zarr.open_array(str(store), mode="r").attrs)["nofc"]
    assert meta["arguments"]["input_size"] == [1, 32, 32]
    assert meta["geometry"]["stride"] == [4, 4] and meta["nofc_version"] == nofc.__version__
    assert meta["metadata"]["classes"][3] == "3"
    # the same arguments: everything is already done, the map is unchanged
    again = nofc.tiled_predict(fcn, img, input_size=(1, 32, 32), tile=32, out=store,
                               progress=False)
    np.testing.assert_array_equal(again[:], ref)
    # different arguments are refused, never mixed
    with pytest.raises(NofcError, match="different arguments.*step"):
        nofc.tiled_predict(fcn, img, input_size=(1, 32, 32), tile=32, out=store, step=2,
                           progress=False)
    half = np.zeros((100, 80), bool)
    half[:, :40] = True  # a mask or a pass method changes the map too
    with pytest.raises(NofcError, match="different arguments.*mask"):
        nofc.tiled_predict(fcn, img, input_size=(1, 32, 32), tile=32, out=store, mask=half,
                           progress=False)
    with pytest.raises(NofcError, match="different arguments.*method"):
        nofc.tiled_predict(fcn, img, input_size=(1, 32, 32), tile=32, out=store,
                           method="shift", progress=False)
    other = _fcn(LeNet5(), (1, 32, 32), dtype=torch.float32)
    with torch.no_grad():
        next(other.parameters()).add_(1)
    with pytest.raises(NofcError, match="model_hash"):
        nofc.tiled_predict(other, img, input_size=(1, 32, 32), tile=32, out=store,
                           progress=False)


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time, numpy as np, torch, nofc
    import nofc.tiling as tiling
    torch.manual_seed(0)
    fcn = nofc.convert(nofc.zoo.LeNet5(), input_size=(1, 32, 32))
    img = np.load(sys.argv[1], mmap_mode="r")
    if len(sys.argv) > 3:  # slow the tiles down so the parent can kill us midway
        run = tiling._TileRunner.compute
        def slow(self, region, t):
            time.sleep(0.15)
            return run(self, region, t)
        tiling._TileRunner.compute = slow
    nofc.tiled_predict(fcn, img, input_size=(1, 32, 32), tile=32, out=sys.argv[2],
                       progress=False)
""")


def test_killed_run_resumes_to_identical_output(tmp_path):
    zarr = pytest.importorskip("zarr")
    img = np.random.default_rng(8).random((200, 160)).astype(np.float32)
    np.save(tmp_path / "img.npy", img)
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    full = tmp_path / "full.zarr"
    subprocess.run([sys.executable, str(script), str(tmp_path / "img.npy"), str(full)],
                   check=True, env=env)
    part = tmp_path / "part.zarr"
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "img.npy"), str(part),
                             "slow"], env=env)
    done = part / ".nofc_done"
    deadline = time.time() + 120
    while time.time() < deadline and not (done.is_dir() and len(list(done.iterdir())) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(list(done.iterdir()))
    total = 7 * 5  # 200x160 image, 8 cells of 4 px per tile
    assert 3 <= n_done < total, n_done
    subprocess.run([sys.executable, str(script), str(tmp_path / "img.npy"), str(part)],
                   check=True, env=env)
    a = zarr.open_array(str(full), mode="r")[:]
    b = zarr.open_array(str(part), mode="r")[:]
    assert not np.isnan(b).any()
    np.testing.assert_array_equal(a, b)


def test_dask_backends_equal_local(monkeypatch):
    """Dask computes the same tiles as this process (bitwise); this process's bands give
    the same map to float32's tolerance (other chunk sizes, other summation orders)."""
    import nofc.tiling as tiling

    pytest.importorskip("dask")
    fcn = _fcn(PaddedNet(), (3, 16, 16), dtype=torch.float32)
    img = np.random.default_rng(9).random((3, 80, 70)).astype(np.float32)
    bands = nofc.tiled_predict(fcn, img, input_size=(3, 16, 16), tile=32, progress=False)
    monkeypatch.setattr(tiling, "_BANDS", False)
    ref = nofc.tiled_predict(fcn, img, input_size=(3, 16, 16), tile=32, progress=False)
    got = nofc.tiled_predict(fcn, img, input_size=(3, 16, 16), tile=32, backend="dask",
                             progress=False)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_allclose(bands, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_dask_local_cluster_two_workers_model_shipped_once(tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    import nofc.tiling as tiling

    monkeypatch.setattr(tiling, "_BANDS", False)  # the same tiles here as on the cluster
    fcn = _fcn(PaddedNet(), (3, 16, 16), dtype=torch.float32)
    img = np.random.default_rng(10).random((3, 96, 80)).astype(np.float32)
    ref = nofc.tiled_predict(fcn, img, input_size=(3, 16, 16), tile=16, progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster:
        got = nofc.tiled_predict(fcn, img, input_size=(3, 16, 16), tile=16, progress=False,
                                 backend=nofc.Dask(scheduler=cluster.scheduler_address))
        with distributed.Client(cluster) as client:
            counts = client.run(lambda: tiling._UNPICKLED)
    np.testing.assert_array_equal(got, ref)
    assert len(counts) == 2 and all(c == 1 for c in counts.values()), counts


def test_bad_arguments():
    fcn = _fcn(LeNet5(), (1, 32, 32))
    img = np.zeros((64, 64))
    with pytest.raises(NofcError, match="smaller than the 32x32 window"):
        nofc.tiled_predict(fcn, np.zeros((20, 64)), input_size=(1, 32, 32), progress=False)
    with pytest.raises(NofcError, match="does not divide the network stride"):
        nofc.tiled_predict(fcn, img, input_size=(1, 32, 32), step=3, progress=False)
    with pytest.raises(NofcError, match="channels"):
        nofc.tiled_predict(fcn, np.zeros((64, 64, 3)), input_size=(1, 32, 32), progress=False)
    with pytest.raises(NofcError, match="backend"):
        nofc.tiled_predict(fcn, img, input_size=(1, 32, 32), backend="spark", progress=False)
    with pytest.raises(NofcError, match="tile"):
        nofc.tiled_predict(fcn, img, input_size=(1, 32, 32), tile=2, progress=False)
    with pytest.raises(NofcError, match="not found"):
        nofc.tiled_predict(fcn, "/no/such.tif", input_size=(1, 32, 32), progress=False)


def test_global_context_networks_are_refused():
    fcn = nofc.convert(torchvision.models.mobilenet_v3_small(num_classes=3), input_size=(3, 64, 64))
    with pytest.raises(NofcError, match="squeeze-and-excitation"):
        nofc.tiled_predict(fcn, np.zeros((3, 96, 96), np.float32), input_size=(3, 64, 64),
                           progress=False)


def test_heatmap_cli_tiles_large_images(tmp_path, capsys, monkeypatch):
    tifffile = pytest.importorskip("tifffile")
    zarr = pytest.importorskip("zarr")
    import nofc.heatmap as heatmap_job
    from nofc.cli import main

    img = np.random.default_rng(11).integers(0, 256, (150, 130), dtype=np.uint8)
    path = tmp_path / "scan.tif"
    tifffile.imwrite(path, img, tile=(64, 64))
    store = tmp_path / "map.zarr"
    png = tmp_path / "heat.png"
    weights = tmp_path / "lenet.pt"
    torch.save(LeNet5().state_dict(), weights)
    model = ["nofc:lenet5", "--weights", str(weights)]
    argv = ["heatmap", *model, str(path), "--input-size", "1x32x32", "-o", str(png),
            "--tile", "48", "--out", str(store), "--top", "2"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "tiled with tile 48" in err
    assert png.stat().st_size > 10_000
    stored = zarr.open_array(str(store), mode="r")
    assert stored.shape == (10, 30, 25)
    # automatic tiling above the size limit, same numbers as the explicit run
    monkeypatch.setattr(heatmap_job, "TILE_ABOVE", 100 * 100)
    png2 = tmp_path / "heat2.png"
    scores = tmp_path / "s.npz"
    assert main(["heatmap", *model, str(path), "--input-size", "1x32x32", "-o", str(png2),
                 "--scores", str(scores)]) == 0
    assert "automatic above 0.0 Mpix" in capsys.readouterr().err
    np.testing.assert_allclose(np.load(scores)["scores"], stored[:], rtol=1e-6, atol=1e-6)


def test_nan_pixels_warn_once_and_mark_cells():
    fcn = _fcn(LeNet5(), (1, 32, 32))
    img = np.random.default_rng(12).random((120, 100))
    img[50, 40] = np.nan
    with pytest.warns(UserWarning, match="NaN or Inf") as record:
        got = nofc.tiled_predict(fcn, img, input_size=(1, 32, 32), tile=32, progress=False,
                                 dtype=F64)
    assert len([w for w in record if "NaN" in str(w.message)]) == 1
    with pytest.warns(UserWarning):
        ref = _dense(fcn, img[None], (1, 32, 32))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    assert np.isnan(got[:, 5:11, 3:11]).all() and not np.isnan(got[:, 0]).any()
    np.testing.assert_allclose(got[~np.isnan(got)], ref[~np.isnan(ref)], rtol=0, atol=1e-10)


def test_heatmap_cli_large_map_is_drawn_downsampled_with_workers(tmp_path, capsys, monkeypatch):
    pytest.importorskip("distributed")
    from PIL import Image

    import nofc.heatmap as heatmap_job
    from nofc.cli import main

    monkeypatch.setattr(heatmap_job, "_THUMB", 16)  # pretend 30x25 cells is more than a picture
    img = np.random.default_rng(13).integers(0, 256, (150, 130), dtype=np.uint8)
    path = tmp_path / "page.png"
    Image.fromarray(img).save(path)
    png = tmp_path / "heat.png"
    scores = tmp_path / "s.npz"
    rc = main(["heatmap", "nofc:lenet5", str(path), "--input-size", "1x32x32", "-o", str(png),
               "--workers", "2", "--tile", "64", "--scores", str(scores)])
    assert rc == 0, capsys.readouterr().err
    assert "backend dask" in capsys.readouterr().err
    assert np.load(scores)["scores"].shape == (10, 30, 25)
    assert Image.open(png).size[0] > 200


def test_sinks_count_their_own_nan_cells_and_report_done_blocks(tmp_path):
    pytest.importorskip("zarr")
    from nofc.sinks import MemorySink, ZarrSink, open_sink
    from nofc.tiling import plan_tiles

    geo = nofc.geometry(_fcn(LeNet5(), (1, 32, 32)), (1, 32, 32))
    tiles, (h, w) = plan_tiles(geo, (100, 80), tile=32)
    block = np.ones((10, 8, 8), np.float32)
    block[:, 0, :3] = np.nan
    first = open_sink(None, (10, h, w), np.float32)
    assert isinstance(first, MemorySink) and first.done == set()
    first.aggregate(tiles[0], block)
    second = open_sink(None, (10, h, w), np.float32)
    second.aggregate(tiles[0], np.ones_like(block))
    assert (first.nan_cells, second.nan_cells) == (3, 0) and first.done == {(0, 0)}
    np.testing.assert_array_equal(first.finalize()[:, :8, :8], block)
    store = tmp_path / "m.zarr"
    args = {"input_size": [1, 32, 32], "tile": 32}
    opened = open_sink(store, (10, h, w), np.float32, chunks=(8, 8), geo=geo,
                       arguments=lambda: args)
    assert isinstance(opened, ZarrSink)
    opened.aggregate(tiles[1], np.zeros((10, 8, 5), np.float32))
    again = open_sink(store, (10, h, w), np.float32, chunks=(8, 8), geo=geo,
                      arguments=lambda: args)
    assert again.done == {(0, 1)} and again.nan_cells == 0
    stored = again.finalize()
    assert not np.isnan(stored[:, :8, 8:]).any() and np.isnan(stored[:, 8:]).all()


def test_field_smaller_than_the_window_still_tiles_exactly():
    # 16 -> 7 -> 1 with a 3x3 stride-2 first conv: cells see 15 of the window's 16 pixels,
    # yet each tile must hold whole windows
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 3, 7)).eval()
    assert nofc.geometry(net, (1, 16, 16)).receptive_field == (15, 15)
    img = np.random.default_rng(0).random((48, 64)).astype(np.float32)
    for step in (None, 1):
        dense = nofc.dense_predict(net, torch.from_numpy(img)[None], (1, 16, 16),
                                   step=step)[0].numpy()
        for tile in (2, 16):
            got = nofc.tiled_predict(net, img, (1, 16, 16), tile=tile, step=step,
                                     progress=False)
            np.testing.assert_allclose(got, dense, rtol=0, atol=1e-6)


def test_default_tile_grows_with_the_halo():
    """DenseNet-121's field reaches 2039 pixels past its window: the default tile is three
    times that (rounded to the stride 32), whatever the budget; ResNet-18's tiles grow
    until their input, halo (field - stride = 595) included, reaches TILE_PIXELS; a small
    field keeps 2048."""
    from nofc.tiling import TILE_PIXELS, default_tile, plan_tiles

    tiles = {}
    for name in ("densenet121", "resnet18"):
        fcn = nofc.convert(getattr(torchvision.models, name)(num_classes=2), (3, 224, 224))
        geo = nofc.geometry(fcn, (3, 224, 224))
        tiles[name] = default_tile(geo)
        if name == "resnet18":
            planned, _ = plan_tiles(geo, (20000, 20000), tile=tiles[name])
            inputs = [(t.inp[1] - t.inp[0]) * (t.inp[3] - t.inp[2]) for t in planned]
            assert TILE_PIXELS - 32 * 4608 <= max(inputs) <= TILE_PIXELS
    assert tiles == {"densenet121": 6144, "resnet18": 4000}
    geo = nofc.geometry(nofc.convert(LeNet5(), (1, 32, 32)), (1, 32, 32))
    assert default_tile(geo) == 2048

# --------------------------------------------------------------------------- prefetch


def _alive():
    import threading

    return sorted(t.name for t in threading.enumerate() if t.name.startswith("nofc-"))


def test_prefetch_map_equals_one_thread_and_dense(tmp_path, monkeypatch):
    """ResNet-18 over a small TIFF, TIFF -> zarr: the map with the reader and writer
    threads is bitwise the map computed in one thread, and equals dense_predict."""
    import tifffile

    import nofc.tiling as tiling

    torch.manual_seed(0)
    fcn = nofc.convert(torchvision.models.resnet18(num_classes=3).eval(), (3, 224, 224))
    img = np.random.default_rng(3).integers(0, 256, (320, 288, 3), dtype=np.uint8)
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, img, tile=(64, 64), compression="zlib", photometric="rgb")
    run = dict(input_size=(3, 224, 224), tile=64, progress=False)  # 2x2 blocks
    stats = {}
    got = nofc.tiled_predict(fcn, str(path), out=str(tmp_path / "a.zarr"), stats=stats,
                             **run)[:]
    assert stats["tiles_computed"] == 4 and _alive() == []
    monkeypatch.setattr(tiling, "_AHEAD", 0)
    one = nofc.tiled_predict(fcn, str(path), out=str(tmp_path / "b.zarr"), **run)[:]
    assert got.dtype == np.float32 and np.array_equal(got, one)
    x = torch.from_numpy(np.moveaxis(img, -1, 0).astype(np.float32) / 255)[None]
    dense = nofc.dense_predict(fcn, x, (3, 224, 224))[0].numpy()
    np.testing.assert_allclose(got, dense, rtol=1e-4, atol=1e-4)


class _Fault:
    """Makes the tile runner fail at block ``at``: ``how`` is "bad" (an unreadable
    region), "oserror" (a read that keeps failing), "interrupt" (Ctrl-C while computing)
    or "write" (the store's write fails). The writes are slowed down so that finished
    blocks queue up behind the writer when the fault comes."""

    def __init__(self, monkeypatch, how, at):
        import nofc.sinks as sinks
        import nofc.tiling as tiling
        from nofc.images import BadRegion

        self.reads, read = [], tiling._TileRunner.read
        compute, write = tiling._TileRunner.compute, sinks.ZarrSink._write

        def faulty_read(runner, src, t):
            self.reads.append(t.index)
            if t.index == at and how == "bad":
                raise BadRegion(f"cannot read the test image at block {t.index}")
            if t.index == at and how == "oserror":
                raise ConnectionResetError(104, "Connection reset by peer")
            return read(runner, src, t)

        def faulty_compute(runner, region, t):
            if t.index == at and how == "interrupt":
                raise KeyboardInterrupt
            return compute(runner, region, t)

        def slow_write(sink, t, block):
            time.sleep(0.02)
            if t.index == at and how == "write":
                sink._store_op(self.disk_full, f"block {t.index}")
            write(sink, t, block)

        monkeypatch.setattr(tiling._TileRunner, "read", faulty_read)
        monkeypatch.setattr(tiling._TileRunner, "compute", faulty_compute)
        monkeypatch.setattr(sinks.ZarrSink, "_write", slow_write)

    @staticmethod
    def disk_full():
        raise OSError(28, "No space left on device")


@pytest.mark.parametrize("how", ["bad", "oserror", "interrupt", "write"])
def test_prefetch_fault_keeps_every_block_before_it_then_resumes(tmp_path, monkeypatch, how):
    """A fault at block (1, 2) of 6x5 stops the run in one line naming the block (or
    with the KeyboardInterrupt itself) once every block before it is in the store, leaves
    no thread running, and the same call then resumes to the uninterrupted map."""
    zarr = pytest.importorskip("zarr")
    import nofc.tiling as tiling

    monkeypatch.setattr(tiling, "_BANDS", False)  # the tiles' faults (bands: hand_over)
    fcn = _fcn(LeNet5(), (1, 32, 32), torch.float32)
    img = np.random.default_rng(4).random((192, 160)).astype(np.float32)
    run = dict(input_size=(1, 32, 32), tile=32, progress=False)
    ref = nofc.tiled_predict(fcn, img, **run)
    store = tmp_path / "map.zarr"
    fault = _Fault(monkeypatch, how, at=(1, 2))
    with pytest.raises(NofcError if how != "interrupt" else KeyboardInterrupt) as err:
        nofc.tiled_predict(fcn, img, out=str(store), **run)
    assert _alive() == []
    msg = str(err.value)
    if how == "bad":
        assert msg.startswith("cannot read the test image at block (1, 2) (map block (1, 2))")
        assert fault.reads[-1] == (1, 2)  # nothing read past the block that stops the run
    if how == "oserror":
        assert msg.startswith("map block (1, 2) (image rows ") and "failed 3 times" in msg
        assert fault.reads[-3:] == [(1, 2)] * 3 and fault.reads.count((1, 2)) == 3
    if how == "write":
        assert msg.startswith(f"cannot write block (1, 2) to {store}: No space left")
    if how != "interrupt":
        assert "\n" not in msg and msg.endswith("holds 7 of 30 blocks; the same call "
                                                "resumes from there")
    done = sorted(p.name for p in (store / ".nofc_done").iterdir())
    assert done == [f"{i // 5}_{i % 5}" for i in range(7)]  # the blocks before (1, 2)
    monkeypatch.undo()
    monkeypatch.setattr(tiling, "_BANDS", False)
    got = nofc.tiled_predict(fcn, img, out=str(store), **run)
    np.testing.assert_array_equal(zarr.open_array(str(store), mode="r")[:], ref)
    np.testing.assert_array_equal(got[:], ref)


class _BandSpy:
    """Counts the bands computed (``RowStream.advance``); ``corrupt``: adds 1 to every
    band's cells, as a bug in the band pass would."""

    def __init__(self, monkeypatch, corrupt=False, band=None):
        from nofc.streaming import RowStream

        if band is not None:  # image rows per band
            monkeypatch.setattr(RowStream, "band", property(lambda stream: band))
        self.calls, advance = [], RowStream.advance

        def spied(stream, x, b):
            self.calls.append((stream.cols[-1][:2], b))
            out = advance(stream, x, b)
            return out + 1 if corrupt else out

        monkeypatch.setattr(RowStream, "advance", spied)


@pytest.mark.parametrize("name, strips", [("resnet18", 1), ("resnet18", 3), ("densenet121", 3),
                                          pytest.param("vgg11", 1, marks=pytest.mark.slow)])
def test_bands_equal_dense_float64(monkeypatch, name, strips):
    """On a CPU a network cut into stages runs band by band down the image (in strips
    across it when a strip would pass the memory budget): the map equals dense_predict's
    to 1e-10 in float64, for a float32 network asked for a float64 map too."""
    import nofc.tiling as tiling

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=4).eval()
    fcn = nofc.convert(model, (3, 224, 224))  # float32; the map is asked in float64
    img = np.random.default_rng(9).random((3, 520, 400))
    if strips > 1:  # a strip of about a third of the image's width
        monkeypatch.setattr(tiling, "_BAND_PIXELS", 280 * 2 * nofc.geometry(
            fcn, (3, 224, 224)).receptive_field[0])
    spy = _BandSpy(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the band check passes silently
        got = nofc.tiled_predict(fcn, img, input_size=(3, 224, 224), tile=128,
                                 progress=False, dtype=F64)
    assert {cols for cols, _ in spy.calls} and len({c for c, _ in spy.calls}) >= strips
    ref = nofc.dense_predict(fcn, torch.from_numpy(img)[None], (3, 224, 224),
                             dtype=F64)[0].numpy()
    assert got.dtype == np.float64 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10 * max(1, np.abs(ref).max()))
    if name == "resnet18" and strips == 1:  # the image padded by reflection first
        spy.calls.clear()
        got = nofc.tiled_predict(fcn, img, input_size=(3, 224, 224), tile=128,
                                 progress=False, dtype=F64, edges="reflect")
        ref = nofc.dense_predict(fcn, torch.from_numpy(img)[None], (3, 224, 224),
                                 dtype=F64, edges="reflect")[0].numpy()
        assert spy.calls and got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10 * max(1, np.abs(ref).max()))


def test_bands_resume_a_store_and_skip_what_tiles_do(tmp_path, monkeypatch):
    """A store that holds some blocks resumes band by band from the first block row with
    one to compute (rows done before are not computed again); a Dask backend, a finer
    step and bf16 keep or leave the bands as documented, with the same map."""
    zarr = pytest.importorskip("zarr")
    import nofc.tiling as tiling
    from nofc.precision import agreement

    torch.manual_seed(0)
    fcn = nofc.convert(torchvision.models.resnet18(num_classes=3).eval(), (3, 224, 224))
    img = np.random.default_rng(10).random((3, 416, 320)).astype(np.float32)
    run = dict(input_size=(3, 224, 224), tile=64, progress=False)
    monkeypatch.setattr(tiling, "_BANDS", False)
    ref = nofc.tiled_predict(fcn, img, **run)  # tiles only
    monkeypatch.undo()
    store = tmp_path / "map.zarr"
    spy = _BandSpy(monkeypatch)
    nofc.tiled_predict(fcn, img, out=str(store), **run)
    np.testing.assert_allclose(zarr.open_array(str(store))[:], ref, rtol=1e-4,
                               atol=1e-4 * np.abs(ref).max())
    # forget every block from block row 2 on: the resumed run starts its bands there
    done = store / ".nofc_done"
    for p in done.iterdir():
        if int(p.name.split("_")[0]) >= 2:
            p.unlink()
    spy.calls.clear()
    stats = {}
    got = nofc.tiled_predict(fcn, img, out=str(store), stats=stats, **run)[:]
    assert spy.calls and stats["tiles_computed"] == 2 * 2  # rows 2..3 of 4x2 blocks
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    spy.calls.clear()
    for kw in (dict(backend="dask"), dict(step=16)):
        nofc.tiled_predict(fcn, img, **run, **kw)
    assert spy.calls == []  # tiles for these
    low = nofc.tiled_predict(fcn, img, precision="bf16", **run)
    assert spy.calls and agreement(torch.from_numpy(ref)[None],
                                   torch.from_numpy(low)[None])["same_top"] >= 0.9


@functools.lru_cache(maxsize=None)
def _hand_over_case(nan: bool):
    """ResNet-18, an image of 23 map rows (NaN pixels near the bottom, or none), and its
    map computed tile by tile."""
    import nofc.tiling as tiling

    torch.manual_seed(0)
    fcn = nofc.convert(torchvision.models.resnet18(num_classes=3).eval(), (3, 224, 224))
    img = np.random.default_rng(11).random((3, 928, 288)).astype(np.float32)
    if nan:
        img[:, 850, 100] = np.nan
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        mp.setattr(tiling, "_BANDS", False)
        warnings.simplefilter("ignore")
        ref = nofc.tiled_predict(fcn, img, input_size=(3, 224, 224), tile=64, progress=False)
    return fcn, img, ref


@pytest.mark.parametrize("fault", ["nan", "bad", "corrupt"])
def test_bands_hand_over_to_tiles(monkeypatch, fault):
    """NaN pixels, an unreadable region or a band pass that disagrees with its tile:
    the blocks not yet written are computed tile by tile, and the map is the tiles' map
    (NaN cells where they see NaN pixels, one warning; a failed check says so)."""
    import nofc.tiling as tiling
    from nofc.images import BadRegion

    fcn, img, ref = _hand_over_case(fault == "nan")
    run = dict(input_size=(3, 224, 224), tile=64, progress=False)
    spy = _BandSpy(monkeypatch, corrupt=fault == "corrupt", band=64)  # 2 map rows a band
    reads, read = [], tiling._TileRunner.read

    def failing(runner, src, t):
        reads.append(t)
        if fault == "bad" and t.inp[0] > 200 and t.index[0] < 100 and len(reads) < 4:
            raise BadRegion("cannot read the test image there")
        return read(runner, src, t)

    monkeypatch.setattr(tiling._TileRunner, "read", failing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = nofc.tiled_predict(fcn, img, **run)
    said = [str(w.message) for w in caught]
    assert spy.calls  # the bands started
    if fault == "nan":
        assert np.isnan(got).any() and sum("NaN or Inf" in s for s in said) == 1
    if fault == "corrupt":
        assert len(spy.calls) == 1 and any("the band pass gives cell (0, 0)" in s for s in said)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.nanmax(np.abs(ref)))


def test_bands_under_a_mask_compute_only_the_strips_with_foreground(monkeypatch):
    """Under a mask, a band computes the strips with foreground in its rows, and a strip
    left out starts again where it is next needed: the foreground cells equal the tiles',
    the background is NaN as with tiles."""
    import nofc.tiling as tiling

    torch.manual_seed(0)
    fcn = nofc.convert(torchvision.models.resnet18(num_classes=3).eval(), (3, 224, 224))
    img = np.random.default_rng(12).random((3, 480, 1600)).astype(np.float32)
    mask = np.zeros(img.shape[1:], bool)
    mask[:150, :400] = True  # foreground cells: rows 0..1 and 7..8 of the first strip,
    mask[330:, :400] = True  # rows 3..8 of the last, none in the middle one
    mask[200:, 1250:] = True
    run = dict(input_size=(3, 224, 224), tile=64, progress=False, mask=mask)  # 2x2 cells
    monkeypatch.setattr(tiling, "_BANDS", False)
    ref = nofc.tiled_predict(fcn, img, **run)
    monkeypatch.setattr(tiling, "_BANDS", True)
    monkeypatch.setattr(tiling, "_BAND_PIXELS", 1100 * 64)  # three strips of 64-row bands
    spy = _BandSpy(monkeypatch, band=64)  # 2 map rows a band
    got = nofc.tiled_predict(fcn, img, **run)
    ends = {}  # strip -> the rows each band computed it to
    for cols, b in spy.calls:
        ends.setdefault(cols, []).append(b)
    # what the tiles computed: blocks of 2x2 cells with a foreground cell
    fg = np.isfinite(ref).all(0)
    want: dict = {}
    for a in range(0, fg.shape[0], 2):
        for c in range(0, fg.shape[1], 2):
            if fg[a:a + 2, c:c + 2].any():
                for cols in ((0, 15), (15, 30), (30, 44)):
                    if cols[0] < c + 2 and c < cols[1]:
                        want.setdefault(cols, set()).add(min(a + 2, fg.shape[0]))
    assert {cols: sorted(b) for cols, b in want.items()} == ends
    assert (15, 30) not in ends  # the middle strip is glass: never computed
    left = ends[0, 15]
    assert any(b - a > 2 for a, b in zip(left, left[1:]))  # left out, then started again
    assert np.array_equal(np.isnan(got), np.isnan(ref)) and np.isnan(got).any()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.nanmax(np.abs(ref)))
