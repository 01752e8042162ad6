"""Many images in one call: a cohort of slides or scenes, resumable, with a summary table.

The inputs are paths, a folder (the images in it) or a manifest (CSV or TSV with a
``path`` column and optional ``mask``, ``level`` and ``mpp`` columns); each map goes to
the output named by a pattern such as ``results/{stem}.zarr``. Every input is one
:class:`~nofc.tiling.TileJob` of ``tiled_predict``'s: planned, its sink opened as the run
reaches it, resumed from its store. An input that cannot be read, or whose map fails, is
a failed row of the summary and the cohort goes on. On a Dask cluster the tiles of all
inputs are one stream (``nofc.tiling.run_jobs``).

The summary (one row per input, :data:`COLUMNS` then two columns per class) is written
as ``summary.csv`` and ``summary.parquet`` in the folder of the outputs (``summary=``
says another), next to ``cohort.log``, a line per finished input.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .crops import map_network
from .errors import NofcError, check_input_size, first_line
from .heatmap import class_summary
from .io import atomic_output
from .receptive import cached_geometry
from .sinks import output_for
from .sources import (PICTURE_SUFFIXES, SLIDE_SUFFIXES, TIFF_SUFFIXES, is_slide_folder,
                      open_source)
from .tiling import num_outputs, open_job, run_jobs

__all__ = ["predict_many", "Cohort", "CohortInput", "cohort_inputs", "is_cohort", "COLUMNS"]

COLUMNS = ["input", "output", "status", "reason", "windows", "windows_computed",
           "masked_fraction", "seconds", "peak_rss_mb"]
"""The summary's columns before the per-class ones (``CLASS_above``, ``CLASS_mean``)."""

_MANIFESTS = {".csv": ",", ".tsv": "\t"}
_IMAGES = SLIDE_SUFFIXES | TIFF_SUFFIXES | PICTURE_SUFFIXES | {
    ".jp2", ".img", ".vrt", ".dcm", ".isyntax", ".czi"}  # what a folder's listing takes
_FIELDS = ("{stem}", "{name}", "{parent}")


@dataclass(frozen=True)
class CohortInput:
    """One input of a cohort: the image, where its map goes, and its own options (a
    manifest's ``mask``, ``level``, ``mpp`` columns)."""

    path: str
    out: str
    mask: str | None = None
    level: int | None = None
    mpp: float | None = None


def is_cohort(inputs) -> bool:
    """Whether ``inputs`` (the command line's images) make a cohort: several, a folder
    or a manifest (``.csv``, ``.tsv``).

    >>> is_cohort(["slide.svs"]), is_cohort(["a.svs", "b.svs"]), is_cohort(["list.csv"])
    (False, True, True)
    """
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if len(inputs) != 1:
        return True
    one = Path(inputs[0])
    if one.is_dir():  # a folder of images; a DICOM series' folder is one slide
        return not is_slide_folder(one) and any(
            p.suffix.lower() in _IMAGES for p in one.iterdir())
    return one.suffix.lower() in _MANIFESTS


def cohort_inputs(inputs, out) -> list[CohortInput]:
    """The inputs of a cohort: ``inputs`` is a list of paths, a folder (its images, by
    suffix, sorted) or a manifest ``.csv``/``.tsv`` (a ``path`` column, relative to the
    manifest's folder, and optional ``mask``, ``level``, ``mpp``); ``out`` a pattern with
    ``{stem}``, ``{name}`` or ``{parent}`` (the image's file name without its suffix, with
    it, and its folder's name). Two inputs writing one output are refused.

    >>> [i.out for i in cohort_inputs(["a/x.svs", "b/y.tif"], "res/{parent}-{stem}.zarr")]
    ['res/a-x.zarr', 'res/b-y.zarr']
    >>> cohort_inputs(["a/x.svs", "b/x.svs"], "res/{stem}.zarr")
    Traceback (most recent call last):
    ...
    nofc.errors.NofcError: a/x.svs and b/x.svs would both write res/x.zarr; put {parent} in the --out pattern (res/{parent}-{stem}.zarr)
    """
    out = os.fspath(out)
    if not any(f in out for f in _FIELDS):
        raise NofcError(f"several inputs need an --out pattern with {{stem}}, {{name}} or "
                        f"{{parent}} (such as results/{{stem}}.zarr), got {out}")
    rows = []
    for item in [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs):
        rows += _expand(Path(item))
    if not rows:
        raise NofcError(f"no images in {inputs} (a folder's images end in "
                        f"{', '.join(sorted(SLIDE_SUFFIXES | TIFF_SUFFIXES)[:6])}, ...)")
    seen: dict = {}
    made = []
    for path, options in rows:
        p = Path(path)
        try:
            target = out.format(stem=p.stem, name=p.name, parent=p.parent.name)
        except (KeyError, IndexError, ValueError) as exc:
            raise NofcError(f"the --out pattern {out} takes {{stem}}, {{name}} and {{parent}} "
                            f"only ({type(exc).__name__}: {first_line(exc)})") from None
        key = os.path.normcase(os.path.abspath(target))
        if key in seen:
            alt = out.replace("{stem}", "{parent}-{stem}", 1)
            raise NofcError(f"{seen[key]} and {path} would both write {target}; put {{parent}} "
                            f"in the --out pattern ({alt})")
        seen[key] = path
        made.append(CohortInput(str(path), target, **options))
    return made


def _expand(item: Path) -> list[tuple[str, dict]]:
    if item.is_dir():
        return [(str(p), {}) for p in sorted(item.iterdir())
                if p.suffix.lower() in _IMAGES and not p.name.startswith(".")
                and (p.is_file() or p.suffix.lower() in SLIDE_SUFFIXES)]
    if item.suffix.lower() in _MANIFESTS:
        return _manifest(item)
    return [(str(item), {})]


def _manifest(path: Path) -> list[tuple[str, dict]]:
    """The rows of a CSV/TSV manifest: ``path`` and optional ``mask``, ``level``, ``mpp``."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter=_MANIFESTS[path.suffix.lower()]))
            fields = [c.strip().lower() for c in (rows[0].keys() if rows else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise NofcError(f"cannot read the manifest {path}: {first_line(exc)}") from None
    if "path" not in fields:
        raise NofcError(f"the manifest {path} needs a 'path' column (optional: mask, level, "
                        f"mpp); its columns are {', '.join(fields) or 'none'}")
    out = []
    for n, row in enumerate(rows, 2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        if not row["path"]:
            continue
        options: dict = {}
        try:
            if row.get("level"):
                options["level"] = int(row["level"])
            if row.get("mpp"):
                options["mpp"] = float(row["mpp"])
        except ValueError:
            raise NofcError(f"{path} line {n}: level must be a whole number and mpp a number, "
                            f"got level={row.get('level')!r}, mpp={row.get('mpp')!r}") from None
        if row.get("mask"):
            options["mask"] = row["mask"] if row["mask"] == "auto" else str(path.parent
                                                                            / row["mask"])
        out.append((str(path.parent / row["path"]), options))
    return out


class Cohort:
    """What :func:`predict_many` did: a row per input (a dict with :data:`COLUMNS` and
    two columns per class), the summary files and the log.

    ``failed`` counts the failed inputs; ``str()`` is a short table.
    """

    def __init__(self, rows: list[dict], columns: list[str], files: dict):
        self.rows, self.columns, self.files = rows, columns, files

    @property
    def failed(self) -> int:
        return sum(r["status"] == "failed" for r in self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        counts = {s: sum(r["status"] == s for r in self.rows)
                  for s in ("done", "skipped", "failed")}
        return f"Cohort({len(self.rows)} inputs: " + ", ".join(
            f"{n} {s}" for s, n in counts.items() if n) + ")"

    def __str__(self) -> str:
        names = [Path(r["input"]).name for r in self.rows]
        width = min(40, max([5, *map(len, names)]))
        lines = [f"{'input':<{width}}  {'status':<7}  {'windows':>9}  {'seconds':>8}  reason"]
        for name, r in zip(names, self.rows):
            windows = "" if r["windows"] is None else str(r["windows"])
            lines.append(f"{name[-width:]:<{width}}  {r['status']:<7}  {windows:>9}  "
                         f"{r['seconds']:>8.1f}  {(r['reason'] or '')[:70]}")
        return "\n".join(lines)


def predict_many(
    fcn,
    inputs,
    input_size,
    out,
    *,
    tile: int | None = None,
    backend="local",
    step=None,
    method: str = "auto",
    normalize=None,
    mask=None,
    reading: dict | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
    precision: str = "fp32",
    engine: str = "torch",
    threshold: float = 0.5,
    classes: list[str] | None = None,
    summary=None,
    fail_fast: bool = False,
    progress: bool = True,
    force: bool = False,
) -> Cohort:
    """The maps of many images in one call, resumable; returns the summary.

    Args:
        fcn: the converted network (or a classifier, converted and checked once here).
        inputs: paths, a folder or a manifest (:func:`cohort_inputs`).
        input_size: ``(C, H, W)`` the classifier was trained on.
        out: the output pattern, ``{stem}``, ``{name}`` or ``{parent}`` in it, with any
            suffix ``tiled_predict`` writes (``.zarr`` stores resume), or an output object
            whose path is such a pattern, with its options
            (``nofc.sinks.GeoTiffOutput("maps/{stem}.tif", values="logits")``); missing
            folders are made. An existing ``.tif`` or ``.geojson`` (written whole, by a rename)
            counts as done and is skipped unless ``force``.
        tile, backend, step, method, normalize, mask, device, dtype, precision, engine: as in
            :func:`nofc.tiled_predict`, for every input (a manifest's ``mask``, ``level``
            and ``mpp`` columns take over ``mask`` and the reading for their row). On a
            cluster (``nofc.Dask(scheduler=)`` or ``nofc.Dask(workers=)``) the tiles of
            all inputs are one stream and the model goes to each worker once.
        reading: ``nofc.open_source``'s options for every input (``level``, ``mpp``,
            ``bands``, ``on_error``, ``max_pixels``); a manifest's row takes over its own.
        threshold: the probability above which a cell counts in ``CLASS_above``.
        classes: the class names (the per-class columns and the maps' metadata).
        summary: the folder of ``summary.csv``, ``summary.parquet`` and ``cohort.log``
            (default: the outputs' common folder).
        fail_fast: stop at the first failed input (one NofcError naming it) instead of
            recording it and going on.
        progress: one progress bar for the cohort and a line per finished input.

    A rerun with the same arguments skips the finished inputs (their stores hold every
    block and were made for the same arguments: ``status`` "skipped") and resumes the
    partial ones. The columns: ``status`` (done, skipped, failed), ``reason`` (a failure's
    one line), ``windows`` (map cells), ``windows_computed`` (cells of the tiles computed
    in this run), ``masked_fraction`` (cells outside the mask), ``seconds``,
    ``peak_rss_mb`` (this process's peak resident memory so far) and per class the
    fraction of finite cells at or above ``threshold`` and the mean probability.

    >>> import numpy as np, tifffile, tempfile, nofc
    >>> d = Path(tempfile.mkdtemp())
    >>> for name in "ab":
    ...     tifffile.imwrite(d / f"{name}.tif", np.zeros((64, 64), np.uint8), tile=(32, 32))
    >>> (d / "c.tif").write_bytes(b"not a tiff") and None
    >>> fcn = nofc.convert(nofc.zoo.LeNet5(), input_size=(1, 32, 32))
    >>> cohort = predict_many(fcn, d, (1, 32, 32), d / "maps" / "{stem}.zarr", progress=False)
    >>> [(r["status"], r["windows"]) for r in cohort.rows]
    [('done', 81), ('done', 81), ('failed', None)]
    >>> sorted(p.name for p in (d / "maps").iterdir())
    ['a.zarr', 'b.zarr', 'cohort.log', 'summary.csv', 'summary.parquet']
    """
    size = check_input_size(input_size)
    template = output_for(out)  # a pattern, or an output object whose path is one
    if template.path is None:
        raise NofcError("a cohort writes each map to a file: give out= a pattern such as "
                        "'results/{stem}.zarr'")
    items = cohort_inputs(inputs, os.fspath(template.path))
    for item in items:  # an unknown suffix or a bad option: refused before any work
        output_for(item.out)
    net = map_network(fcn, size, method=method, step=step, check=True)
    k = num_outputs(net, size)
    names = list(classes) if classes is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise NofcError(f"{len(names)} class names for a model of {k} classes")
    cached_geometry(net, size)  # once, not per input
    folder = Path(summary) if summary is not None else _common_folder(items)
    for p in {Path(i.out).parent for i in items} | {folder}:
        _make_folder(p)
    columns = COLUMNS + [f"{n}_{what}" for n in names for what in ("above", "mean")]
    run = _Run(items, names, threshold, folder, progress=progress, fail_fast=fail_fast)
    options = dict(tile=tile, step=step, method=method, normalize=normalize, device=device,
                   dtype=dtype, precision=precision, engine=engine, check=False)

    def jobs():
        for item in items:
            job = run.open(item, lambda item=item: open_job(
                net, _source(item, reading), size,
                out=_output(template, item.out, names, threshold),
                mask=item.mask if item.mask is not None else mask, **options), force=force)
            if job is not None:
                yield job

    with run:
        try:
            run_jobs(jobs(), backend, done=run.done, failed=run.failed, bar=run.counter)
        except BaseException:  # --fail-fast, Ctrl-C, a lost scheduler: the rows so far
            with contextlib.suppress(Exception):
                run.write(columns)
            raise
    return Cohort(run.rows, columns, run.write(columns))


def _source(item: CohortInput, reading: dict | None):
    """The image of ``item``: its row's level or pixel size, else ``reading``'s."""
    options = dict(reading or {})
    if item.level is not None or item.mpp is not None:
        options.update(level=item.level, mpp=item.mpp)
    return open_source(item.path, **options)


def _output(template, path: str, names: list[str], threshold: float):
    """The output ``template`` (its options) at ``path``, naming the classes in its
    metadata (a GeoJSON's cells, a region's: those at or above ``threshold``)."""
    more = {"threshold": threshold} if "threshold" in template.__dataclass_fields__ else {}
    return dataclasses.replace(template, path=path,
                               metadata={"classes": names, **(template.metadata or {})},
                               **more)


def _common_folder(items: list[CohortInput]) -> Path:
    parents = [os.path.abspath(Path(i.out).parent) for i in items]
    return Path(os.path.commonpath(parents))


def _make_folder(p: Path) -> None:
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NofcError(f"cannot make the folder {p}: {exc.strerror or first_line(exc)}"
                        ) from None


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB: Linux's VmHWM (ru_maxrss would
    carry a parent's peak over fork and exec), else ru_maxrss (bytes on macOS)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        status = Path("/proc/self/status").read_text().split("VmHWM:", 1)
        if len(status) == 2:
            return round(int(status[1].split()[0]) / 1024, 1)  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


class _Run:
    """The bookkeeping of one cohort call: rows, the log, the progress bar."""

    def __init__(self, items, names, threshold, folder: Path, *, progress, fail_fast):
        self.items, self.names, self.threshold = items, names, threshold
        self.folder, self.progress, self.fail_fast = folder, progress, fail_fast
        self.rows: list[dict] = []
        self.opened: dict = {}  # id(job) -> (item, start time)
        self.t0, self.cells = time.monotonic(), 0.0

    def __enter__(self):
        from tqdm.auto import tqdm

        self.log = open(self.folder / "cohort.log", "a", buffering=1)  # a line per event
        self._say(f"cohort of {len(self.items)} inputs started")
        self.bar = tqdm(total=len(self.items), unit="input", desc="nofc cohort",
                        disable=not self.progress, dynamic_ncols=True)
        return self

    def __exit__(self, *exc):
        self.bar.close()
        if exc[0] is not None:
            self._say(f"stopped: {exc[0].__name__}: {first_line(exc[1])}")
        self.log.close()

    def _say(self, line: str) -> None:
        self.log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")

    def open(self, item: CohortInput, opener, *, force: bool):
        """The job of ``item``, or None when it is already done or cannot be opened."""
        start = time.monotonic()
        output = output_for(item.out)
        if os.path.exists(item.out) and not force:
            try:
                output.check(force=False)
            except NofcError:  # a whole file, written by a rename: finished
                self._row(item, start, "skipped", reason="exists (written whole)")
                return None
        try:  # on a cluster, in a thread while the blocks of the input before are computed
            job = opener()
        except (NofcError, OSError, MemoryError) as exc:
            self._fail(item, start, exc)
            return None
        except Exception as exc:  # noqa: BLE001 - a reader's own error: one row, not a stop
            self._fail(item, start, exc, kind=True)
            return None
        self.opened[id(job)] = (item, start)
        return job

    def counter(self, job):
        """What counts ``job``'s blocks: the cohort's windows per second."""
        per = job.stats["computed"] / max(1, job.stats["tiles_computed"])
        run = self

        class _Count:
            def update(self, n):
                run.cells += n * per
                rate = run.cells / max(1e-9, time.monotonic() - run.t0)
                run.bar.set_postfix_str(f"{rate:,.0f} windows/s", refresh=False)

        return _Count()

    def done(self, job) -> None:
        item, start = self.opened.pop(id(job))
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                scores = job.finish()
            above, mean = class_summary(scores, threshold=self.threshold)
        except (NofcError, OSError) as exc:  # the finished map cannot be written or read
            self._fail(item, start, exc)
            return
        status = "skipped" if job.held == len(job.tiles) else "done"
        notes = [first_line(w.message) for w in caught]
        if 0 < job.held < len(job.tiles):
            notes.insert(0, f"resumed: {job.held} of {len(job.tiles)} blocks were kept")
        fg = job.foreground
        self._row(item, start, status, reason="; ".join(notes) or None,
                  windows=job.stats["windows"], windows_computed=job.stats["computed"],
                  masked_fraction=0.0 if fg is None else round(1 - float(fg.mean()), 6),
                  classes=(above, mean))

    def failed(self, job, exc) -> None:
        item, start = self.opened.pop(id(job))
        self._fail(item, start, exc)

    def _fail(self, item, start, exc, kind=False) -> None:
        reason = (f"{type(exc).__name__}: " if kind or not isinstance(exc, NofcError) else "") \
            + first_line(exc)
        self._row(item, start, "failed", reason=reason)
        if self.fail_fast:
            raise NofcError(f"{item.path}: {reason} (--fail-fast; without it the cohort "
                            "records the failure and goes on)")

    def _row(self, item, start, status, *, reason=None, windows=None, windows_computed=None,
             masked_fraction=None, classes=None) -> None:
        row = {"input": item.path, "output": item.out, "status": status, "reason": reason,
               "windows": windows, "windows_computed": windows_computed,
               "masked_fraction": masked_fraction,
               "seconds": round(time.monotonic() - start, 3), "peak_rss_mb": _peak_rss_mb()}
        for i, name in enumerate(self.names):
            for what, values in zip(("above", "mean"), classes or (None, None)):
                row[f"{name}_{what}"] = None if values is None or np.isnan(values[i]) \
                    else float(values[i])
        self.rows.append(row)
        line = f"{status} {item.path}" + (f" -> {item.out}" if status != "failed" else "") \
            + (f" ({windows} windows, {row['seconds']:.1f} s)" if windows is not None else "") \
            + (f": {reason}" if reason else "")
        self._say(line)
        if self.progress:
            self.bar.write(line, file=sys.stderr)
        self.bar.update(1)

    def write(self, columns: list[str]) -> dict:
        """``summary.csv`` and ``summary.parquet`` (written whole, then renamed)."""
        order = {item.path: n for n, item in enumerate(self.items)}
        self.rows.sort(key=lambda r: order[r["input"]])  # on a cluster they finish in any order
        files = {"csv": self.folder / "summary.csv", "parquet": self.folder / "summary.parquet",
                 "log": self.folder / "cohort.log"}
        with atomic_output(files["csv"], force=True) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(self.rows)
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            warnings.warn("nofc: summary.parquet needs pyarrow: pip install 'nofc[scale]' "
                          "(summary.csv was written)", stacklevel=3)
            del files["parquet"]
            return files
        types = {"windows": pa.int64(), "windows_computed": pa.int64()}
        table = pa.table({c: pa.array([r[c] for r in self.rows], type=types.get(
            c, pa.string() if c in ("input", "output", "status", "reason") else pa.float64()))
            for c in columns})
        with atomic_output(files["parquet"], force=True) as tmp:
            pq.write_table(table, tmp)
        return files
