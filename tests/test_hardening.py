"""Issue 27, points 5-9: bombs refused before reading, arguments checked before any work,
no asyncio noise after an error, a model that raises named in one line, and the smaller
refusals. Each CLI case: exit code 2, one ``nofc: error:`` line on stderr, nothing written.

Bomb files are small files whose header's size fields are patched, never files written
at the declared size.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import nofc
from nofc import NofcError
from nofc.cli import main
from nofc.images import BadRegion
from nofc.zoo import LeNet5
from test_hostile import cli_error as one_error  # exit 2, one line, every needle

tifffile = pytest.importorskip("tifffile")

LENET = ["nofc:lenet5", "--input-size", "1x32x32"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


def bomb_tiff(path: Path, h: int = 1_000_000, w: int = 1_000_000, tiled: bool = True) -> Path:
    """A 32x32 TIFF (16x16 tiles, or one strip) whose header claims ``h`` x ``w`` pixels."""
    tifffile.imwrite(path, np.full((32, 32), 7, np.uint8), compression="zlib", metadata=None,
                     **({"tile": (16, 16)} if tiled else {"rowsperstrip": 32}))
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        for code, value in ((256, w), (257, h)):
            tag = tags[code]
            struct.pack_into("<H", data, tag.offset + 2, 4)  # SHORT -> LONG
            struct.pack_into("<I", data, tag.offset + 8, value)
    path.write_bytes(bytes(data))
    assert path.stat().st_size < 400
    return path


def bomb_png(path: Path, h: int = 1_000_000, w: int = 1_000_000) -> Path:
    """A 4x4 PNG whose IHDR claims ``h`` x ``w`` pixels (CRC fixed)."""
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    struct.pack_into(">II", data, 16, w, h)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def gray_tiff(path: Path, hw=(256, 256), tile=64) -> Path:
    a = (np.random.default_rng(0).random(hw) * 255).astype(np.uint8)
    tifffile.imwrite(path, a, tile=(tile, tile), compression="zlib")
    return path


def written(tmp_path: Path, *keep: Path) -> list[str]:
    """Files and folders in tmp_path other than the inputs ``keep``."""
    return sorted(p.name for p in tmp_path.iterdir() if p not in keep)


# --------------------------------------------------------------------------- 5. bombs


def test_bomb_declared_size_refused_before_reading(tmp_path, capsys, monkeypatch):
    import nofc.cli

    monkeypatch.setattr(nofc.cli, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    bomb = bomb_tiff(tmp_path / "bomb.tif")
    strips = bomb_tiff(tmp_path / "strips.tif", tiled=False)  # tifffile logs about it: quiet
    png = bomb_png(tmp_path / "bomb.png")
    for image in (bomb, strips, png):
        one_error(capsys, ["heatmap", *LENET, str(image), "-o", str(tmp_path / "h.png")],
                  "declares 1000000x1000000 pixels", "(1,000,000 Mpix), more than the limit of 100,000 Mpix",
                  "--max-pixels 1000000000000")
        with pytest.raises(NofcError, match="declares 1000000x1000000 pixels"):
            nofc.open_source(image)
    assert written(tmp_path, bomb, strips, png) == []


def test_max_pixels_option(tmp_path, capsys):
    image = gray_tiff(tmp_path / "a.tif", (64, 80), tile=16)
    with pytest.raises(NofcError, match=r"declares 64x80 pixels .* --max-pixels 5120"):
        nofc.open_source(image, max_pixels=5000)
    assert nofc.open_source(image, max_pixels=5120).hw == (64, 80)
    assert nofc.open_source(image, max_pixels=None).hw == (64, 80)
    with pytest.raises(NofcError, match="max_pixels must be a positive number"):
        nofc.open_source(image, max_pixels=0)
    one_error(capsys, ["heatmap", *LENET, str(image), "-o", str(tmp_path / "h.png"),
                       "--max-pixels", "4e3"], "declares 64x80 pixels")


def test_missing_tiles_are_an_error_not_zeros(tmp_path, capsys):
    bomb = bomb_tiff(tmp_path / "bomb.tif")
    src = nofc.open_source(bomb, max_pixels=None)
    assert (src.read(slice(0, 16), slice(0, 32)) == 7).all()  # the tiles the file holds
    with pytest.raises(BadRegion, match=r"at rows 0..32, columns 0..32: tile \(1, 0\) is not "
                                        r"in the file \(the header declares 3906250000 tiles, "
                                        r"the file holds 4"):
        src.read(slice(0, 32), slice(0, 32))
    # within the limit (a 4096x4096 header on 32x32 pixels): one line, not a map of zeros
    forged = bomb_tiff(tmp_path / "forged.tif", 4096, 4096)
    one_error(capsys, ["heatmap", *LENET, str(forged), "-o", str(tmp_path / "h.png")],
              "cannot read TIFF", "is not in the file", "forged header")
    assert written(tmp_path, bomb, forged) == []


def test_reads_beyond_memory_refused_before_allocating(tmp_path, capsys):
    bomb = bomb_tiff(tmp_path / "bomb.tif")
    src = nofc.open_source(bomb, max_pixels=None)
    with pytest.raises(NofcError, match=r"reading TIFF .*bomb.tif at rows 0..end, columns "
                                        r"0..end \(1000000x1000000 pixels\) needs 931.32 GiB "
                                        r"of memory and .* is available; read it in tiles"):
        src.read(slice(None), slice(None))
    # the limit raised: the map would not fit in memory; said before any tile is computed
    code = main(["heatmap", *LENET, str(bomb), "-o", str(tmp_path / "h.png"),
                 "--max-pixels", "1e13"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("nofc: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "the map (10x249993x249993 float32) in memory needs 2.27 TiB" in errors[0]
    assert "--out map.zarr" in errors[0]
    png = bomb_png(tmp_path / "big.png", 300_000, 300_000)
    with pytest.raises(NofcError, match=r"decoding .*big.png \(300000x300000 pixels; PNG and "
                                        r"JPEG are read whole\) needs"):
        nofc.open_source(png)
    assert written(tmp_path, bomb, png) == []


def test_tiff_reader_matches_tifffile(tmp_path):
    """The region reader (tifffile's decoder, tile by tile) against tifffile.imread."""
    rng = np.random.default_rng(3)
    cases = [((70, 45), dict(tile=(16, 32))), ((70, 45), dict(rowsperstrip=9)),
             ((70, 45, 3), dict(tile=(32, 16), photometric="rgb")),
             ((3, 70, 45), dict(tile=(16, 16), photometric="rgb", planarconfig="separate")),
             ((3, 70, 45), dict(photometric="rgb", planarconfig="separate", rowsperstrip=4))]
    for i, (shape, kw) in enumerate(cases):
        for dtype in (np.uint8, np.uint16, np.float32):
            a = (rng.random(shape) * 200).astype(dtype)
            path = tmp_path / f"{i}_{np.dtype(dtype).name}.tif"
            tifffile.imwrite(path, a, compression="zlib", **kw)
            src = nofc.open_source(path)
            want = np.asarray(tifffile.imread(path))
            want = want if want.ndim == 2 or src.layout == "chw" else np.moveaxis(want, -1, 0)
            want = want[None] if want.ndim == 2 else want
            for rows, cols in [(slice(None), slice(None)), (slice(5, 50), slice(3, 45)),
                               (slice(None, None, 7), slice(1, None, 5))]:
                got = src.read(rows, cols)
                assert got.dtype == want.dtype
                np.testing.assert_array_equal(got, want[:, rows, cols])


# --------------------------------------------------------------------------- 6. arguments


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_workers_refused_before_anything(tmp_path, capsys, monkeypatch, workers):
    import nofc.cli

    monkeypatch.setattr(nofc.cli, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    image = gray_tiff(tmp_path / "a.tif")
    one_error(capsys, ["heatmap", *LENET, str(image), "-o", str(tmp_path / "h.png"),
                       "--workers", workers],
              f"workers must be a positive number of processes, got {workers}")
    assert written(tmp_path, image) == []


def test_outputs_refused_before_computing(tmp_path, capsys, monkeypatch):
    import nofc.cli
    import nofc.conversion

    monkeypatch.setattr(nofc.conversion, "convert", lambda *a, **k: pytest.fail("computed"))
    monkeypatch.setattr(nofc.cli, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    image = gray_tiff(tmp_path / "a.tif")
    png = str(tmp_path / "h.png")
    missing = tmp_path / "missing_folder"
    cases = [(["-o", str(missing / "heat.png")], "folder"),
             (["-o", png, "--out", str(missing / "m.zarr")], "folder"),
             (["-o", png, "--scores", str(missing / "s.npz")], "folder"),
             (["-o", png, "--out", png], "unknown output suffix '.png'")]
    for args, needle in cases:
        one_error(capsys, ["heatmap", *LENET, str(image), *args], needle)
    from nofc.heatmap import heatmap

    with pytest.raises(NofcError, match="-o and --out are the same file"):
        heatmap(LeNet5(), image, (1, 32, 32), png, out=png)
    assert written(tmp_path, image) == []


def test_unwritable_output_folder(tmp_path, capsys, monkeypatch):
    """A read-only folder (simulated: root writes anywhere but on a read-only mount)."""
    import nofc.errors

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(nofc.errors.tempfile, "TemporaryFile", refuse)
    image = gray_tiff(tmp_path / "a.tif")
    one_error(capsys, ["heatmap", *LENET, str(image), "-o", str(tmp_path / "h.png")],
              "is not writable (Read-only file system)")
    assert written(tmp_path, image) == []


# --------------------------------------------------------------------------- 7. no noise


def test_no_asyncio_noise_after_a_one_line_error(tmp_path):
    """A truncated TIFF read whole, in real processes (the noise came at interpreter exit)."""
    image = gray_tiff(tmp_path / "big.tif", (1024, 1024))
    data = image.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 3])
    env = {**os.environ, "PYTHONPATH": SRC}
    res = subprocess.run([sys.executable, "-m", "nofc.cli", "heatmap", *LENET, str(cut), "-o",
                          str(tmp_path / "h.png")], capture_output=True, text=True, env=env)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nofc: error: cannot read TIFF {cut}"), \
        res.stderr[:2000]
    res = subprocess.run([sys.executable, "-c", "import sys, nofc\n"
                          "from nofc.sources import load_image\ntry:\n"
                          f"    load_image({str(cut)!r}, channels=1)\n"
                          "except nofc.NofcError as e:\n    print(e, file=sys.stderr)"],
                         capture_output=True, text=True, env=env)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "while decompressing data" in lines[0], res.stderr[:2000]
    # a forged strip count: tifffile logs "incorrect StripOffsets count" unless quietened
    strips = bomb_tiff(tmp_path / "strips.tif", tiled=False)
    res = subprocess.run([sys.executable, "-m", "nofc.cli", "heatmap", *LENET, str(strips),
                          "-o", str(tmp_path / "h.png")], capture_output=True, text=True, env=env)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "declares 1000000x1000000" in lines[0], \
        res.stderr[:2000]
    assert not (tmp_path / "h.png").exists()


# --------------------------------------------------------------------------- 8. models


FLAKY = """
import torch.fx
from nofc.zoo import LeNet5


@torch.fx.wrap
def guard(x):
    if x.shape[-1] > 150:
        raise RuntimeError(f"input of width {x.shape[-1]} is too wide for this kernel\\nmore")
    return x


class Flaky(LeNet5):
    def forward(self, x):
        return super().forward(guard(x))


def build():
    return Flaky()
"""


@pytest.mark.parametrize("tile", [None, "192"])
def test_model_that_raises_is_one_line(tmp_path, capsys, tile):
    (tmp_path / "flaky.py").write_text(FLAKY)
    image = gray_tiff(tmp_path / "a.tif")
    argv = ["heatmap", f"{tmp_path / 'flaky.py'}:build", "--input-size", "1x32x32",
            str(image), "-o", str(tmp_path / "h.png")] + (["--tile", tile] if tile else [])
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("nofc: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    # the whole image as one tile, or a band of it (all its width)
    size = "1x1x256x256" if tile is None else r"1x1x\d+x256"
    assert re.search(f"the model Flaky failed on an input of {size} \\(float32 on cpu\\): "
                     "RuntimeError: input of width 256 is too wide for this kernel; nofc "
                     "--debug \\(or NOFC_DEBUG=1\\) shows the traceback", errors[0]), errors[0]
    if tile is None:
        assert len(err.strip().splitlines()) == 1
    assert written(tmp_path, image, tmp_path / "flaky.py") == []


@pytest.mark.parametrize("how", ["flag", "flag after", "env"])
def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch, how):
    (tmp_path / "flaky.py").write_text(FLAKY)
    image = gray_tiff(tmp_path / "a.tif")
    argv = ["heatmap", f"{tmp_path / 'flaky.py'}:build", "--input-size", "1x32x32",
            str(image), "-o", str(tmp_path / "h.png")]
    if how == "env":
        monkeypatch.setenv("NOFC_DEBUG", "1")
    argv = ["--debug", *argv] if how == "flag" else argv + ["--debug"] if how == "flag after" \
        else argv
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):"
    assert any("raise RuntimeError" in line for line in err)  # the model's own line
    assert err[-1].startswith("nofc: error: the model Flaky failed")


# --------------------------------------------------------------------------- 9. smaller


def test_nan_inf_and_non_numbers_refused(tmp_path, capsys):
    image = gray_tiff(tmp_path / "a.tif")
    png = str(tmp_path / "h.png")
    one_error(capsys, ["heatmap", *LENET, str(image), "-o", png, "--std", "nan"],
              "--std must be finite numbers, got [nan]")
    one_error(capsys, ["heatmap", *LENET, str(image), "-o", png, "--mean", "inf"],
              "--mean must be finite numbers, got [inf]")
    with pytest.raises(NofcError, match="--mean must be numbers, got 'abc'"):
        nofc.Normalize(mean="abc")
    with pytest.raises(NofcError, match="scale must be a positive finite number, got nan"):
        nofc.Normalize(scale=float("nan"))
    objects = np.empty((64, 64), dtype=object)
    objects[:] = 1
    fcn = nofc.convert(LeNet5(), (1, 32, 32))
    for run in (lambda: nofc.dense_predict(fcn, objects, (1, 32, 32)),
                lambda: nofc.tiled_predict(fcn, objects, (1, 32, 32), tile=64, progress=False)):
        with pytest.raises(NofcError, match="image pixels must be numbers .* got dtype object"):
            run()
    assert written(tmp_path, image) == []


def test_tiff_pages_that_disagree_say_which_is_read(tmp_path, capsys):
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.zeros((64, 64), np.uint8), metadata=None)
        tif.write(np.full((128, 96), 200, np.uint8), metadata=None)
    assert main(["heatmap", *LENET, str(path), "-o", str(tmp_path / "h.png")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"nofc: warning: {path} holds 2 images of different shapes (page 0: 64x64, "
                   "page 1: 128x96); reading the first, page 0 (64x64); save the one you want "
                   "as a TIFF of its own"]
    with pytest.warns(UserWarning, match="reading the first, page 0"):
        assert nofc.open_source(path).hw == (64, 64)


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_with_os_system_refused(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    weights = tmp_path / "w.pt"
    torch.save({"conv1.weight": _System(marker)}, weights)
    line = one_error(capsys, ["explain", *LENET, "--weights", str(weights)],
                     "holds pickled Python objects (posix.system), refused")
    assert "weights_only=False" not in line and "will likely succeed" not in line
    assert not marker.exists()


def test_dask_run_prints_no_dashboard_port(tmp_path, capsys):
    """A local cluster with 8787 taken: no 'Port 8787 is already in use' (no dashboard asked)."""
    taken = socket.socket()
    try:
        taken.bind(("", 8787))
        taken.listen()
    except OSError:
        pass  # already in use by something else: the same situation
    try:
        image = gray_tiff(tmp_path / "a.tif", (128, 128))
        code = main(["heatmap", *LENET, str(image), "-o", str(tmp_path / "h.png"),
                     "--workers", "1"])
    finally:
        taken.close()
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "8787" not in cap.err and "already in use" not in cap.err, cap.err


def test_os_and_memory_errors_are_one_line(tmp_path, capsys, monkeypatch):
    """Failures of the machine, not of nofc: one line, exit 2 (the traceback with --debug)."""
    import nofc.cli

    image = gray_tiff(tmp_path / "a.tif")
    for exc, line in ((PermissionError(errno.EACCES, "Permission denied", "m.pt"),
                       "nofc: error: PermissionError: [Errno 13] Permission denied: 'm.pt'"),
                      (MemoryError("Unable to allocate 9.00 TiB"),
                       "nofc: error: MemoryError: Unable to allocate 9.00 TiB")):
        def fail(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(nofc.cli, "load_model", fail)
        assert one_error(capsys, ["heatmap", *LENET, str(image), "-o",
                                  str(tmp_path / "h.png")]) == line
    assert written(tmp_path, image) == []


def test_sliding_window_model_that_raises(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise ValueError("no\nmore")

    with pytest.raises(NofcError, match=r"^the model Broken failed on an input of 1x1x32x32 "
                                        r"\(float32 on cpu\): ValueError: no; nofc --debug"):
        nofc.sliding_window_predict(Broken(), torch.randn(1, 40, 40), (1, 32, 32))
