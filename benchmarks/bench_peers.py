"""nofc against what a pathologist would run instead: TIAToolbox and MONAI, side by side.

The same generated slide (a tiled pyramidal TIFF, 0.25 micron pixels, a disc of
tissue-like pixels on glass: ``bench_tiling._glass_slide``), the same model weights and the
same windows (top-left corners on a grid of the stride, from pixel 0), each tool in a
process of its own so that the peak RSS is that tool's:

* ``tiatoolbox``: ``PatchPredictor`` in WSI mode with an ``IOPatchPredictorConfig`` at
  level 0 (patch = the model's window, ``stride_shape`` = the stride), its own tissue mask
  on (``mask``) or off, batch 8 and no loader workers (its defaults);
* ``monai``: ``PatchInferer`` over a ``WSISlidingWindowSplitter`` (OpenSlide backend, no
  padding), batch 8, with a ``Merger`` that keeps each window's class vector (MONAI's
  ``AvgMerger`` averages overlapping windows into one cell, so a classifier's per-window
  values at a stride below its patch need this 10-line merger);
* ``nofc``: ``nofc.convert`` of the very module object, then ``nofc.tiled_predict`` over
  the slide (whole; ``mask="auto"``; and at a finer ``step`` with ``method="dilate"``).

Models (``--models``): ``resnet18`` and ``densenet121`` are TIAToolbox's own
``CNNModel(name, num_classes=2)`` (random init, no weights fetched) with the linear head
fitted on its frozen features to tell tissue from glass; ``tissue`` is a padding-free
two-class net (window 64, stride 8) trained for ``--train-seconds`` on patches of the
slide. All take the slide's 0..255 values as they are (TIAToolbox feeds them unscaled),
so nofc runs with ``scale=1``.

Printed: one table (tool, model, slide, stride, windows, seconds, windows/s, peak RSS,
ratio = the peer's seconds per window / nofc's at the same model, slide and stride), the
agreement of every peer with nofc's map on the windows both computed (class equal, max
probability difference, interior and border windows apart), and the issue's target (nofc
at least 15x faster per window at 8192^2 for resnet18 and densenet121), met or not by what
was measured. A configuration that is skipped or times out says so; a number not measured
in this run is never printed as one (an estimate from a measured rate is marked ``~``).

The peers are not nofc dependencies: they live in their own virtual environment,
``.venv-peers`` in the repository root, made by ``--setup`` (run automatically when it is
missing); the script re-runs itself there.

    python benchmarks/bench_peers.py --setup           # make .venv-peers (once, ~10 min)
    python benchmarks/bench_peers.py                   # the default plan (~30 min, 2 cores)
    python benchmarks/bench_peers.py --sizes 2048 --models tissue resnet18 --tools nofc tiatoolbox
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-peers"
VPY = VENV / "bin" / "python"
PEERS = ("tiatoolbox==2.1.3", "monai==1.6.1")
TORCH = ("torch==2.14.1", "torchvision==0.29.1")
TOOLS = ("nofc", "tiatoolbox", "monai")
MODELS = ("tissue", "resnet18", "densenet121")
WINDOW = {"tissue": 64, "resnet18": 224, "densenet121": 224}
NET_STRIDE = {"tissue": 8, "resnet18": 32, "densenet121": 32}
TARGET = 15.0


# ---------------------------------------------------------------- setup (stdlib only)

def setup() -> None:
    """Make .venv-peers: torch pinned as nofc's, the peers without their torch pins.

    TIAToolbox 2.1.3 declares ``torch<2.13``; installed with its dependencies it would
    replace nofc's torch 2.14.1. So it is installed ``--no-deps`` and its other
    requirements (read from its own metadata) are installed next to the pinned torch.
    """
    if not VPY.exists():
        subprocess.run(["python3.11", "-m", "venv", str(VENV)], check=True)
    pip = [str(VPY), "-m", "pip", "install", "-q"]
    subprocess.run(pip + list(TORCH), check=True)
    subprocess.run(pip + ["--no-deps", PEERS[0]], check=True)
    reqs = subprocess.run(
        [str(VPY), "-c", "import importlib.metadata as m, json; "
         "print(json.dumps(m.requires('tiatoolbox')))"],
        check=True, capture_output=True, text=True).stdout
    keep = [r for r in json.loads(reqs) if "extra ==" not in r
            and not r.split("<")[0].split(">")[0].split("=")[0].strip().lower().startswith(
                ("torch", "torchvision"))]
    subprocess.run(pip + keep + list(TORCH) + [PEERS[1]], check=True)
    subprocess.run(pip + ["-e", f"{ROOT}[scale,slides]"], check=True)
    subprocess.run([str(VPY), "-c", "import torch, tiatoolbox, monai, nofc; "
                    "print('torch', torch.__version__, 'tiatoolbox', tiatoolbox.__version__,"
                    " 'monai', monai.__version__)"], check=True)


# ---------------------------------------------------------------- table (stdlib only)

def _fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def table(rows: list[dict]) -> str:
    """The speed table as Markdown: one line per run, skipped or timed-out runs included.

    >>> print(table([{"tool": "nofc", "model": "tissue", "size": 2048, "stride": 8,
    ...               "windows": 10, "seconds": 2.0, "rss_mb": 900.0, "ratio": 1.0}]))
    | tool | model | slide | stride | windows | seconds | windows/s | peak RSS | ratio | note |
    | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |
    | nofc | tissue | 2048² | 8 | 10 | 2.00 | 5.0 | 900 MB | 1.0x |  |
    """
    head = ("| tool | model | slide | stride | windows | seconds | windows/s | peak RSS | ratio"
            " | note |\n| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    lines = [head]
    for r in rows:
        secs, n = r.get("seconds"), r.get("windows")
        rate = n / secs if secs and n else None
        tool = r["tool"] + (" mask" if r.get("mask") else "")
        if r.get("step"):
            tool += f" {r.get('method', 'dilate')}"
        lines.append(
            f"| {tool} | {r['model']} | {r['size']}² | {r['stride']} | {_fmt(n)} | "
            f"{_fmt(secs)} | {_fmt(rate, 1)} | "
            f"{_fmt(r.get('rss_mb'), 0)}{'' if r.get('rss_mb') is None else ' MB'} | "
            f"{_fmt(r.get('ratio'), 1)}{'' if r.get('ratio') is None else 'x'} | "
            f"{r.get('note', '')} |")
    return "\n".join(lines)


def agreement_table(rows: list[dict]) -> str:
    """Agreement of each peer with nofc's map, interior and border windows apart.

    >>> print(agreement_table([{"tool": "monai", "model": "tissue", "size": 2048,
    ...     "stride": 32, "interior": [100, 1.0, 0.0], "border": [20, 0.95, 0.5]}]))
    ... # doctest: +ELLIPSIS
    | peer | model | slide | stride | interior windows | same class | max prob diff | ...
    | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
    | monai | tissue | 2048² | 32 | 100 | 100.00% | 0 | 20 | 95.00% | 0.5 |
    """
    head = ("| peer | model | slide | stride | interior windows | same class | max prob diff | "
            "border windows | same class | max prob diff |\n"
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    lines = [head]
    for r in rows:
        cells = []
        for part in ("interior", "border"):
            n, same, diff = r[part]
            cells += [str(n), "-" if n == 0 else f"{100 * same:.2f}%",
                      "-" if n == 0 else f"{diff:.3g}"]
        tool = r["tool"] + (" mask" if r.get("mask") else "")
        lines.append(f"| {tool} | {r['model']} | {r['size']}² | {r['stride']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- models (child side)

def _tissue_net():
    """Padding-free two-class net: window 64, stride 8, probabilities out."""
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(3, 16, 5), nn.ReLU(), nn.MaxPool2d(2),      # 64 -> 60 -> 30
        nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),     # 30 -> 28 -> 14
        nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),     # 14 -> 12 -> 6
        nn.Flatten(), nn.Linear(32 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 2),
        nn.Softmax(dim=1))


def _model(name: str, weights: str | None = None):
    """The model object: TIAToolbox's CNNModel for torchvision backbones, else the tissue
    net. Weights from ``weights`` (a state dict saved by ``_prepare``)."""
    import torch

    torch.manual_seed(0)
    if name == "tissue":
        net = _tissue_net()
    else:
        from tiatoolbox.models.architecture.vanilla import CNNModel

        net = CNNModel(name, num_classes=2)
    if weights:
        net.load_state_dict(torch.load(weights))
    return net.eval()


def _for_tiatoolbox(net):
    """TIAToolbox's engines want a ModelABC (infer_batch, pre/postproc): CNNModel is one;
    the tissue net gets the same thin wrapper CNNModel has."""
    from tiatoolbox.models.architecture.vanilla import CNNModel, _infer_batch
    from tiatoolbox.models.models_abc import ModelABC

    if isinstance(net, ModelABC):
        return net

    class Wrapped(ModelABC):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, imgs):
            return self.inner(imgs)

        postproc = staticmethod(CNNModel.postproc)

        @staticmethod
        def infer_batch(model, batch_data, device="cpu"):
            return _infer_batch(model, batch_data, device)

    return Wrapped(net).eval()


def _disc(side: int, tissue: float = 0.3):
    """The tissue disc of ``_glass_slide``: centre and radius."""
    return side / 2, side * np.sqrt(tissue / np.pi)


def _patches(img, n, window, rng):
    """n windows of the slide, half with their centre on tissue; labels 1 = tissue."""
    side = img.shape[0]
    c, r = _disc(side)
    xs, ys = [], []
    need = {0: n - n // 2, 1: n // 2}     # balance the classes
    while need[0] or need[1]:
        y, x = rng.integers(0, side - window + 1, 2)
        label = int((y + window / 2 - c) ** 2 + (x + window / 2 - c) ** 2 < r * r)
        if need[label]:
            need[label] -= 1
            xs.append(img[y:y + window, x:x + window])
            ys.append(label)
    x = np.stack(xs).transpose(0, 3, 1, 2).astype(np.float32)   # (N, 3, w, w), 0..255
    return x, np.array(ys)


def _prepare(spec: dict) -> dict:
    """Train the tissue net; fit the CNNModels' heads on frozen features; save weights."""
    import tifffile
    import torch

    torch.set_num_threads(spec["threads"])
    img = tifffile.imread(spec["slide"], level=0)
    rng = np.random.default_rng(1)
    info = {}
    for name in spec["models"]:
        t = time.perf_counter()
        net = _model(name)
        if name == "tissue":
            first = net[0]      # trained on x / 255; the scale is folded into conv 1 after
            opt = torch.optim.Adam(net.parameters(), 1e-3)
            steps = 0
            net.train()
            while time.perf_counter() - t < spec["train_seconds"]:
                x, y = _patches(img, 64, 64, rng)
                p = net(torch.from_numpy(x) / 255)
                loss = torch.nn.functional.nll_loss(torch.log(p + 1e-8), torch.from_numpy(y))
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
            net.eval()
            with torch.no_grad():
                first.weight.div_(255)
                x, y = _patches(img, 512, 64, rng)
                acc = float((net(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
            info[name] = (f"trained {steps} steps of 64 patches in "
                          f"{time.perf_counter() - t:.0f} s, held-out accuracy {acc:.3f}")
        else:
            from sklearn.linear_model import LogisticRegression

            x, y = _patches(img, 128, 224, rng)
            with torch.no_grad():
                f = torch.cat([net.pool(net.feat_extract(torch.from_numpy(x[i:i + 16])))
                               .flatten(1) for i in range(0, len(x), 16)]).double().numpy()
            mu, sd = f.mean(0), f.std(0) + 1e-6
            lr = LogisticRegression(C=0.05, max_iter=2000).fit((f - mu) / sd, y)
            w = lr.coef_[0] / sd    # two classes: logits (0, w.f + b), the same softmax
            b = lr.intercept_[0] - (lr.coef_[0] * mu / sd).sum()
            with torch.no_grad():
                net.classifier.weight.copy_(torch.from_numpy(np.stack([0 * w, w])))
                net.classifier.bias.copy_(torch.tensor([0.0, b]))
            xt, yt = _patches(img, 32, 224, rng)
            with torch.no_grad():
                acc = float((net(torch.from_numpy(xt)).argmax(1).numpy() == yt).mean())
            info[name] = (f"head fitted on frozen features of 128 patches in "
                          f"{time.perf_counter() - t:.0f} s, held-out accuracy {acc:.3f}")
        torch.save(net.state_dict(), Path(spec["dir"]) / f"{name}.pt")
    return info


# ---------------------------------------------------------------- one run (child side)

def _run_nofc(spec, net):
    import nofc

    window = WINDOW[spec["model"]]
    t = time.perf_counter()
    fcn = nofc.convert(net, input_size=(3, window, window))
    convert_s = time.perf_counter() - t
    stats: dict = {}
    kw = dict(normalize=nofc.Normalize(scale=1.0), progress=False, stats=stats, tile=spec["tile"])
    if spec.get("mask"):
        kw["mask"] = "auto"
    if spec.get("step"):
        kw.update(step=spec["step"], method=spec.get("method", "dilate"))
    t = time.perf_counter()
    m = nofc.tiled_predict(fcn, spec["slide"], (3, window, window), **kw)
    secs = time.perf_counter() - t
    step = spec.get("step") or NET_STRIDE[spec["model"]]
    given = int(np.isfinite(m[0]).sum())
    np.savez(spec["out"], map=m, step=step)
    note = f"convert {convert_s:.1f} s"
    if spec.get("mask"):
        note += f"; {stats.get('computed')} of {stats.get('windows')} windows computed"
    return dict(seconds=secs, windows=given, note=note, map_step=step)


def _run_tiatoolbox(spec, net):
    import shutil

    import zarr
    from tiatoolbox.models import IOPatchPredictorConfig, PatchPredictor

    window, stride = WINDOW[spec["model"]], spec["stride"]
    io = IOPatchPredictorConfig(input_resolutions=[{"units": "baseline", "resolution": 1.0}],
                                patch_input_shape=(window, window),
                                stride_shape=(stride, stride))
    save = Path(spec["out"]).with_suffix(".tia")
    shutil.rmtree(save, ignore_errors=True)
    engine = PatchPredictor(model=_for_tiatoolbox(net), batch_size=spec["batch"],
                            verbose=False)
    t = time.perf_counter()
    out = engine.run([spec["slide"]], patch_mode=False, ioconfig=io, save_dir=save,
                     return_probabilities=True, auto_get_mask=bool(spec.get("mask")),
                     device="cpu", output_type="zarr")
    secs = time.perf_counter() - t
    z = zarr.open(str(next(iter(out.values()))), mode="r")
    xy = np.asarray(z["coordinates"])[:, :2]        # (x0, y0) of each patch
    probs = np.asarray(z["probabilities"])
    np.savez(spec["out"], y0=xy[:, 1], x0=xy[:, 0], probs=probs)
    side = spec["size"]
    past = int(((xy + window) > side).any(1).sum())
    note = f"{past} padded past the border" if past else ""
    return dict(seconds=secs, windows=len(xy), note=note)


def _run_monai(spec, net):
    import torch
    from monai.inferers import PatchInferer, WSISlidingWindowSplitter
    from monai.inferers.merger import Merger

    window, stride = WINDOW[spec["model"]], spec["stride"]
    if window % stride:
        raise SystemExit(f"monai route: the stride {stride} must divide the patch {window}")
    cells = window // stride

    class WindowMerger(Merger):
        """Keeps each window's class vector at its grid cell (AvgMerger would average the
        windows that overlap a cell)."""

        def __init__(self, merged_shape, cropped_shape=None, device=None):
            super().__init__(merged_shape=merged_shape, cropped_shape=cropped_shape,
                             device=device)
            self.values = np.full(tuple(merged_shape[1:]), np.nan, np.float32)

        def aggregate(self, values, location):
            self.values[:, location[0], location[1]] = values[0, :, 0, 0].numpy()

        def finalize(self):
            return self.values

    count = [0]

    def network(x):   # (B, K) -> (B, K, cells, cells): output cell = input location / stride
        count[0] += len(x)
        return net(x)[:, :, None, None].expand(-1, -1, cells, cells)

    splitter = WSISlidingWindowSplitter(patch_size=window, overlap=window - stride,
                                        pad_mode=None, reader="OpenSlide")
    inferer = PatchInferer(splitter=splitter, merger_cls=WindowMerger,
                           batch_size=spec["batch"], preprocessing=lambda p: p.float())
    t = time.perf_counter()
    with torch.inference_mode():
        m = inferer(spec["slide"], network)
    secs = time.perf_counter() - t
    np.savez(spec["out"], map=m, step=stride)
    return dict(seconds=secs, windows=count[0], note="", map_step=stride)


def _run(spec: dict) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_tiling import peak_rss_mb as _peak_rss_mb

    torch.set_num_threads(spec["threads"])
    net = _model(spec["model"], spec["weights"])
    rss0 = _peak_rss_mb()
    res = {"nofc": _run_nofc, "tiatoolbox": _run_tiatoolbox, "monai": _run_monai}[
        spec["tool"]](spec, net)
    res["rss_mb"] = _peak_rss_mb()
    res["rss_before_mb"] = rss0    # imports and the model, before the run
    return res


# ---------------------------------------------------------------- parent

def _load() -> str:
    return f"load average {os.getloadavg()[0]:.1f}"


def _child(mode: str, spec: dict, timeout: float | None):
    """Run one spec in a fresh process; its JSON result, or an error line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"failed: {tail[:160]}"
    return json.loads(res.stdout.strip().splitlines()[-1]), ""


def _plan(args) -> list[dict]:
    """The runs, in order, nofc first for each model and slide (the reference). The peers
    run only on slides up to ``--peer-max``, and at a stride below the window only up to
    ``--dense-max`` (per model; longer runs are listed as skipped); TIAToolbox's tissue
    mask at the window stride, nofc's on slides larger than one tile, both only for
    ``--mask-models``; the tissue net only on slides up to ``--tissue-max``."""
    runs = []
    for size in args.sizes:
        for model in args.models:
            if model == "tissue" and size > args.tissue_max:
                continue
            net_stride, window = NET_STRIDE[model], WINDOW[model]
            strides = args.strides or sorted({32, window})
            masked = model in args.mask_models
            for tool in args.tools:
                if tool == "nofc":
                    runs.append(dict(tool=tool, model=model, size=size, stride=net_stride))
                    if masked and size > (args.tile or 2048):
                        runs.append(dict(tool=tool, model=model, size=size, stride=net_stride,
                                         mask=True))
                    if model != "tissue" and size <= args.fine_max:
                        runs.append(dict(tool=tool, model=model, size=size, stride=16,
                                         step=16, method=args.method))
                    continue
                for stride in strides:
                    skip = size > args.peer_max.get(model, size) or (
                        stride < window and size > args.dense_max.get(model, size))
                    runs.append(dict(tool=tool, model=model, size=size, stride=stride,
                                     skip=skip))
                    if tool == "tiatoolbox" and masked and stride == window:
                        runs.append(dict(tool=tool, model=model, size=size, stride=stride,
                                         mask=True, skip=skip))
    return runs


def _windows(size, window, stride):
    return ((size - window) // stride + 1) ** 2


def _agreement(ref_path, peer_path, window, size) -> dict:
    """Compare a peer's windows with nofc's map cells at the same top-left corners."""
    ref = np.load(ref_path)
    m, step = ref["map"], int(ref["step"])
    peer = np.load(peer_path)
    if "map" in peer:   # a grid: cell (i, j) = window at (i * s, j * s)
        pm, ps = peer["map"], int(peer["step"])
        ii, jj = np.nonzero(np.isfinite(pm[0]))
        y0, x0, probs = ii * ps, jj * ps, pm[:, ii, jj].T
    else:
        y0, x0, probs = peer["y0"], peer["x0"], peer["probs"]
    inside = (y0 + window <= size) & (x0 + window <= size) & (y0 % step == 0) & (x0 % step == 0)
    y0, x0, probs = y0[inside], x0[inside], probs[inside]
    i, j = y0 // step, x0 // step
    ours = m[:, i, j].T                                  # (N, K)
    h, w = m.shape[1:]
    border = (i == 0) | (j == 0) | (i == h - 1) | (j == w - 1)
    out = {}
    for part, sel in (("interior", ~border), ("border", border)):
        if not sel.any():
            out[part] = [0, 0.0, 0.0]
            continue
        same = float((ours[sel].argmax(1) == probs[sel].argmax(1)).mean())
        out[part] = [int(sel.sum()), same, float(np.abs(ours[sel] - probs[sel]).max())]
    return out


def _peer_rate(rows, tool, model, size):
    """A peer's best measured windows/s for a model, on this slide if it ran there, else on
    the largest slide it ran on: (rate, slide side), or None. A patch-by-patch tool pays
    the same per window at any stride (every window is a whole forward pass)."""
    got = [r for r in rows if r["tool"] == tool and r["model"] == model and r.get("seconds")
           and not r.get("mask")]
    here = [r for r in got if r["size"] == size]
    got = here or [r for r in got if r["size"] == max(q["size"] for q in got)]
    if not got:
        return None
    return max(r["windows"] / r["seconds"] for r in got), got[0]["size"]


def _verdict(rows) -> list[str]:
    """The issue's target at the largest slide: per window, nofc >= 15x the peer."""
    lines = []
    size = max(r["size"] for r in rows)
    for model in ("resnet18", "densenet121"):
        ours = [r for r in rows if r["tool"] == "nofc" and r["model"] == model
                and r["size"] == size and not r.get("mask") and not r.get("step")
                and r.get("seconds")]
        if not ours:
            continue
        our_rate = ours[0]["windows"] / ours[0]["seconds"]
        for tool in ("tiatoolbox", "monai"):
            rate = _peer_rate(rows, tool, model, size)
            if rate is None:
                lines.append(f"target {model} vs {tool} at {size}²: not measured")
                continue
            n = _windows(size, WINDOW[model], NET_STRIDE[model])
            x = our_rate / rate[0]
            lines.append(
                f"target {model} vs {tool} at {size}², stride {NET_STRIDE[model]} "
                f"({n} windows): nofc {ours[0]['seconds']:.0f} s; {tool} at the "
                f"{rate[0]:.1f} windows/s it reached on the {rate[1]}² slide would take "
                f"~{n / rate[0]:.0f} s (estimate); per window nofc is {x:.1f}x faster: "
                f"target {TARGET:.0f}x {'met' if x >= TARGET else 'NOT met'}")
    return lines


def run_plan(args) -> int:
    runs = _plan(args)
    tmp = Path(tempfile.mkdtemp(prefix="bench_peers_", dir=args.tmp))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_tiling import _glass_slide, _machine

    print(f"{_machine()}, {_load()}", flush=True)

    slides = {}
    for size in args.sizes:
        slides[size] = tmp / f"slide_{size}.tif"
        t = time.perf_counter()
        _glass_slide(slides[size], size)
        print(f"slide {size}x{size}: {slides[size].stat().st_size / 2**20:.0f} MB, made in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
    spec = dict(dir=str(tmp), slide=str(slides[min(args.sizes)]), models=args.models,
                train_seconds=args.train_seconds, threads=args.threads)
    info, err = _child("prepare", spec, None)
    if info is None:
        raise SystemExit(f"preparing the models {err}")
    for name, what in info.items():
        print(f"model {name}: {what}", flush=True)
    rows, outs = [], {}
    for k, run in enumerate(runs):
        row = dict(run)
        if run.get("skip"):
            n = _windows(run["size"], WINDOW[run["model"]], run["stride"])
            row["note"] = f"skipped: {n} windows, too long for this plan"
            rows.append(row)
            print(f"{run['tool']} {run['model']} {run['size']}² stride {run['stride']}: "
                  f"{row['note']}", flush=True)
            continue
        out = tmp / f"out_{k}.npz"
        spec = dict(run, slide=str(slides[run["size"]]), out=str(out), threads=args.threads,
                    weights=str(tmp / f"{run['model']}.pt"), tile=args.tile, batch=args.batch)
        print(f"{run['tool']}{' mask' if run.get('mask') else ''} {run['model']} "
              f"{run['size']}² stride {run['stride']} ({_load()}) ...",
              end=" ", flush=True)
        res, err = _child("run", spec, args.timeout)
        if res is None:
            row["note"] = err
            print(err, flush=True)
        else:
            row.update(res)
            outs[k] = out
            print(f"{res['seconds']:.1f} s, {res['windows']} windows, peak RSS "
                  f"{res['rss_mb']:.0f} MB {res['note']}", flush=True)
        row["_k"] = k
        rows.append(row)
    # ratios and agreement against nofc's whole map of the same model and slide
    agree = []
    for r in rows:
        ref = [q for q in rows if q["tool"] == "nofc" and q["model"] == r["model"]
               and q["size"] == r["size"] and not q.get("mask") and not q.get("step")
               and q.get("seconds")]
        if not ref or not r.get("seconds"):
            continue
        ref = ref[0]
        if r["tool"] != "nofc" or r is ref:
            r["ratio"] = (ref["windows"] / ref["seconds"]) / (r["windows"] / r["seconds"])
        if r["tool"] != "nofc":
            a = _agreement(outs[ref["_k"]], outs[r["_k"]], WINDOW[r["model"]], r["size"])
            agree.append(dict(r, **a))
    for r in rows:
        rate = _peer_rate(rows, r["tool"], r["model"], r["size"]) if r.get("skip") else None
        if rate:
            n = _windows(r["size"], WINDOW[r["model"]], r["stride"])
            r["note"] += (f"; ~{n / rate[0]:.0f} s at the {rate[0]:.1f} windows/s measured "
                          f"on the {rate[1]}² slide (estimate)")
    print("\n" + table(rows))
    print("\nratio: the peer's seconds per window / nofc's (nofc's whole map at the model's "
          "stride, same model and slide); > 1: nofc is faster per window. windows: those "
          "with a value (in-image or padded; nofc mask: cells with tissue)")
    if agree:
        print("\nagreement with nofc's map on the windows both computed:\n")
        print(agreement_table(agree))
    print()
    for line in _verdict(rows):
        print(line)
    print(f"\n{_machine()}, {_load()}; each run in its own process")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": f"{_machine()}, {_load()}", "models": info, "rows": rows,
             "agreement": agree}, indent=1))
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", action="store_true", help="make .venv-peers and stop")
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    p.add_argument("--strides", type=int, nargs="+", default=None,
                   help="peer strides (default: 32 and the model's window)")
    p.add_argument("--dense-max", type=json.loads,
                   default={"tissue": 2048, "resnet18": 2048, "densenet121": 0},
                   help="largest slide side per model on which the peers run at a stride "
                        "below the window (JSON; default %(default)s)")
    p.add_argument("--peer-max", type=json.loads, default={},
                   help="largest slide side per model on which the peers run at all "
                        "(JSON; default %(default)s)")
    p.add_argument("--mask-models", nargs="*", choices=MODELS, default=["resnet18"],
                   help="models run with the tissue masks too (nofc, TIAToolbox)")
    p.add_argument("--tissue-max", type=int, default=2048,
                   help="largest slide for the tissue net")
    p.add_argument("--fine-max", type=int, default=2048,
                   help="largest slide for nofc's step-16 run")
    p.add_argument("--method", default="dilate", choices=["dilate", "auto"])
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--train-seconds", type=float, default=60)
    p.add_argument("--tile", type=int, default=None,
                   help="nofc's tile (default: tiled_predict's own, 2048 or more for a "
                        "network whose receptive field reaches far past its window)")
    p.add_argument("--batch", type=int, default=8, help="the peers' batch (their default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tmp", default=None)
    p.add_argument("--keep", action="store_true", help="keep the slides and outputs")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        mode, spec = args.child[0], json.loads(args.child[1])
        res = _prepare(spec) if mode == "prepare" else _run(spec)
        print(json.dumps(res))
        return 0
    if args.setup or not VPY.exists():
        print(f"making {VENV} (torch pinned, TIAToolbox, MONAI, nofc)", flush=True)
        setup()
        if args.setup:
            return 0
    if Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(str(VPY), [str(VPY), str(Path(__file__).resolve())]
                 + list(sys.argv[1:] if argv is None else argv))
    return run_plan(args)


if __name__ == "__main__":
    raise SystemExit(main())
