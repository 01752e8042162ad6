"""Dense prediction against crop-by-crop, measured side by side in one run.

For each case: the time of ``nofc.sliding_window_predict`` (the original classifier on
every crop, batched) and of ``nofc.dense_predict`` (the converted network, one pass per
shift), the speedup, and the bound it is compared with: naive FLOPs / dense FLOPs, both
counted with ``torch.utils.flop_counter.FlopCounterMode`` on meta tensors. ``of bound`` is
speedup / bound (1.0: dense is exactly as fast per FLOP as the naive run).

    python benchmarks/bench_dense.py             # all cases (a few minutes on 2 cores)
    python benchmarks/bench_dense.py --quick     # small cases only
    python benchmarks/bench_dense.py --only vgg16
    python benchmarks/bench_dense.py --fine      # steps below the stride: dilated vs
                                                 # shift-and-stitch vs naive
    python benchmarks/bench_dense.py --large     # large images: stage by stage in chunks
                                                 # (nofc.streaming) vs one whole pass

With ``--large``, each row times one whole pass of the converted network (``fcn(x)``), the
stage-by-stage pass ``dense_predict`` takes above ``nofc.streaming.STREAM_PIXELS`` and the
original classifier on batches of 8 crops (a few batches, per window), and prints the
windows per second of each, with the streamed pass's largest difference from the whole one.

With ``--fine``, ``of bound`` = (naive time / dilated time) / (naive FLOPs / dilated FLOPs).
Where a full run would take minutes, the naive time is measured on ``--batches`` batches of
crops and the shift-and-stitch time on 4 of its passes, each scaled to the whole (the row
says so).

Times are the best of ``--repeat`` runs (the naive run of the big models once: it is
the long one). Random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import platform
import subprocess
import sys
import timeit
from pathlib import Path

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import nofc

ROOT = Path(__file__).resolve().parents[1]


def _flops(module: torch.nn.Module, shape) -> int:
    """FLOPs of one forward pass on an input of ``shape``, counted without computing."""
    meta = copy.deepcopy(module).to("meta").eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(torch.empty(shape, device="meta"))
    return counter.get_total_flops()


def _dense_flops(fcn, size, image_shape, step, geo) -> int:
    """FLOPs of dense_predict: one pass per shift of the image (shift-and-stitch)."""
    B, C, H, W = image_shape
    ty, tx = step
    fy, fx = geo.factors(step)  # shifted passes per axis
    total = 0
    for a in range(fy):
        for b in range(fx):
            if min(geo.output_shape((H - a * ty, W - b * tx))) > 0:
                total += _flops(fcn, (B, C, H - a * ty, W - b * tx))
    return total


def _best(fn, repeat: int) -> float:
    return min(timeit.repeat(fn, number=1, repeat=repeat))


def _digits_net():
    spec = importlib.util.spec_from_file_location("digits_demo",
                                                  ROOT / "examples" / "digits_demo.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["digits_demo"] = mod
    spec.loader.exec_module(mod)
    return mod


def _cases(quick: bool):
    """(name, model factory, input size, image (H, W), step divisors, batch size, heavy);
    finer steps are ``--fine``'s."""
    demo = _digits_net()
    cases = [
        ("digits net, page", lambda: demo.make_net(), demo.INPUT_SIZE, (256, 420), [1], 512,
         False),
        ("lenet5", lambda: nofc.zoo.LeNet5(), (1, 32, 32), (256, 256), [1], 512, False),
    ]
    if not quick:
        cases += [
            ("vgg16", lambda: torchvision.models.vgg16(), (3, 224, 224), (448, 448), [1],
             8, True),
            ("resnet50", lambda: torchvision.models.resnet50(), (3, 224, 224), (448, 448),
             [1], 8, True),
        ]
    return cases


def _setup(make, size, hw):
    """The seeded model, its conversion, its geometry and a random image of ``hw``."""
    torch.manual_seed(0)
    model = make().eval()
    fcn = nofc.convert(model, size)
    return model, fcn, nofc.geometry(fcn, size), torch.randn(1, size[0], *hw)


def run(quick: bool = False, only: str | None = None, repeat: int = 3) -> list[dict]:
    rows = []
    for name, make, size, hw, divisors, bs, heavy in _cases(quick):
        if only and only not in name:
            continue
        model, fcn, geo, image = _setup(make, size, hw)
        for d in divisors:
            step = (geo.stride[0] // d, geo.stride[1] // d)
            dense = nofc.dense_predict(fcn, image, size, step)  # warm-up, and the shape
            naive_cells = ((hw[0] - size[1]) // step[0] + 1) * ((hw[1] - size[2]) // step[1] + 1)
            t_dense = _best(lambda: nofc.dense_predict(fcn, image, size, step), repeat)
            t_naive = _best(lambda: nofc.sliding_window_predict(model, image, size, step,
                                                                batch_size=bs),
                            1 if heavy else repeat)
            f_naive = naive_cells * _flops(model, (1, *size))
            f_dense = _dense_flops(fcn, size, tuple(image.shape), step, geo)
            speedup, bound = t_naive / t_dense, f_naive / f_dense
            rows.append({
                "case": name, "image": f"{hw[0]}x{hw[1]}", "window": f"{size[1]}x{size[2]}",
                "step": step[0], "cells": naive_cells, "map": tuple(dense.shape[2:]),
                "naive_s": t_naive, "dense_s": t_dense, "speedup": speedup, "bound": bound,
                "of_bound": speedup / bound,
            })
            _print_row(rows[-1])
    return rows


_HEAD = (f"{'case':<26}{'image':>9}{'step':>5}{'windows':>8}{'naive s':>9}{'dense s':>9}"
         f"{'speedup':>9}{'bound':>8}{'of bound':>9}")


def _print_row(r: dict) -> None:
    if not getattr(_print_row, "started", False):
        print(_HEAD)
        _print_row.started = True
    print(f"{r['case']:<26}{r['image']:>9}{r['step']:>5}{r['cells']:>8}{r['naive_s']:>9.3f}"
          f"{r['dense_s']:>9.3f}{r['speedup']:>8.1f}x{r['bound']:>7.1f}x{r['of_bound']:>9.2f}",
          flush=True)


_FINE = [  # (name, model factory, input size, image (H, W), steps, naive batch)
    ("vgg16", lambda: torchvision.models.vgg16(), (3, 224, 224), (288, 288), [16, 8, 4], 8),
    ("vgg16", lambda: torchvision.models.vgg16(), (3, 224, 224), (512, 512), [16, 8, 4], 8),
    ("resnet50", lambda: torchvision.models.resnet50(), (3, 224, 224), (448, 448), [16, 8], 8),
    ("digits net, page", lambda: _digits_net().make_net(), (1, 24, 24), (256, 420), [2, 1],
     512),
    ("lenet5", lambda: nofc.zoo.LeNet5(), (1, 32, 32), (256, 256), [1], 512),
]


def _naive_time(model, image, size, step, bs, batches: int) -> tuple[float, bool]:
    """Crop-by-crop time: all crops, or ``batches`` batches of them scaled to all (then
    True)."""
    H, W = image.shape[-2:]
    sample = batches * bs
    cells = ((H - size[1]) // step + 1) * ((W - size[2]) // step + 1)
    if cells <= sample:
        return _best(lambda: nofc.sliding_window_predict(model, image, size, step,
                                                         batch_size=bs), 1), False
    crops = torch.randn(sample, *size)
    with torch.no_grad():
        t = _best(lambda: [model(crops[i:i + bs]) for i in range(0, sample, bs)], 1)
    return t * cells / sample, True


def _shift_time(fcn, image, size, step, geo, repeat: int) -> tuple[float, bool]:
    """Shift-and-stitch time: all passes, or 4 of them scaled to all (then True)."""
    fy, fx = geo.factors(step)
    if fy * fx <= 16:
        return _best(lambda: nofc.dense_predict(fcn, image, size, step, method="shift"),
                     repeat), False
    shifts = [(a * step[0], b * step[1]) for a in range(fy) for b in range(fx)]
    picked = shifts[:: len(shifts) // 4][:4]
    with torch.no_grad():
        t = _best(lambda: [fcn(image[..., dy:, dx:]) for dy, dx in picked], 1)
    return t * len(shifts) / len(picked), True


def run_fine(only: str | None = None, repeat: int = 3, batches: int = 8) -> list[dict]:
    """The dilated pass next to shift-and-stitch and crop by crop, steps below the stride."""
    rows = []
    print(f"{'case':<18}{'image':>9}{'step':>5}{'GFLOP naive':>12}{'shift':>8}{'dilated':>8}"
          f"{'naive s':>9}{'shift s':>9}{'dilated s':>10}{'vs shift':>9}{'of bound':>9}")
    for name, make, size, hw, steps, bs in _FINE:
        if only and only not in name:
            continue
        model, fcn, geo, image = _setup(make, size, hw)
        for s in steps:
            step = (s, s)
            net = nofc.dilate(fcn, size, step)
            nofc.dense_predict(fcn, image, size, step, method="dilate")  # warm-up
            t_dil = _best(lambda: nofc.dense_predict(fcn, image, size, step, method="dilate"),
                          repeat)
            t_shift, shift_scaled = _shift_time(fcn, image, size, step, geo, repeat)
            t_naive, naive_scaled = _naive_time(model, image, size, s, bs, batches)
            cells = ((hw[0] - size[1]) // s + 1) * ((hw[1] - size[2]) // s + 1)
            f_naive = cells * _flops(model, (1, *size))
            f_shift = _dense_flops(fcn, size, tuple(image.shape), step, geo)
            f_dil = _flops(net, tuple(image.shape))
            r = {"case": name, "image": f"{hw[0]}x{hw[1]}", "step": s, "cells": cells,
                 "gflop_naive": f_naive / 1e9, "gflop_shift": f_shift / 1e9,
                 "gflop_dilated": f_dil / 1e9, "naive_s": t_naive, "shift_s": t_shift,
                 "dilated_s": t_dil, "vs_shift": t_shift / t_dil,
                 "of_bound": (t_naive / t_dil) / (f_naive / f_dil),
                 "scaled": ("naive " if naive_scaled else "") + ("shift" if shift_scaled
                                                                 else "")}
            rows.append(r)
            print(f"{name:<18}{r['image']:>9}{s:>5}{r['gflop_naive']:>12.1f}"
                  f"{r['gflop_shift']:>8.1f}{r['gflop_dilated']:>8.1f}{t_naive:>9.3f}"
                  f"{t_shift:>9.3f}{t_dil:>10.3f}{r['vs_shift']:>8.1f}x{r['of_bound']:>9.2f}"
                  f"  {('scaled: ' + r['scaled']) if r['scaled'] else ''}", flush=True)
    return rows


_LARGE = [("resnet18", 2048), ("densenet121", 2048), ("vgg16", 2048), ("resnet50", 2048),
          ("densenet121", 4096)]


def run_large(only: str | None = None, repeat: int = 2) -> list[dict]:
    """One whole pass, the streamed pass and batched crops, on large images."""
    from nofc import streaming

    rows = []
    print(f"{'case':<14}{'image':>11}{'windows':>9}{'whole s':>9}{'streamed s':>11}"
          f"{'speedup':>9}{'crops/s':>9}{'streamed windows/s':>20}{'vs crops':>10}"
          f"{'max rel diff':>14}")
    for name, side in _LARGE:
        if only and only not in name:
            continue
        model, fcn, geo, image = _setup(getattr(torchvision.models, name), (3, 224, 224),
                                        (side, side))
        fcn.eval()
        with torch.no_grad():
            whole = fcn(image)
            t_whole = _best(lambda: fcn(image), repeat)
            streamed = streaming.streamed(fcn, geo, image)
            t_stream = _best(lambda: streaming.streamed(fcn, geo, image), repeat)
            crops = torch.randn(8, 3, 224, 224)
            model(crops)
            t_crops = _best(lambda: model(crops), repeat) / 8
        cells = whole.shape[2] * whole.shape[3]
        diff = float((whole - streamed).abs().max() / whole.abs().max())
        r = {"case": name, "image": f"{side}x{side}", "windows": cells, "whole_s": t_whole,
             "streamed_s": t_stream, "speedup": t_whole / t_stream,
             "crops_per_s": 1 / t_crops, "streamed_per_s": cells / t_stream,
             "vs_crops": cells / t_stream * t_crops, "max_rel_diff": diff}
        rows.append(r)
        print(f"{name:<14}{r['image']:>11}{cells:>9}{t_whole:>9.2f}{t_stream:>11.2f}"
              f"{r['speedup']:>8.2f}x{r['crops_per_s']:>9.1f}{r['streamed_per_s']:>20.0f}"
              f"{r['vs_crops']:>9.1f}x{diff:>14.1e}", flush=True)
    return rows


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                     if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - not Linux
        model = platform.processor() or platform.machine()
    return (f"{model}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"{platform.system()}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small networks only")
    p.add_argument("--only", help="run the cases whose name contains this")
    p.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    p.add_argument("--fine", action="store_true",
                   help="steps below the stride: dilated vs shift-and-stitch vs naive")
    p.add_argument("--batches", type=int, default=8,
                   help="with --fine: naive batches timed when there are more (scaled to all)")
    p.add_argument("--large", action="store_true",
                   help="large images: stage by stage in chunks vs one whole pass")
    args = p.parse_args(argv)
    print(f"machine: {machine()}")
    if args.large:
        run_large(only=args.only, repeat=min(args.repeat, 2))
    elif args.fine:
        run_fine(only=args.only, repeat=args.repeat, batches=args.batches)
    else:
        run(quick=args.quick, only=args.only, repeat=args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
