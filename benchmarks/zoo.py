"""The whole nofc pipeline over the timm zoo and torchvision's classifiers: docs/coverage.md.

For each model, in its own process with a time limit and one thread (random weights, the
input size of its pretrained config): ``convert``, ``verify`` (float64, at the reference
size), ``geometry``, ``dense_predict`` on a non-square image larger than the window
(compared cell by cell with the classifier on the crops: a map that disagrees where
geometry says exact is WRONG), ``tiled_predict`` against ``dense_predict``, and
``export_onnx`` run in onnxruntime against the converted network. A stage that refuses
stops the row with its one-line message.

    python benchmarks/zoo.py                  # smallest model of each timm module + torchvision
    python benchmarks/zoo.py --all            # every timm name
    python benchmarks/zoo.py --only timm:vgg11 torchvision:alexnet   # print, write nothing
    python benchmarks/zoo.py --jobs 2 --timeout 600

Results are kept one JSON line per model in ``--work`` (default /tmp/nofc_zoo), so an
interrupted run resumes; ``--again`` runs every model anew.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("convert", "verify", "geometry", "dense", "reference", "tiled", "onnx")
_MARK = "ZOO-STAGE "


# --------------------------------------------------------------------------- one model


def _build(spec: str):
    """(model, input_size) for ``timm:NAME`` or ``torchvision:NAME``, random weights."""
    import nofc.io

    model = nofc.io.load_model(spec)
    size = nofc.io.default_input_size(model) or (3, 224, 224)
    if spec == "torchvision:inception_v3":
        size = (3, 299, 299)
    return model, tuple(size)


def _child(spec: str) -> None:
    """Run the stages for one model, printing each result as a marked JSON line."""
    import numpy as np
    import torch

    import nofc

    torch.manual_seed(0)

    def emit(stage, status, detail=""):
        print(_MARK + json.dumps({"stage": stage, "status": status, "detail": detail}),
              flush=True)

    stage = "build"
    try:
        model, size = _build(spec)
        emit("size", "ok", "x".join(map(str, size)))
        stage = "convert"
        fcn = nofc.convert(model, size)
        emit(stage, "ok")
        stage = "verify"
        r = nofc.verify(model, fcn, size, batch=1)
        low = not r.ok and bool(r.note)  # the model computes in float32 even in float64
        if low:  # the model itself computes in float32: check it there
            r32 = nofc.verify(model, fcn, size, batch=1, dtype=torch.float32)
            emit(stage, "ok" if r32.ok else "MISMATCH",
                 f"float32 {r32.max_abs_error:.1e} (rel {r32.max_rel_error:.1e}); float64 "
                 f"{r.max_rel_error:.1e}: {r.note}")
        else:
            emit(stage, "ok" if r.ok else "MISMATCH",
                 f"{r.max_abs_error:.1e} (rel {r.max_rel_error:.1e})")
        stage = "geometry"
        geo = nofc.geometry(fcn, size)
        sy, sx = geo.stride
        emit(stage, "ok", f"stride {sy}x{sx}{' (measured)' if geo.measured else ''}, "
             + ("exact" if geo.exact else f"not exact: {geo.reasons[0]}"))
        stage = "dense"
        # off the lattice, non-square: 7 rows and columns past the last window
        img = torch.randn(size[0], size[1] + 2 * sy + 7, size[2] + 3 * sx + 7)
        rep = nofc.verify(model, fcn, size, image=img, dtype=torch.float32)
        dense = nofc.dense_predict(fcn, img, size)[0].numpy()  # (K, h, w)
        # the windows inside, as crop by crop (sliding_window_predict) gives them
        inside = ((img.shape[1] - size[1]) // sy + 1, (img.shape[2] - size[2]) // sx + 1)
        where = (f"{dense.shape[1]}x{dense.shape[2]} map, {rep.cells} cells vs crops rel "
                 f"{rep.max_rel_error:.0e}")
        if dense.shape[1:] != inside or rep.cells != inside[0] * inside[1]:
            where += f", not the {inside[0]}x{inside[1]} windows inside the image"
        emit(stage, "WRONG" if (geo.exact and not rep.ok) or dense.shape[1:] != inside
             else "ok", where)
        stage = "reference"
        _reference_stage(spec, model, fcn, size, geo, low, emit)
        stage = "tiled"
        try:
            tiled = nofc.tiled_predict(fcn, img.numpy(), size, tile=2 * max(sy, sx),
                                       progress=False)
            err = float(np.abs(tiled - dense).max()) / max(1e-30, float(np.abs(dense).max()))
            emit(stage, "ok" if err <= 1e-4 else "DIFFERS", f"rel {err:.0e}")
        except nofc.NofcError as exc:
            emit(stage, "refused", str(exc))
        stage = "onnx"
        _onnx_stage(nofc, fcn, size, img, dense, geo, emit)
    except nofc.NofcError as exc:
        emit(stage, "refused", str(exc))
    except Exception as exc:  # noqa: BLE001 - a crash is a row too: it is a bug to fix
        lines = str(exc).strip().splitlines()
        emit(stage, "CRASH", f"{type(exc).__name__}: {lines[0] if lines else ''}")


def _onnx_stage(nofc, fcn, size, img, dense, geo, emit) -> None:
    """Export, run in onnxruntime on the test image (on the part a lattice network runs
    on: the same windows), compare with the dense map."""
    import numpy as np
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fcn.onnx"
        nofc.export_onnx(fcn, path, input_size=size)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        h, w = geo.fit(img.shape[1:])
        got = sess.run(None, {sess.get_inputs()[0].name: img[None, :, :h, :w].numpy()})[0][0]
    err = float(np.abs(got - dense).max()) / max(1e-30, float(np.abs(dense).max()))
    emit("onnx", "ok" if got.shape == dense.shape and err <= 1e-4 else "DIFFERS",
         f"rel {err:.0e}")


# --------------------------------------------------------------------------- the reference


class _NoReference(Exception):
    """The model has no feature map to cut windows from (the message says why)."""


class _Disagrees(Exception):
    """The model's features contradict the geometry the map was computed with."""


def _reference_map(model, image, input_size, step):
    """The map a converted timm classifier must give, computed by timm alone.

    ``forward_features`` runs once over the whole image; the cell of window ``(i, j)`` is
    ``forward_head`` (pooling, norms, classifier) on the ``fh x fw`` part of that feature
    map at ``(i, j)``, ``fh x fw`` being the feature map of one window. That is what the
    fully convolutional copy computes, padded or not, with global context (squeeze-and-
    excitation, attention) or not: the body sees the whole image, the head slides over its
    features. A crop of the window sees zero padding at its borders where the whole image
    has pixels, so comparing with crops can only say "not exact"; this reference is exact.

    Args:
        model: a timm classifier in eval mode, in the precision to compare in.
        image: ``(C, H, W)`` tensor in the model's dtype, run as it is (the caller picks an
            image the network keeps its window grid on: see ``_reference_image``).
        input_size: ``(C, H, W)`` of one window.
        step: ``(sy, sx)`` pixels between windows: the network stride, which must be the
            feature map's, so that window ``(i, j)`` starts at feature ``(i, j)`` (checked:
            a window two steps larger has two more feature rows and columns; one step
            would not do, padded layers round a part of a stride up to a whole cell).

    Returns:
        ``(1, K, h, w)``: one cell per window wholly inside the image,
        ``h = (H_img - H) // sy + 1`` and ``w = (W_img - W) // sx + 1``.

    Raises:
        _NoReference: no ``forward_features`` / ``forward_head``, or features that are not
            a map (a sequence of tokens), or a head that does not give one score vector.
        _Disagrees: the feature map does not move one cell per step, or is too small.
    """
    import torch

    if not (callable(getattr(model, "forward_features", None))
            and callable(getattr(model, "forward_head", None))):
        raise _NoReference("no forward_features and forward_head")
    # NHWC features (MambaOut, Swin, Sequencer): cut on axes 1, 2, given to the head so
    nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
    axes = (1, 2) if nhwc else (2, 3)
    c, wh, ww = input_size
    sy, sx = step
    with torch.no_grad():
        one = model.forward_features(image.new_zeros(1, c, wh, ww))
        if not isinstance(one, torch.Tensor) or one.ndim != 4:
            what = tuple(one.shape) if isinstance(one, torch.Tensor) else type(one).__name__
            raise _NoReference(f"features of one window are {what}, not a map")
        fh, fw = (one.shape[a] for a in axes)
        grown = model.forward_features(image.new_zeros(1, c, wh + 2 * sy, ww + 2 * sx))
        if (grown.shape[axes[0]], grown.shape[axes[1]]) != (fh + 2, fw + 2):
            raise _Disagrees(
                f"features of a window are {fh}x{fw} and of one two steps of {sy}x{sx} "
                f"larger {grown.shape[axes[0]]}x{grown.shape[axes[1]]}, not two cells "
                f"more: the stride {sy}x{sx} is not the feature map's")
        feats = model.forward_features(image[None])  # (1, C', Fh, Fw) or (1, Fh, Fw, C')
        h = (image.shape[-2] - wh) // sy + 1
        w = (image.shape[-1] - ww) // sx + 1
        if feats.shape[axes[0]] < fh + h - 1 or feats.shape[axes[1]] < fw + w - 1:
            raise _Disagrees(f"features of the image are {feats.shape[axes[0]]}x"
                             f"{feats.shape[axes[1]]}, too few for {h}x{w} windows of "
                             f"{fh}x{fw} features")
        rows = []
        for i in range(h):
            row = []
            for j in range(w):
                part = feats.narrow(axes[0], i, fh).narrow(axes[1], j, fw)
                row.append(model.forward_head(part))  # (1, K)
            rows.append(torch.stack(row, -1))  # (1, K, w)
    if rows[0].ndim != 3:
        raise _NoReference(f"the head gives {tuple(rows[0].shape[:-1])}, not (1, K)")
    return torch.stack(rows, -2)  # (1, K, h, w)


def _pads_by_size(model) -> bool:
    """TensorFlow's "same" padding computed from the input size (timm's ``Conv2dSame``,
    ``MaxPool2dSame``, ``AvgPool2dSame``, ``ScaledStdConv2dSame``...): on an image that is
    not the window plus whole strides its amounts change, and the model runs on another
    grid than its windows (nofc fixes them at the window's amounts, as a crop has them)."""
    from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
    from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame

    dynamic = (Conv2dSame, Conv2dSameExport, AvgPool2dSame, MaxPool2dSame)
    return any(isinstance(m, dynamic) or getattr(m, "same_pad", False) is True
               for m in model.modules())


def _reference_image(model, input_size, geo, dtype):
    """(image, why on the lattice): window + (2, 3) strides + 7 pixels (off the lattice:
    rows and columns past the last window, which the map must leave out), or window +
    (2, 3) strides where only such sizes keep the model on its window grid (it runs only
    on them, or its padding depends on the input size). Fixed seed, non-square."""
    import torch

    (sy, sx), (c, h, w) = geo.stride, input_size
    why = ("runs only on the window plus whole strides" if geo.lattice else
           "TensorFlow 'same' padding from the input size" if _pads_by_size(model) else "")
    extra = 0 if why else 7
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(c, h + 2 * sy + extra, w + 3 * sx + extra, generator=gen,
                        dtype=torch.float64).to(dtype)
    return image, why


def _reference_stage(spec, model, fcn, size, geo, low, emit) -> None:
    """The dense map in float64 against ``_reference_map``: "ok" or "WRONG" with the error,
    "-" where there is no reference (not timm, no feature map). In float32 (relative 1e-4)
    where the model computes in float32 even in float64 (``low``)."""
    import copy

    import torch

    import nofc

    if not spec.startswith("timm:"):
        emit("reference", "-", "not a timm model")
        return
    dtype = torch.float32 if low else torch.float64
    try:
        image, why = _reference_image(model, size, geo, dtype)
        ref = _reference_map(copy.deepcopy(model).to(dtype), image, size, geo.stride)
        got = nofc.dense_predict(fcn, image, size, dtype=dtype)  # on a copy in dtype
    except _NoReference as exc:
        emit("reference", "-", str(exc))
        return
    except _Disagrees as exc:
        emit("reference", "WRONG", str(exc))
        return
    except Exception as exc:  # noqa: BLE001 - a crash here ends this stage, not the row
        lines = str(exc).strip().splitlines()
        emit("reference", "CRASH", f"{type(exc).__name__}: {lines[0] if lines else ''}")
        return
    h, w = ref.shape[-2:]
    where = (f"{h}x{w} cells of a {image.shape[1]}x{image.shape[2]} image"
             + (f" (on the lattice: {why})" if why else "")
             + (", float32: the model computes in float32" if low else ""))
    if got.shape[-2:] != (h, w):  # one cell per window inside the image
        emit("reference", "WRONG", f"map {got.shape[-2]}x{got.shape[-1]}, not {where}")
        return
    err = float((got - ref).abs().max())
    scale = float(ref.abs().max())
    ok = err <= 1e-4 * scale if low else err <= 1e-10 * max(1.0, scale)
    emit("reference", "ok" if ok else "WRONG",
         f"{err:.1e} (rel {err / max(scale, 1e-300):.1e}), {where}")


# --------------------------------------------------------------------------- the list


def _timm_models(every: bool, work: Path) -> list[tuple[str, str]]:
    """(family, spec): every name, or the smallest model (by parameters) of each module."""
    import timm

    if every:
        return [(mod, f"timm:{n}") for mod in timm.list_modules()
                for n in timm.list_models(module=mod)]
    cache = work / "timm_smallest.json"
    if cache.exists():
        return [tuple(x) for x in json.loads(cache.read_text())]
    import torch

    picked = []
    for mod in timm.list_modules():
        best = None
        for name in timm.list_models(module=mod):
            try:
                with torch.device("meta"):
                    n = sum(p.numel() for p in timm.create_model(name).parameters())
            except Exception:  # noqa: BLE001 - a name that cannot be built is skipped
                continue
            if best is None or n < best[0]:
                best = (n, name)
        if best is not None:
            picked.append((mod, f"timm:{best[1]}"))
    cache.write_text(json.dumps(picked))
    return picked


def _torchvision_models() -> list[tuple[str, str]]:
    import torchvision

    return [("torchvision", f"torchvision:{n}")
            for n in torchvision.models.list_models(module=torchvision.models)]


def _run_one(spec: str, timeout: int) -> dict:
    """The child's stages for ``spec``; a timeout is the status of the stage it was in."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    code = "import sys, zoo; zoo._child(sys.argv[1])"
    t0 = time.time()
    try:
        out = subprocess.run([sys.executable, "-c", code, spec], capture_output=True,
                             text=True, timeout=timeout, env=env, cwd=Path(__file__).parent)
        text, rc = out.stdout, out.returncode
    except subprocess.TimeoutExpired as exc:
        text, rc = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (
            exc.stdout or ""), "timeout"
    row = {"spec": spec, "seconds": round(time.time() - t0, 1), "stages": {}}
    for line in text.splitlines():
        if line.startswith(_MARK):
            r = json.loads(line[len(_MARK):])
            row["stages"][r["stage"]] = [r["status"], r["detail"]]
    done = [s for s in STAGES if s in row["stages"]]
    # a refused tiling does not end the row (ONNX comes after it): a time limit or a crash
    # there is the ONNX stage's
    if rc != 0 and (not done or row["stages"][done[-1]][0] in ("ok", "-")
                    or done[-1] == "tiled"):
        nxt = STAGES[len(done)] if len(done) < len(STAGES) else "onnx"
        row["stages"][nxt] = ["TIMEOUT" if rc == "timeout" else "CRASH",
                              f"after {timeout} s" if rc == "timeout" else f"exit code {rc}"]
    return row


# --------------------------------------------------------------------------- the table


def _cell(row: dict, stage: str) -> str:
    status, detail = row["stages"].get(stage, ["-", ""])
    if status == "ok":
        return f"ok {detail}".strip() if stage in (
            "verify", "geometry", "dense", "reference") else "ok"
    return status


def _refusal(row: dict) -> str:
    for stage in STAGES:
        status, detail = row["stages"].get(stage, ["ok", ""])
        if status not in ("ok", "-"):  # "-": no reference for this model
            what = stage if status == "refused" else f"{stage} {status}"
            return f"{what}: {detail}".replace("|", "\\|")
    return ""


def _summary(rows: list[dict], what: str) -> list[str]:
    """Pass counts per stage and refusals by kind, for one group of rows."""
    counts = collections.Counter()
    reasons = collections.Counter()
    wrong = collections.Counter()  # maps that disagree: with the crops, with the reference
    # every stage right; of them, tiling refused for global context; rows with a reference
    whole = context = referenced = 0
    for row in rows:
        status = {stage: row["stages"].get(stage, ["-", ""]) for stage in STAGES}
        for stage in STAGES:
            counts[stage] += status[stage][0] == "ok"
            wrong[stage] += status[stage][0] == "WRONG"
        referenced += status["reference"][0] != "-"
        refused_tiling = status["tiled"][0] == "refused" and "inside its body" in status[
            "tiled"][1]
        # no reference ("-": not timm, no feature map) is not a failure
        if all(status[s][0] == "ok" or (s == "reference" and status[s][0] == "-")
               for s in STAGES if s != "tiled") and (
                status["tiled"][0] == "ok" or refused_tiling):
            whole += 1
            context += refused_tiling
        r = _refusal(row)
        if r:
            reasons[_reason_kind(r)] += 1
    passes = ", ".join(f"{s} {counts[s]}" + (f" of {referenced}" if s == "reference" else "")
                       for s in STAGES)
    return [f"**{what}** ({len(rows)}): {passes} pass; wrong maps {sum(wrong.values())} "
            f"(dense {wrong['dense']}, reference {wrong['reference']}); the whole pipeline "
            f"{whole} ({whole - context} tile, {context} have "
            "global context and rightly refuse tiling); first refusal by kind: " + (", ".join(
                f"{k} {v}" for k, v in reasons.most_common()) or "none") + ".", ""]


def _write_table(rows: list[dict], families: dict, out: Path, command: str) -> None:
    lines = [
        "# Coverage: the nofc pipeline over timm and torchvision",
        "",
        f"Measured by `{command}` (random weights, each model's own input size, one "
        "thread, one process per model). Stages: `convert`; `verify` (float64 at the "
        "reference size, abs error <= 1e-10 x max(1, max|reference|)); `geometry` "
        "(stride, exactness; `(measured)` where a layer could not be read and the geometry "
        "was measured by running the network); `dense` (`dense_predict` on a non-square "
        "image of window + (2, 3) strides + 7 pixels, compared with the classifier on each "
        "crop: WRONG would be a map that disagrees where geometry says exact, or one whose "
        "shape is not the windows inside the image, as crop by crop gives); `reference` (timm models: the dense "
        "map in float64 on window + (2, 3) strides + 7 pixels, or + (2, 3) strides where "
        "the network keeps its window grid only there, equals timm's `forward_head` on each "
        "window's part of `forward_features` of the whole image, to 1e-10 x max(1, "
        "max|reference|): exact for padded networks too; `-` where there is no feature "
        "map; WRONG is a wrong map); `tiled` (`tiled_predict` equals "
        "`dense_predict`, or refuses a network with global context); `onnx` (`export_onnx` "
        "run in onnxruntime equals `dense_predict`). The last column is the first refusal.",
        "",
        *_summary([r for r in rows if r["spec"].startswith("timm:")],
                  "timm, one model per module"),
        *_summary([r for r in rows if r["spec"].startswith("torchvision:")], "torchvision"),
        "| family | model | size | " + " | ".join(STAGES) + " | s | first refusal |",
        "|---|---|---|" + "---|" * len(STAGES) + "---|---|",
    ]
    for row in rows:
        spec = row["spec"]
        size = row["stages"].get("size", ["", ""])[1]
        cells = " | ".join(_cell(row, s) for s in STAGES)
        lines.append(f"| {families.get(spec, '')} | {spec.split(':', 1)[1]} | {size} | {cells} "
                     f"| {row['seconds']:.0f} | {_refusal(row)} |")
    out.write_text("\n".join(lines) + "\n")


_KINDS = [  # (substring of the refusal, kind) in the order they are tried
    ("TIMEOUT", "time limit"), ("CRASH", "crash"), ("WRONG", "wrong map"),
    ("MISMATCH", "verify mismatch"), ("DIFFERS", "differs"),
    ("inside its body", "global context (tiling refused)"),
    ("does not come from", "head reads a token or a sequence, not a map"),
    ("not a flattened feature map", "head reads a token or a sequence, not a map"),  # LeViT
    ("not fully convolutional", "runs at one input size only"),
    ("only works at the reference size", "runs at one input size only"),
    ("depends on the input size", "runs at one input size only"),
    ("cannot trace", "not traceable"),
    ("in coarser steps than", "needs sizes in coarser steps than its stride"),
    ("cannot derive the geometry", "geometry unknown"),
    ("does not run on input_size", "does not run at its size"),
    ("the network does not run on a ", "runs at some input sizes only"),
    ("does not run in onnxruntime", "ONNX the exporter sized for its example"),
]


def _reason_kind(refusal: str) -> str:
    for needle, kind in _KINDS:
        if needle in refusal:
            return kind
    return refusal.split(":", 1)[0] + ": other"


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="every timm name, not one per module")
    ap.add_argument("--only", nargs="+", help="these specs only; print the rows, write nothing")
    ap.add_argument("--no-torchvision", action="store_true")
    ap.add_argument("--no-timm", action="store_true")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per model")
    ap.add_argument("--jobs", type=int, default=2, help="models at a time")
    ap.add_argument("--work", default="/tmp/nofc_zoo", help="where results are kept")
    ap.add_argument("--again", action="store_true", help="ignore kept results")
    ap.add_argument("--table", action="store_true", help="only write the table from kept "
                    "results")
    ap.add_argument("--out", default=str(ROOT / "docs" / "coverage.md"))
    args = ap.parse_args(argv)
    if args.only:
        for spec in args.only:
            print(json.dumps(_run_one(spec, args.timeout)))
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    todo = [] if args.no_timm else _timm_models(args.all, work)
    todo += [] if args.no_torchvision else _torchvision_models()
    families = {spec: fam for fam, spec in todo}
    kept_file = work / ("results_all.jsonl" if args.all else "results.jsonl")
    kept = {}
    if kept_file.exists() and not args.again:
        for line in kept_file.read_text().splitlines():
            kept[json.loads(line)["spec"]] = json.loads(line)
    specs = [] if args.table else [spec for _, spec in todo if spec not in kept]
    print(f"{len(todo)} models, {len(specs)} to run", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool, kept_file.open("a") as log:
        for row in pool.map(lambda s: _run_one(s, args.timeout), specs):
            kept[row["spec"]] = row
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(f"{row['spec']}: {_refusal(row) or 'all stages ok'} ({row['seconds']} s)",
                  flush=True)
    command = "python benchmarks/zoo.py" + (" --all" if args.all else "")
    _write_table([kept[s] for _, s in todo if s in kept], families, Path(args.out), command)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
