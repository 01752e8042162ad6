"""The ``nofc`` command. Thin: parses arguments, calls the public API, prints.

Each subcommand is a pair ``_add_NAME(subparsers)`` / ``_cmd_NAME(args) -> int`` listed in
``_COMMANDS``. Every failure that is not a bug in nofc (a NofcError, a model that raises, a
file system or memory error) is one line on stderr and exit code 2; ``--debug`` (or
``NOFC_DEBUG=1``) prints the traceback above that line.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings

from . import __version__, convert, explain, predict_many, verify
from .errors import NofcError, first_line, refuse_overwrite
from .export import save_model, save_onnx
from .cohort import is_cohort, cohort_inputs
from .crops import map_network
from .heatmap import check_outputs, class_names, default_normalize, heatmap
from .images import Normalize
from .io import default_input_size, load_model, parse_size
from .onnx_import import convert_onnx, verify_onnx
from .onnx_net import OnnxNet, is_onnx
from .engines import ENGINES
from .precision import PRECISIONS
from .sinks import RegionsOutput, output_for
from .sources import MAX_PIXELS, open_source
from .tiling import Dask, num_outputs

EXIT_USAGE = 2


def _common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="torchvision:NAME, timm:NAME, path/to/file.py:factory, or a "
                                 "model file")
    p.add_argument("--input-size", metavar="CxHxW",
                   help="the size the classifier was trained on, e.g. 3x224x224 (a timm:NAME "
                        "model's default: the input size of its pretrained config)")
    p.add_argument("--weights", metavar="FILE", help=(
        "checkpoint as saved: .pt/.pth/.ckpt/.safetensors state_dict, Lightning or EMA "
        "dicts, module./model. prefixes (always loaded with weights_only=True); a "
        "torchvision/timm head is sized from it"))
    p.add_argument("--pretrained", action="store_true",
                   help="the library's own pretrained weights (torchvision's DEFAULT, "
                        "timm's default tag), read from its cache, never downloaded; "
                        "torchvision:NAME.WEIGHTS or timm:NAME.TAG say which")
    p.add_argument("--num-classes", type=int, metavar="N",
                   help="build a torchvision:NAME or timm:NAME model with N classes "
                        "(default: 1000, or the checkpoint's classifier size)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling a whole-model file (can run code: only for files "
                        "you trust)")


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pooling", choices=["window", "global"], default="window",
                   help="global pooling becomes a sliding window (default) or stays global")
    p.add_argument("--fc-stride", type=int, default=1, help="stride of the first converted layer")
    p.add_argument("--flatten-order", choices=["chw", "hwc"], default="chw",
                   help="hwc for weights trained after a channels-last flatten (Keras)")


def _load(args, *, onnx: bool = False):
    """The model and its input size; ``onnx``: a ``.onnx`` MODEL runs in onnxruntime."""
    size = parse_size(args.input_size) if args.input_size is not None else None
    if onnx and is_onnx(args.model):
        if args.weights or args.num_classes or args.pretrained:
            raise NofcError(f"{args.model} is an ONNX model with its own weights and head: "
                            "--weights, --num-classes and --pretrained apply to PyTorch models")
        model = OnnxNet(args.model)
        size = size or model.input_size()
    else:
        model = load_model(args.model, weights=args.weights, num_classes=args.num_classes,
                           pretrained=args.pretrained, trust_pickle=args.trust_pickle)
        size = size or default_input_size(model)
    if size is None:
        raise NofcError(f"--input-size is needed for {args.model}: the CxHxW the classifier "
                        "was trained on, e.g. --input-size 3x224x224 (timm:NAME models, "
                        "pretrained torchvision weights and ONNX graphs with a static input "
                        "shape name their own)")
    return model, size


# --------------------------------------------------------------------------- explain


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="print each layer before and after conversion")
    _common_model_args(p)
    _convert_args(p)
    p.add_argument("--at", metavar="HxW", help="also show shapes at this larger input size")
    p.add_argument("--verify", action="store_true",
                   help="also run both models at the reference size and print the errors")
    p.add_argument("--changed", action="store_true", help="show only the rewritten layers")


def _cmd_explain(args) -> int:
    import torch

    model, size = _load(args)
    at = parse_size(args.at, n=2, what="--at") if args.at else None
    table = explain(model, size, at=at, pooling=args.pooling, fc_stride=args.fc_stride,
                    flatten_order=args.flatten_order)
    if args.changed:
        table.rows = [r for r in table.rows if r.changed]
    print(table)
    if args.verify:
        fcn = convert(model, size, pooling=args.pooling, fc_stride=args.fc_stride,
                      flatten_order=args.flatten_order)
        for dtype in (torch.float64, torch.float32):
            print(verify(model, fcn, size, dtype=dtype))
    return 0


# --------------------------------------------------------------------------- convert


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="write the fully convolutional model")
    _common_model_args(p)
    _convert_args(p)
    p.add_argument("-o", "--output", required=True,
                   help="output file: .pt (TorchScript), .pt2 (torch.export) or .onnx "
                        "(ONNX); batch, height and width stay free. For a MODEL.onnx "
                        "classifier the output is .onnx")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def _cmd_convert_onnx(args) -> int:
    from pathlib import Path

    if args.input_size is None:
        raise NofcError("--input-size is needed for an ONNX classifier: the CxHxW it was "
                        "trained on, e.g. --input-size 3x224x224")
    size = parse_size(args.input_size)
    refuse_overwrite(args.output, force=args.force)
    if Path(args.output).suffix.lower() != ".onnx":
        raise NofcError(f"an ONNX classifier converts to ONNX: name the output .onnx, not "
                        f"{args.output}")
    for flag, value, default in (("--weights", args.weights, None),
                                 ("--num-classes", args.num_classes, None),
                                 ("--pretrained", args.pretrained, False),
                                 ("--fc-stride", args.fc_stride, 1),
                                 ("--flatten-order", args.flatten_order, "chw")):
        if value != default:
            raise NofcError(f"{flag} does not apply to an ONNX model (the flatten order is "
                            "read off the graph)")
    fcn = convert_onnx(args.model, size, pooling=args.pooling)
    try:
        report = verify_onnx(args.model, fcn, size)
    except NofcError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime missing an op, say
        print(f"not checked with onnxruntime: {type(exc).__name__}: "
              f"{first_line(exc)}")
    else:
        if not report.ok:
            raise NofcError(f"the converted model does not match the original: {report}")
        print(report)

    save_onnx(fcn, args.output, force=args.force)
    classes = fcn.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    print(f"wrote {args.output} (ONNX); output at {size[1]}x{size[2]}: {classes}x1x1")
    return 0


def _cmd_convert(args) -> int:
    if str(args.model).lower().endswith(".onnx"):
        return _cmd_convert_onnx(args)
    model, size = _load(args)
    fcn = convert(model, size, pooling=args.pooling, fc_stride=args.fc_stride,
                  flatten_order=args.flatten_order)
    report = verify(model, fcn, size, batch=1)
    if not report.ok:
        raise NofcError(f"the converted model does not match the original: {report}")
    kind = save_model(fcn, args.output, input_size=size, force=args.force)
    print(f"{report}")
    print(f"wrote {args.output} ({kind}); output at {size[1]}x{size[2]}: "
          f"{'x'.join(map(str, report.output_shape[1:]))}")
    return 0


# --------------------------------------------------------------------------- heatmap


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in str(text).replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise NofcError(f"expected numbers separated by commas, like 0.485,0.456,0.406; "
                        f"got {text!r}") from None


def _pixels(text: str) -> int:
    """``--max-pixels``: ``1e12`` or ``1000000000000``."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 1 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number of pixels, like 1e12; "
                                         f"got {text!r}")
    return int(value)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise NofcError(f"expected band numbers separated by commas, like 3,2,1; got {text!r}"
                        ) from None


def _add_heatmap(sub) -> None:
    p = sub.add_parser("heatmap", help="draw class probability maps over an image (dense "
                                       "prediction in one pass)")
    _common_model_args(p)
    p.add_argument("image", nargs="+",
                   help="PNG, JPEG or TIFF (grayscale, RGB, RGBA, 16-bit, palette), a "
                        "whole-slide image (SVS, NDPI, MRXS, SCN, DICOM file or folder, "
                        "pyramidal TIFF, ...) or a raster (GeoTIFF, COG, JPEG 2000, ...), told "
                        "apart by content, not by suffix; several, a folder or a manifest "
                        "(.csv/.tsv: path, optional mask, level, mpp) make a cohort: "
                        "--out PATTERN, a summary table")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--class", dest="cls", type=int, metavar="K", help="draw class K")
    which.add_argument("--top", type=int, metavar="N",
                       help="draw the N classes with the highest peak probability (default 1)")
    p.add_argument("--step", type=int, metavar="S",
                   help="pixels between windows; must divide the network stride (default: "
                        "the stride; crop by crop: any step, default the window)")
    p.add_argument("--method", choices=["auto", "dilate", "shift", "crops"], default="auto",
                   help="how the map is made: auto (the converted network; a step below its "
                        "stride by the dilated network where it equals shift-and-stitch; a "
                        "classifier convert refuses, crop by crop), dilate, shift, or crops "
                        "(the classifier on every window at --step)")
    p.add_argument("-o", "--output", help="output PNG (one image)")
    p.add_argument("--scores", metavar="FILE",
                   help="also save the raw map and its geometry: .npz, or .npy plus .json")
    p.add_argument("--mean", type=_floats, help="per-channel mean, e.g. 0.485,0.456,0.406 "
                                                "(default: the model's, if known)")
    p.add_argument("--std", type=_floats, help="per-channel std (default: the model's)")
    p.add_argument("--scale", type=float, metavar="S",
                   help="multiply the stored pixels by S before --offset, --mean and --std "
                        "(default: 1/255 for 8-bit, 1/65535 for 16-bit images, 1 for floats); "
                        "Sentinel-2 reflectance: --scale 0.0001")
    p.add_argument("--offset", type=_floats, metavar="O", help="add O (one value or one per "
                   "band) after --scale: GDAL's band offset, e.g. -0.1 for Sentinel-2 L2A")
    p.add_argument("--labels", metavar="FILE", help="class names, one per line")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--verify", action="store_true",
                   help="also run the classifier crop by crop and print how far the map is "
                        "from it (measured; exact only for networks without padding)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--edges", choices=["inside", "zeros", "reflect"], default="inside",
                   help="inside (default): one cell per window wholly inside the image; "
                        "zeros, reflect: pad the image on all sides so windows cover every "
                        "pixel")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="fp32 (default, exact), bf16 or fp16 (the matrix products in low "
                        "precision on the matrix units, float32 scores: faster; on the digits "
                        "demo 99.98%% of cells keep their top class), auto (bf16 where the hardware has it)")
    p.add_argument("--engine", choices=list(ENGINES), default="torch",
                   help="torch (default), onnxruntime or openvino: the float32 pass run in "
                        "that engine on the CPU, the same map to float32 tolerance (checked "
                        "before use); faster on CPUs, see docs/benchmarks.md")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the check that the converted network gives the classifier's "
                        "outputs at the input size (one forward each) before the map")
    big = p.add_argument_group("large images (tiling is automatic above 16.8 Mpix)")
    big.add_argument("--tile", type=int, metavar="PX",
                     help="tile side in pixels (default: large enough that the halo costs "
                          "at most a tenth of the work, within a 4608² input; at least 2048, "
                          "more for a network whose field reaches far past its window)")
    big.add_argument("--out", metavar="STORE.zarr|MAP.tif|CELLS.geojson|R.regions.geojson"
                                      "|R.gpkg|R.fgb",
                     help="write the raw map as tiles finish: a zarr store (rerun to resume), "
                          "a GeoTIFF (georeferenced; level-0 pixels for a slide: QGIS), "
                          "QuPath detections of the cells above --threshold (GeoJSON), or "
                          "those cells merged into one polygon per region and class "
                          "(.regions.geojson: QuPath annotations for a slide, RFC 7946 for a "
                          "scene; .gpkg, .fgb: GeoPackage, FlatGeobuf in the scene's CRS); for "
                          "a cohort a pattern such as results/{stem}.zarr ({name}, {parent}), "
                          "summary.csv/.parquet and cohort.log in its folder")
    big.add_argument("--scheduler", metavar="ADDRESS",
                     help="run the tiles on a Dask cluster, e.g. tcp://host:8786")
    big.add_argument("--workers", type=int, metavar="N",
                     help="run the tiles on a local Dask cluster of N worker processes")
    big.add_argument("--skip-bad-tiles", action="store_true",
                     help="leave the map NaN where the image cannot be read (corrupt or "
                          "truncated TIFF tiles) and go on; listed in the --out store")
    field = p.add_argument_group("slides and rasters")
    field.add_argument("--level", type=int, help="slide level to read (0: full resolution)")
    field.add_argument("--mpp", type=float,
                       help="microns per pixel to read the slide at (the level is picked, "
                            "resampled between levels)")
    big.add_argument("--max-pixels", type=_pixels, metavar="N",
                     help="refuse an image whose header declares more pixels than N, before "
                          "reading it (default 1e11: a forged or corrupt header)")
    field.add_argument("--bands", type=_ints, metavar="B1,B2,...",
                       help="raster bands to read, 1-based (default: all but alpha)")
    field.add_argument("--mask", metavar="auto|FILE",
                       help="compute only the foreground: 'auto' (tissue by Otsu on "
                            "saturation for slides, the nodata/alpha mask for rasters) or a "
                            "mask image of the same aspect; background cells are NaN")
    field.add_argument("--threshold", type=float,
                       help="top-class probability for a cell to be a GeoJSON detection or "
                            "in a region (default 0.5); in a cohort's summary, for CLASS_above")
    field.add_argument("--regions", action="store_true",
                       help="--out CELLS.geojson holds merged regions, as .regions.geojson")
    field.add_argument("--background", metavar="CLASS[,CLASS]",
                       help="classes (names or numbers) left out of the regions")
    field.add_argument("--values", metavar="probs|logits",
                       help="what a GeoTIFF --out holds: class probabilities (probs, the "
                            "default: what the viewer and the GeoJSON show) or the raw "
                            "logits (a .zarr store always keeps the logits)")
    field.add_argument("--classes", metavar="K1,K2,...",
                       help="the classes a GeoTIFF --out keeps as bands, by index or name "
                            "(default: all)")
    field.add_argument("--no-class-band", dest="class_band", action="store_false",
                       default=None,
                       help="do not write MAP.classes.tif, the top class of each cell with a "
                            "colour table, next to a GeoTIFF --out")

    many = p.add_argument_group("cohorts (several images, a folder or a manifest)")
    many.add_argument("--fail-fast", action="store_true",
                      help="stop at the first input that fails (default: record it in the "
                           "summary and go on)")
    many.add_argument("--quiet", action="store_true",
                      help="no progress bar (in a cohort, no line per finished input)")


def _names(text: str) -> tuple[str, ...]:
    """``"a, b,c"`` -> ``("a", "b", "c")``."""
    return tuple(c.strip() for c in text.split(",") if c.strip())

def _output_of(args):
    """``--out`` with its options (``--threshold``, ``--values``, ``--regions`` ...) as
    an output object (a cohort's path is a pattern), or None."""
    options = {name: value for name, value in (
        ("threshold", args.threshold), ("values", args.values),
        ("classes", None if args.classes is None else _names(args.classes)),
        ("class_band", args.class_band),
        ("exclude", None if args.background is None else _names(args.background)))
        if value is not None}
    if args.regions and args.out is None:
        raise NofcError("--regions needs --out CELLS.geojson (or .regions.geojson, .gpkg, .fgb)")
    if args.regions:
        return RegionsOutput(args.out, **options)
    return None if args.out is None and not options else output_for(args.out, **options)


def _normalize_of(args) -> Normalize | None:
    """``--mean``, ``--std``, ``--scale``, ``--offset`` as a Normalize, or None."""
    if args.mean is None and args.std is None and args.scale is None and args.offset is None:
        return None
    return Normalize(mean=args.mean, std=args.std, scale=args.scale, offset=args.offset)


def _cmd_heatmap(args) -> int:
    if is_cohort(args.image):
        return _cmd_cohort(args)
    if args.fail_fast:
        raise NofcError("--fail-fast is for a cohort (several images, a folder or a "
                        "manifest); one image stops at its first error anyway")
    if args.output is None:
        raise NofcError("the heatmap of one image is a PNG: give -o OUTPUT.png")
    args.image = args.image[0]
    out = _output_of(args)
    normalize = _normalize_of(args)
    backend = "local" if args.scheduler is None and args.workers is None else \
        Dask(scheduler=args.scheduler, workers=args.workers)
    check_outputs(args.output, args.scores, args.out, force=args.force)
    image = open_source(args.image, level=args.level, mpp=args.mpp, bands=args.bands,
                        on_error="skip" if args.skip_bad_tiles else "raise",
                        max_pixels=MAX_PIXELS if args.max_pixels is None else args.max_pixels)
    model, size = _load(args, onnx=True)  # every check above comes before the model is built
    image = open_source(image, channels=size[0])
    info = heatmap(model, image, size, args.output, spec=args.model, cls=args.cls,
                   top=args.top, step=args.step, method=args.method,
                   scores_path=args.scores,
                   normalize=normalize, labels_file=args.labels, device=args.device,
                   force=args.force, tile=args.tile, out=out, backend=backend,
                   progress=not args.quiet,
                   verify=args.verify, mask=args.mask, edges=args.edges, check=args.check,
                   precision=args.precision, engine=args.engine)
    geo = info["geometry"]
    print(f"map {info['map_shape'][0]}x{info['map_shape'][1]}: windows of "
          f"{geo['window'][0]}x{geo['window'][1]}, step {geo['step'][0]}x{geo['step'][1]}, "
          + ("exact" if geo["exact"] else f"not exact: {(geo['reasons'] or ['?'])[0]}"))
    if "windows_computed" in geo:
        done, total = geo["windows_computed"]
        print(f"mask: {done} of {total} windows computed ({done / total:.0%})")
    for label, peak in zip(info["labels"], info["max_prob"]):
        print(f"  {label}: peak probability {peak:.3f}")
    if args.verify:
        print(f"map vs crops: {geo.get('verify', 'not checked (tiled run)')}")
    print(f"wrote {args.output}" + (f" and {args.scores}" if args.scores else ""))
    return 0


def _cmd_cohort(args) -> int:
    """``nofc heatmap MODEL a.svs b.svs --out results/{stem}.zarr``: a cohort."""
    for flag, given in (("-o", args.output), ("--scores", args.scores),
                        ("--verify", args.verify), ("--class", args.cls is not None),
                        ("--top", args.top is not None), ("--edges", args.edges != "inside")):
        if given:
            raise NofcError(f"{flag} is for one image; a cohort writes each map to --out "
                            "PATTERN and a summary table next to them")
    if args.out is None:
        raise NofcError("several images need --out with a pattern, such as --out "
                        "results/{stem}.zarr ({stem}, {name}, {parent} of each image)")
    out = _output_of(args)
    cohort_inputs(args.image, out.path)  # refusals before the model is built
    model, size = _load(args, onnx=True)
    normalize = _normalize_of(args)
    if normalize is None or (normalize.mean is None and normalize.std is None):
        normalize = default_normalize(model, args.model, size[0], given=normalize)
    fcn = map_network(model, size, method=args.method, step=args.step, check=args.check)
    backend = "local" if args.scheduler is None and args.workers is None else \
        Dask(scheduler=args.scheduler, workers=args.workers)
    reading = {"level": args.level, "mpp": args.mpp, "bands": args.bands,
               "on_error": "skip" if args.skip_bad_tiles else "raise",
               "max_pixels": MAX_PIXELS if args.max_pixels is None else args.max_pixels}
    cohort = predict_many(fcn, args.image, size, out, tile=args.tile, backend=backend,
                          step=args.step, method=args.method, normalize=normalize,
                          mask=args.mask, device=args.device, reading=reading,
                          threshold=0.5 if args.threshold is None else args.threshold,
                          classes=class_names(model, num_outputs(fcn, size), args.labels),
                          fail_fast=args.fail_fast, progress=not args.quiet,
                          precision=args.precision, engine=args.engine,
                          force=args.force)
    print(cohort)
    print(f"summary: {', '.join(str(p) for p in cohort.files.values())}")
    if cohort.failed:
        print(f"nofc: error: {cohort.failed} of {len(cohort)} inputs failed (their reasons: "
              f"{cohort.files['csv']})", file=sys.stderr)
        return EXIT_USAGE
    return 0


# --------------------------------------------------------------------------- view


def _add_view(sub) -> None:
    p = sub.add_parser("view", help="pan and zoom over an image and its map in the browser")
    p.add_argument("result", help="the map: the zarr store or GeoTIFF written by nofc "
                                  "heatmap --out or nofc.tiled_predict(out=...)")
    p.add_argument("image", nargs="?",
                   help="the image (default: the path the map records; give it when the "
                        "image moved)")
    p.add_argument("--level", type=int,
                   help="the slide level shown beneath the map (default 0: full "
                        "resolution, whatever level or --mpp the map was computed at)")
    p.add_argument("--port", type=int, help="port to listen on (default: a free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--export", metavar="DIR",
                   help="write the viewer, every tile included, to a static folder instead")
    p.add_argument("--force", action="store_true", help="overwrite an existing --export DIR")


def _cmd_view(args) -> int:
    from .viewer import export_viewer, view

    if args.export:
        out = export_viewer(args.result, args.export, image=args.image, force=args.force,
                            level=args.level)
        print(f"wrote {out}: serve it with any static HTTP server, e.g. "
              f"python -m http.server --directory {out}")
        return 0
    view(args.result, args.image, port=args.port, host=args.host, level=args.level)
    return 0


_COMMANDS = {
    "explain": (_add_explain, _cmd_explain),
    "convert": (_add_convert, _cmd_convert),
    "heatmap": (_add_heatmap, _cmd_heatmap),
    "view": (_add_view, _cmd_view),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nofc",
        description="No fully-connected layers: convert a classifier into a fully "
                    "convolutional network and run it densely.",
    )
    parser.add_argument("--version", action="version", version=f"nofc {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback above an error's line (also NOFC_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in _COMMANDS.values():
        add(sub)
    for p in sub.choices.values():  # also after the command: nofc heatmap ... --debug
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)
    return parser


def _print_chain(exc: BaseException) -> None:
    """The traceback of ``exc`` and of every error behind it, the first cause first
    (``raise ... from None`` hides them from Python's own printing; --debug wants them)."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in reversed(chain):
        traceback.print_exception(type(e), e, e.__traceback__, chain=False, file=sys.stderr)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (NaN pixels, ...) as one line like errors, without Python's source line
    (and without the ``nofc:`` the library's own warnings start with)."""
    print(f"nofc: warning: {str(message).removeprefix('nofc: ')}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for errors the user can fix)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*TorchScript.*")
    debug = args.debug or os.environ.get("NOFC_DEBUG", "") not in ("", "0")
    try:
        with warnings.catch_warnings():  # restores showwarning for callers of main()
            warnings.showwarning = _one_line_warning
            return _COMMANDS[args.command][1](args)
    except (NofcError, OSError, MemoryError) as exc:
        # OSError, MemoryError: the machine (disk, permissions, memory), not nofc
        if debug:
            _print_chain(exc)
        what = "" if isinstance(exc, NofcError) else f"{type(exc).__name__}: "
        print(f"nofc: error: {what}{exc if isinstance(exc, NofcError) else first_line(exc)}",
              file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("nofc: interrupted; no output was written in place", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
