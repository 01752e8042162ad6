"""Tiling benchmarks: throughput vs single pass, peak memory vs image size, Dask scaling.

Every figure is measured in this run, side by side:

    python benchmarks/bench_tiling.py throughput   # tiled / single-pass dense rate
    python benchmarks/bench_tiling.py tiff --models resnet18 densenet121 --side 8192 --tiles
                                                   # TIFF -> zarr / streamed one pass
                                                   # (bands; --tiles: also tiles only)
    python benchmarks/bench_tiling.py rss --model resnet18 --sizes 2000 5000 10000 20000
                                                   # --tile 0: the default; --tiles-only
    python benchmarks/bench_tiling.py dask         # 1 vs 2 single-threaded workers
    python benchmarks/bench_tiling.py faults       # kill 1 of 2 workers at 25/50/75%,
                                                   # then three runs on one cluster
    python benchmarks/bench_tiling.py shared       # only the three runs on one cluster
    python benchmarks/bench_tiling.py mask         # mask="auto" on a 70%-glass slide
    python benchmarks/bench_tiling.py all

Peak RSS is measured in a fresh subprocess per run (VmHWM), reading a tiled TIFF
lazily and writing the map to a zarr store, as for a slide.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

import nofc


def _machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def _model(name: str):
    torch.manual_seed(0)
    if name == "digits":
        # the demo's padding-free digits net (stride 4, 24x24 window), random weights
        net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(512, 128), torch.nn.ReLU(),
            torch.nn.Linear(128, 11))
        return net.eval(), (1, 24, 24)
    return torchvision.models.get_model(name, weights=None).eval(), (3, 224, 224)


def _timeit(fn, repeat=3):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def throughput(args) -> list[dict]:
    from nofc.tiling import plan_tiles

    rows = []
    cases = [("digits", 4096, 2048), ("digits", 4096, 1024), ("resnet18", 2048, 1024),
             ("resnet18", 1536, 512), ("vgg16", 1344, 672)]
    for name, side, tile in cases:
        model, size = _model(name)
        fcn = nofc.convert(model, input_size=size)
        img = np.random.default_rng(0).random((size[0], side, side), dtype=np.float32)
        x = torch.from_numpy(img)[None]
        # the work bound: input pixels the tiles read (halos included) vs the image
        geo = nofc.geometry(fcn, size)
        tiles, _ = plan_tiles(geo, (side, side), tile=tile)
        read = sum((t.inp[1] - t.inp[0]) * (t.inp[3] - t.inp[2]) for t in tiles)
        bound = side * side / read
        t_dense = _timeit(lambda: nofc.dense_predict(fcn, x, input_size=size), args.repeat)
        t_tiled = _timeit(lambda: nofc.tiled_predict(fcn, img, input_size=size, tile=tile,
                                                     progress=False), args.repeat)
        ratio = t_dense / t_tiled
        rows.append({"model": name, "image": f"{side}x{side}", "tile": tile,
                     "receptive_field": geo.receptive_field[0], "tiles": len(tiles),
                     "dense_s": round(t_dense, 3), "tiled_s": round(t_tiled, 3),
                     "ratio": round(ratio, 3), "halo_bound": round(bound, 3),
                     "of_bound": round(ratio / bound, 3)})
        print(f"{name:9s} {side}x{side} tile {tile} (receptive field {geo.receptive_field[0]}, "
              f"{len(tiles)} tiles): dense {t_dense:.2f}s  tiled {t_tiled:.2f}s  throughput "
              f"ratio {ratio:.2f}  halo bound {bound:.2f}  of bound {ratio / bound:.2f}",
              flush=True)
    return rows


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork
    and exec, so a child started by a large parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no VmHWM in /proc/self/status: peak RSS needs Linux")


_CHILD = r"""
import json, sys, time
import numpy as np, torch, nofc
import nofc.tiling
nofc.tiling._BANDS = {bands}
sys.path.insert(0, {bench_dir!r})
from bench_tiling import _model, peak_rss_mb
model, size = _model({model!r})
fcn = nofc.convert(model, input_size=size)
del model
t = time.perf_counter()
arr = nofc.tiled_predict(fcn, {tif!r}, input_size=size, tile={tile}, out={out!r},
                         progress={progress})
secs = time.perf_counter() - t
print(json.dumps({{"seconds": secs, "map": list(arr.shape),
                   "peak_rss_mb": peak_rss_mb()}}))
"""


def _make_tiff(path: Path, side: int, channels: int, compression=None):
    import tifffile

    tile = 512
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (tile, tile, channels)[: 3 if channels > 1 else 2],
                         dtype=np.uint8)
    n_tiles = (-(-side // tile)) ** 2

    def tiles():
        for _ in range(n_tiles):
            yield block

    shape = (side, side, channels) if channels > 1 else (side, side)
    tifffile.imwrite(path, tiles(), shape=shape, dtype=np.uint8, tile=(tile, tile),
                     bigtiff=True, photometric="rgb" if channels == 3 else "minisblack",
                     compression=compression)


def tiff(args) -> list[dict]:
    """Whole-image TIFF -> zarr (``tiled_predict`` with its default tile, or ``--tile``:
    band by band where it can, ``nofc.tiling._Bands``) against the streamed one-image pass
    (``dense_predict`` of the same pixels, decoded and normalised beforehand, in memory),
    side by side, and the largest difference of the two maps (relative to the largest
    score). ``--tiles`` also times tiles only (each with the network's whole halo).
    ``--profile`` adds where the tiles-only time goes, tile by tile in one thread: read +
    decode, normalise, compute, write; and the halo: input pixels the tiles compute over
    the image's pixels."""
    import tifffile

    from nofc import tiling
    from nofc.tiling import _Bands, default_tile, open_job

    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tif = Path(tmp) / "img.tif"
        for name in args.models:
            model, size = _model(name)
            fcn = nofc.convert(model, input_size=size)
            if not tif.exists():
                _make_tiff(tif, args.side, size[0], args.compression)
            norm = nofc.Normalize().for_pixels(np.uint8)
            x = norm.tensor(np.moveaxis(tifffile.imread(tif), -1, 0), dtype=torch.float32,
                            device="cpu")[None]  # (1, C, H, W): decoded before the clock
            low = dict(precision=args.precision)
            nofc.dense_predict(fcn, x[..., :1024, :1024], input_size=size, **low)  # warm-up
            tile = args.tile_size or default_tile(nofc.geometry(fcn, size))
            t = time.perf_counter()
            dense = nofc.dense_predict(fcn, x, input_size=size, **low)[0].numpy()
            t_dense = time.perf_counter() - t
            del x
            t = time.perf_counter()
            tiled = nofc.tiled_predict(fcn, str(tif), input_size=size, tile=args.tile_size,
                                       out=str(Path(tmp) / f"{name}.zarr"), progress=False,
                                       **low)
            t_tiled = time.perf_counter() - t
            diff = float(np.abs(tiled[:] - dense).max() / np.abs(dense).max())
            del dense
            mpix = args.side ** 2 / 1e6
            row = {"model": name, "image": f"{args.side}x{args.side}", "tile": tile,
                   "precision": args.precision,
                   "compression": args.compression, "dense_s": round(t_dense, 2),
                   "tiled_s": round(t_tiled, 2), "dense_mpix_s": round(mpix / t_dense, 3),
                   "tiled_mpix_s": round(mpix / t_tiled, 3),
                   "ratio": round(t_dense / t_tiled, 3), "max_rel_diff": float(f"{diff:.2g}"),
                   "load": os.getloadavg()[0]}
            with open_job(fcn, str(tif), size, tile=args.tile_size) as job:
                read = sum((t.inp[1] - t.inp[0]) * (t.inp[3] - t.inp[2]) for t in job.tiles)
                row["tiles"], row["halo_extra"] = len(job.tiles), round(
                    read / args.side ** 2 - 1, 3)
                bands = _Bands.plan(job.runner, job.runner.image_hw(job.src),
                                    job.sink.shape[1:], job.todo)
                row["strips"] = None if bands is None else len(bands.strips)
                row["band_rows"] = None if bands is None else bands.band_cells * max(
                    bands.geo.stride)
                if args.profile:
                    row.update(_profile(job))
            if args.tiles:
                tiling._BANDS = False
                t = time.perf_counter()
                nofc.tiled_predict(fcn, str(tif), input_size=size, tile=args.tile_size,
                                   out=str(Path(tmp) / f"{name}_tiles.zarr"), progress=False,
                                   **low)
                t_tiles = time.perf_counter() - t
                tiling._BANDS = True
                row["tiles_s"] = round(t_tiles, 2)
                row["tiles_ratio"] = round(t_dense / t_tiles, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _profile(job) -> dict:
    """Seconds per part of the tiled run, one tile after the other in this thread."""
    runner, parts = job.runner, dict.fromkeys(["read_s", "normalize_s", "compute_s",
                                              "write_s"], 0.0)
    for t in job.todo:
        c0 = time.perf_counter()
        region = runner.read(job.src, t)
        c1 = time.perf_counter()
        runner.normalize.tensor(region, dtype=runner.dtype, device=runner.device)
        c2 = time.perf_counter()
        block = runner.compute(region, t)  # normalises again: counted once, above
        c3 = time.perf_counter()
        job.sink.aggregate(t, block)
        c4 = time.perf_counter()
        for key, secs in zip(parts, (c1 - c0, c2 - c1, c3 - c2 - (c2 - c1), c4 - c3)):
            parts[key] += secs
    return {key: round(secs, 2) for key, secs in parts.items()}


def rss(args) -> list[dict]:
    rows = []
    bench_dir = str(Path(__file__).resolve().parent)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for side in args.sizes:
            _, size = _model(args.model)
            tif = Path(tmp) / f"img_{side}.tif"
            t = time.perf_counter()
            _make_tiff(tif, side, size[0])
            made = time.perf_counter() - t
            out = Path(tmp) / f"map_{side}.zarr"
            code = _CHILD.format(bench_dir=bench_dir, model=args.model, tif=str(tif),
                                 tile=args.tile or None, out=str(out), progress=args.progress,
                                 bands=not args.tiles_only)
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"child failed for {side}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            mpix = side * side / 1e6
            row = {"model": args.model, "image": f"{side}x{side}x{size[0]}", "tile": args.tile,
                   "bands": not args.tiles_only,
                   "tiff_mb": round(tif.stat().st_size / 2**20), "map": r["map"],
                   "seconds": round(r["seconds"], 1), "mpix_per_s": round(mpix / r["seconds"], 3),
                   "peak_rss_mb": round(r["peak_rss_mb"])}
            rows.append(row)
            print(f"{args.model:9s} {side:6d}^2 (TIFF {row['tiff_mb']} MB, made in {made:.0f}s): "
                  f"{row['seconds']}s, {row['mpix_per_s']} Mpix/s, peak RSS {row['peak_rss_mb']} MB,"
                  f" map {r['map']}", flush=True)
            tif.unlink()
    return rows


def dask_scaling(args) -> list[dict]:
    from distributed import LocalCluster

    model, size = _model(args.dask_model)
    fcn = nofc.convert(model, input_size=size)
    side = args.dask_side
    img = np.random.default_rng(0).random((size[0], side, side), dtype=np.float32)
    times = {}
    for n in (1, 2):
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                          host="127.0.0.1", dashboard_address=None) as cluster:
            dask = nofc.Dask(scheduler=cluster.scheduler_address)
            run = lambda: nofc.tiled_predict(fcn, img, input_size=size, tile=args.dask_tile,  # noqa: E731
                                             backend=dask, progress=False)
            run()  # warm-up: ships the model
            t = time.perf_counter()
            run()
            times[n] = time.perf_counter() - t
    eff = times[1] / (2 * times[2])
    print(f"dask {args.dask_model} {side}x{side} tile {args.dask_tile}: 1 worker {times[1]:.1f}s, "
          f"2 workers {times[2]:.1f}s, speedup {times[1] / times[2]:.2f}, efficiency {eff:.2f}",
          flush=True)
    return [{"model": args.dask_model, "image": f"{side}x{side}", "workers_1_s": round(times[1], 2),
             "workers_2_s": round(times[2], 2), "efficiency": round(eff, 3)}]


def _glass_slide(path: Path, side: int, tissue: float = 0.3):
    """A pyramidal tiled TIFF slide (3 levels, 0.25 micron pixels): white glass with a
    disc of saturated 'tissue' covering ``tissue`` of it, for OpenSlide."""
    import tifffile

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side]
    r = side * np.sqrt(tissue / np.pi)
    disc = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 < r * r
    img = np.full((side, side, 3), 235, np.uint8) + rng.integers(0, 10, (side, side, 3),
                                                                 dtype=np.uint8)
    img[disc] = rng.integers(0, 256, (int(disc.sum()), 3), dtype=np.uint8) // [1, 3, 2] + \
        np.array([120, 0, 60], np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k in range(3):
            res = 1e4 / (0.25 * 2 ** k)
            tw.write(img[:: 2 ** k, :: 2 ** k], tile=(256, 256), photometric="rgb",
                     resolution=(res, res), resolutionunit="CENTIMETER",
                     subfiletype=0 if k == 0 else 1)


def mask(args) -> list[dict]:
    """All windows vs mask="auto" on a slide that is 70% glass, side by side: the speedup
    against the bound (all windows / windows computed). ``--mask-model densenet121``
    (any torchvision name; ``--mask-tile 0``: the default tile) instead of the small
    patch net; ``--tiles``: the masked run also tiles only (each tile with its halo)."""
    from nofc import tiling

    torch.manual_seed(0)
    net = torch.nn.Sequential(  # a small RGB patch classifier: window 36, stride 8
        torch.nn.Conv2d(3, 32, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(64, 64, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64 * 2 * 2, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 3)).eval()
    size = (3, 36, 36)
    if args.mask_model:
        net, size = _model(args.mask_model)
    fcn = nofc.convert(net, input_size=size)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        slide = Path(tmp) / "glass.tif"
        _glass_slide(slide, args.mask_side)
        run = dict(input_size=size, tile=args.mask_tile or None, progress=args.progress)
        stats: dict = {}
        slide = nofc.open_source(str(slide), level=0)
        t_all = _timeit(lambda: nofc.tiled_predict(fcn, slide, **run), args.repeat)
        t_mask = _timeit(lambda: nofc.tiled_predict(fcn, slide, mask="auto",
                                                    stats=stats, **run), args.repeat)
        bound = stats["windows"] / stats["computed"]
        speedup = t_all / t_mask
        rows.append({"image": f"{args.mask_side}x{args.mask_side}", "tile": args.mask_tile,
                     "windows": stats["windows"], "computed": stats["computed"],
                     "all_s": round(t_all, 3), "masked_s": round(t_mask, 3),
                     "speedup": round(speedup, 3), "bound": round(bound, 3),
                     "of_bound": round(speedup / bound, 3)})
        if args.tiles:
            tiling._BANDS = False
            t_tiles = _timeit(lambda: nofc.tiled_predict(fcn, slide, mask="auto", **run),
                              args.repeat)
            tiling._BANDS = True
            rows[-1].update(masked_tiles_s=round(t_tiles, 3),
                            bands_over_tiles=round(t_tiles / t_mask, 3))
            print(f"masked, tiles only: {t_tiles:.2f}s; bands {t_tiles / t_mask:.2f}x faster",
                  flush=True)
        print(f"mask auto, slide {args.mask_side}x{args.mask_side} (70% glass), tile "
              f"{args.mask_tile}: {stats['computed']} of {stats['windows']} windows computed "
              f"({stats['computed'] / stats['windows']:.0%}); all {t_all:.2f}s  masked "
              f"{t_mask:.2f}s  speedup {speedup:.2f}  bound {bound:.2f}  of bound "
              f"{speedup / bound:.2f}", flush=True)
    return rows


def faults(args) -> list[dict]:
    """Kill one of 2 workers (SIGKILL; its nanny starts a replacement) when 25, 50 and 75%
    of the blocks are done; each killed run is paired with an undisturbed run just before
    it. Reports the extra time, the blocks the lost worker held (running, or finished and
    not yet collected), how many were recomputed, and whether the maps are equal."""
    import signal

    from distributed import Client, LocalCluster
    from distributed.diagnostics.plugin import SchedulerPlugin

    from nofc.tiling import plan_tiles

    class Watch(SchedulerPlugin):
        """Counts tasks sent to workers and finished; kills ``victim`` (address, pid) when
        ``kill_at`` have finished. The LocalCluster's scheduler runs in this process."""

        def __init__(self):
            self.reset()

        def reset(self, kill_at=None, victim=None):
            self.sent = self.done = 0
            self.kill_at, self.victim, self.lost, self.killed, self.joined = (
                kill_at, victim, None, None, None)

        def transition(self, key, start, finish, *args, **kwargs):
            self.sent += finish == "processing"
            self.done += finish == "memory"
            if finish == "memory" and self.done == self.kill_at:
                ws = self.scheduler.workers.get(self.victim[0])
                self.lost = len(ws.processing) + len(ws.has_what) if ws else 0
                self.killed = time.perf_counter()
                os.kill(self.victim[1], signal.SIGKILL)

        def add_worker(self, scheduler=None, worker=None):
            if self.killed and self.joined is None:
                self.joined = time.perf_counter() - self.killed

    model, size = _model(args.faults_model)
    fcn = nofc.convert(model, input_size=size)
    side, tile = args.faults_side, args.faults_tile
    img = np.random.default_rng(0).random((size[0], side, side), dtype=np.float32)
    n = len(plan_tiles(nofc.geometry(fcn, size), (side, side), tile=tile)[0])
    print(f"faults {args.faults_model} {side}x{side} tile {tile}: {n} blocks on 2 "
          f"single-threaded workers", flush=True)
    rows, ref = [], None
    for frac in (0.25, 0.5, 0.75):
        # a fresh cluster each time: under heavy load a nanny may give up restarting
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          host="127.0.0.1", dashboard_address=None) as cluster, \
                Client(cluster) as client:
            watch = Watch()
            watch.scheduler = cluster.scheduler
            cluster.scheduler.add_plugin(watch, name="bench-watch")

            def run(kill_at=None):
                watch.reset(kill_at, sorted(client.run(os.getpid).items())[0])
                t = time.perf_counter()
                out = nofc.tiled_predict(fcn, img, input_size=size, tile=tile,
                                         backend=nofc.Dask(scheduler=cluster.scheduler_address),
                                         progress=False)
                return out, time.perf_counter() - t

            first, _ = run()  # warm-up: ships the model
            ref = first if ref is None else ref
            _, base = run()
            got, secs = run(kill_at=round(frac * n))
        equal = bool(np.array_equal(got, ref))
        row = {"model": args.faults_model, "image": f"{side}x{side}", "blocks": n,
               "kill_at": frac, "undisturbed_s": round(base, 2), "run_s": round(secs, 2),
               "extra": round(secs / base - 1, 3), "lost_blocks": watch.lost,
               "recomputed": watch.sent - n, "replacement_after_s":
                   None if watch.joined is None else round(watch.joined, 1),
               "maps_equal": equal}
        rows.append(row)
        print(f"  kill at {frac:.0%}: undisturbed {base:.1f}s, with the kill {secs:.1f}s "
              f"({row['extra']:+.1%}); the lost worker held {watch.lost} blocks, "
              f"{row['recomputed']} recomputed; replacement joined after "
              f"{row['replacement_after_s']}s; maps equal: {equal}", flush=True)
    return rows


_SHARED_CLIENT = """
import json, pathlib, sys, time
import numpy as np, nofc
sys.path.insert(0, sys.argv[1])
from bench_tiling import _model
model, size = _model(sys.argv[2])
fcn = nofc.convert(model, input_size=size)
img = np.load(sys.argv[3], mmap_mode="r")
go = pathlib.Path(sys.argv[6])
while not go.exists():
    time.sleep(0.01)
time.sleep(float(sys.argv[7]))
start = time.time()
nofc.tiled_predict(fcn, img, input_size=size, tile=int(sys.argv[4]), out=sys.argv[5],
                   backend=nofc.Dask(scheduler=sys.argv[8]), progress=False)
print(json.dumps({"start": start, "end": time.time()}))
"""


def shared(args) -> list[dict]:
    """Three runs (three client processes, as three users would start them) on one
    cluster of 2 single-threaded workers, started 0.3 s apart, against the same three
    runs one after the other; every map compared with the first (bit-equal), and with
    the one computed here (float32 sums in another thread count: within about 1e-6).
    Before issue 27 such runs could kill each other (NameError from the tracer of a
    model being loaded on a worker)."""
    import zarr
    from distributed import LocalCluster

    model, size = _model(args.faults_model)
    fcn = nofc.convert(model, input_size=size)
    side, tile = args.faults_side, args.faults_tile
    img = np.random.default_rng(0).random((size[0], side, side), dtype=np.float32)
    ref = nofc.tiled_predict(fcn, img, input_size=size, tile=tile, progress=False)
    rows, first, off = [], [], [0.0]  # the first cluster map; the largest |map - local|
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp, \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                         host="127.0.0.1", dashboard_address=None) as cluster:
        tmp = Path(tmp)
        np.save(tmp / "img.npy", img)
        (tmp / "client.py").write_text(_SHARED_CLIENT)

        def clients(tag, delays, go):
            return [subprocess.Popen(
                [sys.executable, str(tmp / "client.py"), str(Path(__file__).parent),
                 args.faults_model, str(tmp / "img.npy"), str(tile),
                 str(tmp / f"{tag}{i}.zarr"), str(go), str(d), cluster.scheduler_address],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i, d in enumerate(delays)]

        def finished(procs, tag):
            times, failed = [], []
            for i, proc in enumerate(procs):
                out, err = proc.communicate()
                if proc.returncode:
                    failed.append(err.strip().splitlines()[-1] if err.strip() else "?")
                    continue
                times.append(json.loads(out.strip().splitlines()[-1]))
                got = zarr.open_array(str(tmp / f"{tag}{i}.zarr"), mode="r")[:]
                if not first:
                    first.append(got)
                if not np.array_equal(got, first[0]):  # bit-equal to the first run's
                    failed.append(f"run {i}: map differs")
                off[0] = max(off[0], float(np.abs(got - ref).max()))
            return times, failed

        go = tmp / "go"
        go.touch()
        seq_times, seq_failed = [], []
        for i in range(3):  # one after the other: each waits for the one before
            times, failed = finished(clients(f"seq{i}_", [0.0], go), f"seq{i}_")
            seq_times += times
            seq_failed += failed
        seq = sum(t["end"] - t["start"] for t in seq_times)
        go2 = tmp / "go2"
        procs = clients("par", [0.0, 0.3, 0.6], go2)
        time.sleep(5)  # imported and converted: they start 0.3 s apart from here
        go2.touch()
        par_times, par_failed = finished(procs, "par")
        par = (max(t["end"] for t in par_times) - min(t["start"] for t in par_times)
               if par_times else float("nan"))
    n = len(nofc.tiling.plan_tiles(nofc.geometry(fcn, size), (side, side), tile=tile)[0])
    row = {"model": args.faults_model, "image": f"{side}x{side}", "blocks": n,
           "one_after_another_s": round(seq, 2), "three_at_once_s": round(par, 2),
           "ratio": round(par / seq, 3), "failed": seq_failed + par_failed,
           "max_abs_vs_local": off[0]}
    rows.append(row)
    print(f"three runs on one cluster ({args.faults_model} {side}x{side} tile {tile}, {n} "
          f"blocks each, 2 single-threaded workers): one after another {seq:.1f}s, at once "
          f"(0.3 s apart) {par:.1f}s (x{row['ratio']:.2f}); failed runs or maps: "
          f"{row['failed'] or 'none'}; largest difference from the map computed here "
          f"{off[0]:.1e}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=["throughput", "tiff", "rss", "dask", "faults", "shared", "mask",
                                    "all"])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 10000, 20000])
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--dask-model", default="resnet18")
    p.add_argument("--dask-side", type=int, default=1536)
    p.add_argument("--dask-tile", type=int, default=256)
    p.add_argument("--faults-model", default="digits")
    p.add_argument("--faults-side", type=int, default=4096)
    p.add_argument("--faults-tile", type=int, default=512)
    p.add_argument("--mask-side", type=int, default=4096)
    p.add_argument("--mask-tile", type=int, default=256)
    p.add_argument("--mask-model", default=None, help="mask: a torchvision model instead")
    p.add_argument("--models", nargs="+", default=["resnet18", "densenet121"])
    p.add_argument("--side", type=int, default=8192)
    p.add_argument("--tile-size", type=int, default=None, help="tiff: the tile (default: "
                   "default_tile)")
    p.add_argument("--compression", default="zlib", help="tiff: the TIFF's compression "
                   "(zlib: a decode cost, as for slides; none)")
    p.add_argument("--profile", action="store_true", help="tiff: where the tiled time goes")
    p.add_argument("--tiles", action="store_true", help="tiff, mask: also time tiles only")
    p.add_argument("--precision", default="fp32", help="tiff: fp32 or bf16 (both passes)")
    p.add_argument("--tiles-only", action="store_true", help="rss: tiles only, no bands")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--tmp", default=None, help="folder for the temporary TIFF and zarr map")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    print(_machine(), flush=True)
    rows = []
    if args.what in ("throughput", "all"):
        rows += throughput(args)
    if args.what == "tiff":
        args.compression = None if args.compression == "none" else args.compression
        rows += tiff(args)
    if args.what in ("rss", "all"):
        rows += rss(args)
    if args.what in ("dask", "all"):
        rows += dask_scaling(args)
    if args.what in ("faults", "all"):
        rows += faults(args)
    if args.what in ("faults", "shared", "all"):
        rows += shared(args)
    if args.what in ("mask", "all"):
        rows += mask(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": _machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
