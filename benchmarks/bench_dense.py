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
    python benchmarks/bench_dense.py --precision --threads 2   # fp32 vs bf16 dense_predict
                                                 # at 2048 (resnet50, densenet121) and the
                                                 # digits demo's agreement
    python benchmarks/bench_dense.py --hardware --threads 2    # matmul peak per precision;
                                                 # five networks per precision and layout
    python benchmarks/bench_dense.py --overhead --threads 2    # dense_predict against the
                                                 # bare forward in both layouts, 896 and 2048

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
from nofc.precision import agreement

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


_HARDWARE = ["vgg16", "resnet50", "densenet121", "convnext_tiny", "mobilenet_v3_large"]
_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def matmul_peak(dtype: torch.dtype, n: int = 4096, repeat: int = 3) -> float:
    """This machine's measured GFLOP/s of an ``n x n`` matmul in ``dtype``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    return 2 * n ** 3 / _best(lambda: a @ b, repeat) / 1e9


def _timm_or_torchvision(name: str):
    if hasattr(torchvision.models, name):
        return getattr(torchvision.models, name)
    import timm  # noqa: PLC0415 - optional, only for a model torchvision lacks

    return lambda: timm.create_model(name)


def _low_copy(fcn, dtype, fmt):
    return copy.deepcopy(fcn).to(dtype=dtype, memory_format=fmt).eval()


def run_hardware(only: str | None = None, side: int = 896, repeat: int = 2,
                 precisions=("fp32", "bf16")) -> list[dict]:
    """The matmul peak per precision, then for each network the bare one pass (the
    converted network's forward, no nofc around it) per precision and memory format:
    GFLOP/s and fraction of that precision's peak; and ``dense_predict`` in the same
    precision next to the fastest bare pass (``dense/bare``)."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    peaks = {p: matmul_peak(dtypes[p]) for p in precisions}
    print("matmul 4096x4096: " + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in peaks.items())
          + (f" (bf16/fp32 {peaks['bf16'] / peaks['fp32']:.2f}x)" if "bf16" in peaks else ""))
    print(f"{'network':<20}{'image':>10}{'GFLOP':>8}{'prec':>6}{'format':>15}{'bare s':>9}"
          f"{'GFLOP/s':>9}{'of peak':>9}{'dense s':>9}{'dense/bare':>11}{'vs fp32':>9}")
    rows = []
    for name in _HARDWARE:
        if only and not any(o in name for o in only.split(",")):
            continue
        torch.manual_seed(0)
        fcn = nofc.convert(_timm_or_torchvision(name)().eval(), (3, 224, 224)).eval()
        image = torch.randn(1, 3, side, side)
        gflop = _flops(fcn, tuple(image.shape)) / 1e9
        base = None
        for p in precisions:
            best_bare = None
            for fmt_name, fmt in _FORMATS.items():
                net = fcn if (p, fmt_name) == ("fp32", "contiguous") else \
                    _low_copy(fcn, dtypes[p], fmt)
                x = image.to(dtypes[p]).contiguous(memory_format=fmt)
                with torch.no_grad():
                    net(x)
                    t = _best(lambda: net(x), repeat)
                best_bare = t if best_bare is None else min(best_bare, t)
                r = {"case": name, "image": f"{side}x{side}", "gflop": gflop, "precision": p,
                     "format": fmt_name, "bare_s": t, "gflops": gflop / t,
                     "of_peak": gflop / t / peaks[p]}
                rows.append(r)
                print(f"{name:<20}{r['image']:>10}{gflop:>8.0f}{p:>6}{fmt_name:>15}{t:>9.3f}"
                      f"{r['gflops']:>9.0f}{r['of_peak']:>9.2f}", flush=True)
            nofc.dense_predict(fcn, image, (3, 224, 224), precision=p)  # warm-up, the copy
            t = _best(lambda: nofc.dense_predict(fcn, image, (3, 224, 224), precision=p), repeat)
            base = t if base is None else base
            r = {"case": name, "image": f"{side}x{side}", "gflop": gflop, "precision": p,
                 "format": "dense_predict", "dense_s": t, "gflops": gflop / t,
                 "of_peak": gflop / t / peaks[p], "dense_over_bare": t / best_bare,
                 "vs_fp32": base / t}
            rows.append(r)
            print(f"{name:<20}{r['image']:>10}{gflop:>8.0f}{p:>6}{'dense_predict':>15}"
                  f"{'':>9}{r['gflops']:>9.0f}{r['of_peak']:>9.2f}{t:>9.3f}"
                  f"{r['dense_over_bare']:>11.2f}{r['vs_fp32']:>8.2f}x", flush=True)
    return rows


_OVERHEAD = ["resnet18", "resnet50", "densenet121", "convnext_tiny"]


def run_overhead(only: str | None = None, sides=(896, 2048), repeat: int = 5) -> list[dict]:
    """``dense_predict(fcn, x)`` against the bare converted forward ``fcn(x)`` with ``x``
    contiguous and channels-last, and against the pass ``dense_predict`` runs inside
    (``nofc.streaming.streamed``: the layout nofc chose, in chunks above ``STREAM_PIXELS``),
    interleaved (A B C D, B C D A, ...: each first in turn) after one warm-up each (which
    makes the layout choice), medians of ``repeat`` runs. ``dense/pass`` is what dense_predict adds."""
    import statistics  # noqa: PLC0415

    from nofc import streaming  # noqa: PLC0415

    print(f"{'network':<14}{'image':>10}{'layout':>15}{'contig s':>10}{'chl s':>9}"
          f"{'pass s':>9}{'dense s':>9}{'dense/contig':>13}{'dense/chl':>10}"
          f"{'dense/pass':>11}")
    rows = []
    size = (3, 224, 224)
    for name in (only or ",".join(_OVERHEAD)).split(","):
        torch.manual_seed(0)
        fcn = nofc.convert(_timm_or_torchvision(name)().eval(), size).eval()
        geo = nofc.geometry(fcn, size)
        for side in sides:
            x = torch.randn(1, 3, side, side)
            xc = x.contiguous(memory_format=torch.channels_last)
            runs = {"contig": lambda: fcn(x), "chl": lambda: fcn(xc),
                    "pass": lambda: streaming.streamed(fcn, geo, x),
                    "dense": lambda: nofc.dense_predict(fcn, x, size)}
            times = {k: [] for k in runs}
            order = list(runs)
            with torch.no_grad():
                for i in range(repeat + 1):  # the first round is the warm-up
                    for k in order[i % 4:] + order[:i % 4]:  # each first in turn
                        times[k].append(_best(runs[k], 1))
            med = {k: statistics.median(v[1:]) for k, v in times.items()}
            chosen = {v[1] for v in fcn.__dict__.get("_nofc_layout_cache", {}).values()}
            fmt = ("channels_last" if chosen == {torch.channels_last} else "contiguous"
                   if chosen else "input's")
            r = {"case": name, "image": f"{side}x{side}", "layout": fmt,
                 **{f"{k}_s": v for k, v in med.items()},
                 "dense_over_contig": med["dense"] / med["contig"],
                 "dense_over_chl": med["dense"] / med["chl"],
                 "dense_over_pass": med["dense"] / med["pass"]}
            rows.append(r)
            print(f"{name:<14}{r['image']:>10}{fmt:>15}{med['contig']:>10.3f}{med['chl']:>9.3f}"
                  f"{med['pass']:>9.3f}{med['dense']:>9.3f}{r['dense_over_contig']:>13.3f}"
                  f"{r['dense_over_chl']:>10.3f}{r['dense_over_pass']:>11.3f}", flush=True)
    return rows


def run_precision(only: str | None = None, side: int = 2048, repeat: int = 2) -> list[dict]:
    """``dense_predict`` in float32 and in bfloat16 side by side (interleaved runs, the
    best of each), with the agreement of the two maps (random weights)."""
    print(f"{'network':<14}{'image':>11}{'fp32 s':>9}{'bf16 s':>9}{'speedup':>9}"
          f"{'same top':>10}{'max rel diff':>14}")
    rows = []
    for name in (only or "resnet50,densenet121").split(","):
        torch.manual_seed(0)
        fcn = nofc.convert(_timm_or_torchvision(name)().eval(), (3, 224, 224)).eval()
        image = torch.randn(1, 3, side, side)
        size = (3, 224, 224)
        ref = nofc.dense_predict(fcn, image, size)
        low = nofc.dense_predict(fcn, image, size, precision="bf16")
        times = {"fp32": [], "bf16": []}
        for _ in range(repeat):
            for p in times:
                times[p].append(_best(lambda: nofc.dense_predict(fcn, image, size,
                                                                 precision=p), 1))
        t32, t16 = min(times["fp32"]), min(times["bf16"])
        agree = agreement(ref, low)
        diff = float((ref - low).abs().max() / ref.abs().max())
        r = {"case": name, "image": f"{side}x{side}", "fp32_s": t32, "bf16_s": t16,
             "speedup": t32 / t16, "same_top": agree["same_top"], "max_rel_diff": diff}
        rows.append(r)
        print(f"{name:<14}{r['image']:>11}{t32:>9.2f}{t16:>9.2f}{t32 / t16:>8.2f}x"
              f"{agree['same_top']:>10.4f}{diff:>14.1e}", flush=True)
    return rows


def digits_agreement(pages: int = 5) -> dict:
    """The digits demo's trained network (cached weights, trained if missing) over its
    pages in float32 and in bfloat16: cells with the same top class, the largest
    probability difference, and the digits read by each."""
    demo = _digits_net()
    r = demo.run(pages=pages, log=lambda *a: None, out=None)
    fcn, geo = r["fcn"], r["geo"]
    same, diff, read32, read16, total = [], 0.0, 0, 0, 0
    for page in r["results"]:
        image = torch.from_numpy(page["page"].image[None])
        low = nofc.dense_predict(fcn, image, demo.INPUT_SIZE, precision="bf16")[0]
        agree = agreement(page["scores"][None], low[None])
        same.append(agree["same_top"])
        diff = max(diff, agree["max_prob_diff"])
        dets = demo.read_page(low, geo, page["page"].image.shape)
        read16 += demo.score_page(page["page"], dets)[0]
        read32 += demo.score_page(page["page"], page["dets"])[0]
        total += len(page["page"].digits)
    out = {"pages": pages, "same_top": float(sum(same) / len(same)), "worst_page": min(same),
           "max_prob_diff": diff, "digits_fp32": read32, "digits_bf16": read16,
           "digits": total}
    print(f"digits demo net, {pages} pages: same top class {out['same_top']:.4%} of cells "
          f"(worst page {out['worst_page']:.4%}), max probability difference "
          f"{diff:.4f}, digits read fp32 {read32}/{total}, bf16 {read16}/{total}")
    return out


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
    p.add_argument("--hardware", action="store_true",
                   help="matmul peak per precision; the one pass of vgg16, resnet50, "
                        "densenet121, convnext_tiny, mobilenet_v3_large per precision and "
                        "memory format, and its fraction of that peak")
    p.add_argument("--precision", action="store_true",
                   help="dense_predict fp32 against bf16 side by side (--only: networks, "
                        "default resnet50,densenet121), and the digits demo's agreement")
    p.add_argument("--overhead", action="store_true",
                   help="dense_predict against the bare converted forward (contiguous and "
                        "channels-last) and its own pass, interleaved, medians (--only: "
                        "networks, default resnet18,resnet50,densenet121,convnext_tiny)")
    p.add_argument("--size", type=int, help="image side for --hardware (default 896) and "
                                            "--precision (default 2048); --overhead runs "
                                            "896 and 2048 unless given")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    if args.overhead:
        run_overhead(only=args.only, sides=(args.size,) if args.size else (896, 2048),
                     repeat=max(args.repeat, 5))
    elif args.hardware:
        run_hardware(only=args.only, side=args.size or 896, repeat=min(args.repeat, 2))
    elif args.precision:
        run_precision(only=args.only, side=args.size or 2048, repeat=min(args.repeat, 2))
        digits_agreement()
    elif args.large:
        run_large(only=args.only, repeat=min(args.repeat, 2))
    elif args.fine:
        run_fine(only=args.only, repeat=args.repeat, batches=args.batches)
    else:
        run(quick=args.quick, only=args.only, repeat=args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
