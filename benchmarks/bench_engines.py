"""Other engines on the CPU: onnxruntime and OpenVINO against PyTorch eager, side by side.

For each network (converted with random weights, ``torch.manual_seed(0)``) and one random
image, every engine runs the same converted network with the same number of threads:

* ``torch fp32``: ``nofc.dense_predict`` (the reference);
* ``torch bf16``: ``nofc.dense_predict(..., precision="bf16")``;
* ``ort fp32``: the graph ``nofc.export_onnx`` writes (free height and width) in
  onnxruntime (``intra_op_num_threads``);
* ``ort int8``: that graph quantised statically by ``onnxruntime.quantization``
  (QDQ, int8 weights and activations, per-channel weights, MinMax calibration on a few
  random images at 448x448) in onnxruntime;
* ``ov fp32``, ``ov bf16``: the same ONNX graph compiled by OpenVINO for its CPU plugin
  (``INFERENCE_NUM_THREADS``, ``INFERENCE_PRECISION_HINT`` f32 or bf16, height and width
  left free as in the graph);
* ``engine=onnxruntime``, ``engine=openvino``: ``nofc.dense_predict(..., engine=)``
  (``nofc.engines``), what the engines cost through nofc's own path; ``engine=openvino
  bf16``: the same with ``precision="bf16"``.

Each row: the median of ``--repeat`` timed runs (the engines interleaved, round by round,
after one warm-up each) in wall-clock seconds and in CPU seconds of the process (on a
loaded machine the CPU time says more: threads that wait for a core or spin at a barrier
show there), the speed relative to torch fp32 (wall clock), and the agreement with the torch
fp32 map: ``max |diff| / max |ref|`` and, for the low precisions, the fraction of cells
with the same top class (``nofc.precision.agreement``). Engines not installed are skipped
with a line saying so.

    python benchmarks/bench_engines.py                       # resnet18, resnet50,
                                                             # densenet121 at 1024x1024
    python benchmarks/bench_engines.py --large               # and at 2048x2048
    python benchmarks/bench_engines.py --only vgg16 --repeat 3
    python benchmarks/bench_engines.py --quick               # resnet18 at 320x320, 1 run
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision

import nofc
from nofc.precision import agreement

SIZE = (3, 224, 224)
ENGINES = ("torch fp32", "torch bf16", "ort fp32", "ort int8", "ov fp32", "ov bf16",
           "engine=onnxruntime", "engine=openvino", "engine=openvino bf16")
_LOW = {"torch bf16", "ort int8", "ov bf16", "engine=openvino bf16"}


def _ort_session(proto_bytes: bytes, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto_bytes, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def _ort_int8(path: str, threads: int, channels: int):
    """The graph at ``path`` quantised statically (QDQ, int8), run in onnxruntime."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            g = torch.Generator().manual_seed(1)
            self.data = iter([{"input": torch.randn(1, channels, 448, 448, generator=g)
                               .numpy()} for _ in range(4)])

        def get_next(self):
            return next(self.data, None)

    logging.getLogger().setLevel(logging.ERROR)  # a warning per weight without a channel axis
    pre, out = path + ".pre.onnx", path + ".int8.onnx"
    quant_pre_process(path, pre, skip_symbolic_shape=True)
    quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    per_channel=True)
    with open(out, "rb") as f:
        return _ort_session(f.read(), threads)


def _openvino(path: str, threads: int, precision: str):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision,
        "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})[0].copy()


def _engines(fcn, path: str, threads: int, wanted) -> tuple[dict, list[str]]:
    """name -> a function from a (1, C, H, W) float32 array to the map as an array."""
    runs, skipped = {}, []

    def torch_run(precision, engine="torch"):
        return lambda x: nofc.dense_predict(fcn, torch.from_numpy(x), SIZE,
                                            precision=precision, engine=engine).numpy()

    makers = {
        "torch fp32": lambda: torch_run("fp32"),
        "torch bf16": lambda: torch_run("bf16"),
        "ort fp32": lambda: _ort_session(open(path, "rb").read(), threads),
        "ort int8": lambda: _ort_int8(path, threads, SIZE[0]),
        "ov fp32": lambda: _openvino(path, threads, "f32"),
        "ov bf16": lambda: _openvino(path, threads, "bf16"),
        "engine=onnxruntime": lambda: torch_run("fp32", "onnxruntime"),
        "engine=openvino": lambda: torch_run("fp32", "openvino"),
        "engine=openvino bf16": lambda: torch_run("bf16", "openvino"),
    }
    for name in wanted:
        try:
            runs[name] = makers[name]()
        except ImportError as exc:
            skipped.append(f"{name}: not installed ({exc.name})")
        except Exception as exc:  # noqa: BLE001 - a benchmark says why and goes on
            skipped.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    return runs, skipped


def run_network(name: str, side: int, repeat: int, threads: int, wanted) -> list[dict]:
    torch.manual_seed(0)
    fcn = nofc.convert(getattr(torchvision.models, name)().eval(), SIZE).eval()
    image = torch.randn(1, SIZE[0], side, side).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.onnx")
        t0 = time.perf_counter()
        nofc.export_onnx(fcn, path, input_size=SIZE)
        export_s = time.perf_counter() - t0
        runs, skipped = _engines(fcn, path, threads, wanted)
    for line in skipped:
        print(f"  {name}: skipped {line}", flush=True)
    maps = {k: f(image) for k, f in runs.items()}  # warm-up, and the maps
    times: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeat):
        for k, f in runs.items():
            t, c = time.perf_counter(), time.process_time()
            f(image)
            times[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    ref = torch.from_numpy(maps["torch fp32"])
    t_ref = statistics.median(times["torch fp32"])
    rows = []
    for k in runs:
        got = torch.from_numpy(np.ascontiguousarray(maps[k])).float()
        if got.shape != ref.shape:
            rel, same = float("inf"), None
        else:
            rel = float((got - ref).abs().max() / ref.abs().max())
            same = agreement(ref, got)["same_top"] if k in _LOW else None
        t = statistics.median(times[k])
        rows.append({"network": name, "image": f"{side}x{side}", "engine": k, "s": t,
                     "cpu_s": statistics.median(cpu[k]),
                     "speed": t_ref / t, "max_rel_diff": rel, "same_top": same,
                     "export_s": export_s})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| network | image | engine | s (median) | cpu s | vs torch fp32 | max rel diff | "
             "same top |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        same = "" if r["same_top"] is None else f"{r['same_top']:.2%}"
        lines.append(f"| {r['network']} | {r['image']} | {r['engine']} | {r['s']:.3f} | "
                     f"{r['cpu_s']:.2f} | {r['speed']:.2f}x | {r['max_rel_diff']:.1e} | {same} |")
    return "\n".join(lines)


def versions() -> str:
    out = [f"torch {torch.__version__}"]
    for mod in ("onnxruntime", "openvino"):
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            out.append(f"{mod} not installed")
    return ", ".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated torchvision networks "
                                  "(default resnet18,resnet50,densenet121)")
    p.add_argument("--engines", help=f"comma-separated subset of: {', '.join(ENGINES)}")
    p.add_argument("--size", type=int, default=1024, help="image side (default 1024)")
    p.add_argument("--large", action="store_true", help="also at 2048x2048")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per engine (median)")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine")
    p.add_argument("--quick", action="store_true", help="resnet18 at 320x320, one run")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    wanted = args.engines.split(",") if args.engines else list(ENGINES)
    unknown = [e for e in wanted if e not in ENGINES]
    if unknown or "torch fp32" not in wanted:
        p.error(f"--engines: {unknown or 'torch fp32 is the reference'}; choose from "
                f"{', '.join(ENGINES)} (torch fp32 included)")
    names = (args.only or "resnet18,resnet50,densenet121").split(",")
    sides = [args.size] + ([2048] if args.large else [])
    repeat = args.repeat
    if args.quick:
        names, sides, repeat = ["resnet18"], [320], 1
    print(f"{versions()}; {args.threads} threads per engine; load average "
          f"{os.getloadavg()[0]:.2f} before", flush=True)
    rows = []
    for side in sides:
        for name in names:
            rows += run_network(name, side, repeat, args.threads, wanted)
    print(table(rows))
    print(f"load average {os.getloadavg()[0]:.2f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
