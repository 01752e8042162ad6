"""nofc view: the files it serves, the inputs it refuses, and the page in a real browser.

The fixture is a 1024x1536 gray TIFF with a bright 128x128 square at rows 448..576,
columns 832..960, and a tiny classifier (4x4 average pooling, then a Linear on the 16 pooled
values) whose class 1, "bright", fires on bright 16x16 windows: its map (stride 4) is hot
exactly over the square. The browser tests drive headless Chromium through selenium
(Debian's chromium and chromium-driver); without them they are skipped, and `make test`
says so.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import nofc
from nofc.cli import main
from nofc.sinks import ZarrOutput
from nofc.viewer import export_viewer, serve
from nofc.viewer.server import OSD_VERSION, STATIC
from nofc.scores import probabilities as softmax
from nofc.viewer.tiles import decode

SQUARE = (448, 576, 832, 960)  # y0, y1, x0, x1 of the bright square
HOT_CELL = (126, 222)  # the cell whose window is centred on the square's centre (512, 896)
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


class Bright(nn.Module):
    """Class 1 ("bright") when the 16x16 window's mean brightness is above 1/2."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(4)
        self.fc = nn.Linear(16, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.stack([-2 * torch.ones(16), 2 * torch.ones(16)]))
            self.fc.bias.copy_(torch.tensor([16.0, -16.0]))

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(x), 1))


def _make_store(folder: Path, *, record_image: bool = True) -> tuple[Path, Path]:
    import tifffile

    rng = np.random.default_rng(0)
    img = (40 + 30 * rng.random((1024, 1536))).astype(np.uint8)
    img[::64, :] = 90  # a grid, so the image itself has something to see
    img[:, ::64] = 90
    y0, y1, x0, x1 = SQUARE
    img[y0:y1, x0:x1] = 250
    tif = folder / "square.tif"
    tifffile.imwrite(tif, img, tile=(256, 256))
    fcn = nofc.convert(Bright().eval(), (1, 16, 16))
    store = folder / "square.zarr"
    # tiled_predict records the image it read; None says: record none
    meta = {"classes": ["background", "bright"], "image": str(tif) if record_image else None}
    nofc.tiled_predict(fcn, str(tif), (1, 16, 16), tile=512, progress=False,
                       out=ZarrOutput(str(store), metadata=meta))
    return tif, store


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    folder = tmp_path_factory.mktemp("view")
    tif, store = _make_store(folder)
    return folder, tif, store


@contextlib.contextmanager
def _running(server):
    """A ViewerServer serving in a thread; shut down on exit."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


@pytest.fixture(scope="module")
def served(made):
    _, _, store = made
    with _running(serve(store)) as url:
        yield url


# --------------------------------------------------------------------------- the files


def test_info_lists_top_class_first_and_places_the_overlay(served):
    status, body = _get(served + "info.json")
    info = json.loads(body)
    assert status == 200
    assert [c["name"] for c in info["classes"]] == ["background", "bright"]  # peaks 1.0, 1.0
    assert (info["map"]["height"], info["map"]["width"]) == (253, 381)
    assert info["overlay"] == {"x": 6.0, "y": 6.0, "cell": 4}  # centre 8, minus step / 2
    assert (info["image"]["width"], info["image"]["height"]) == (1536, 1024)
    assert info["image"]["format"] == "jpeg" and info["image"]["stretch"] is None  # 8-bit


def test_overlay_tiles_hold_the_softmax_of_the_scores(made, served):
    import zarr

    _, _, store = made
    scores = np.asarray(zarr.open_array(str(store), mode="r")[:])
    status, png = _get(served + "overlay/1_files/9/0_0.png")  # level 9: a pixel per cell
    from PIL import Image

    codes = np.asarray(Image.open(io.BytesIO(png)))
    assert status == 200 and codes.shape == (253, 256)
    np.testing.assert_allclose(decode(codes), softmax(scores)[1, :, :256], atol=0.5 / 254)
    assert decode(codes)[HOT_CELL] > 0.99 and decode(codes)[10, 10] < 0.01


def test_image_tiles_are_the_image_and_its_means(made, served):
    import tifffile
    from PIL import Image

    _, tif, _ = made
    img = tifffile.imread(tif).astype(np.float32)
    full = np.asarray(Image.open(io.BytesIO(_get(served + "image_files/11/5_3.jpeg")[1])))
    assert full.shape == (256, 256)  # the bottom-right tile of 1536x1024
    assert np.abs(full.astype(np.float32) - img[768:, 1280:]).mean() < 5  # JPEG, noise
    half = np.asarray(Image.open(io.BytesIO(_get(served + "image_files/10/0_0.jpeg")[1])))
    means = img[:512, :512].reshape(256, 2, 256, 2).mean(axis=(1, 3))
    assert half.shape == (256, 256) and np.abs(half - means).mean() < 5


def test_readout_tiles_rank_the_classes(served):
    raw = _get(served + "cells/0_1.bin")[1]  # cells 0..127, 128..255
    n, th, tw = 2, 128, 128
    index = np.frombuffer(raw[:2 * n * th * tw], "<u2").reshape(n, th, tw)
    prob = np.frombuffer(raw[2 * n * th * tw:], "<u2").reshape(n, th, tw) / 65535
    assert index[0][126, 94] == 1 and prob[0][126, 94] > 0.99
    assert index[0][10, 10] == 0 and (prob[0] >= prob[1]).all()


@pytest.mark.parametrize("path", [
    "..%2f..%2fetc%2fpasswd", "%2e%2e/%2e%2e/etc/passwd", "../../etc/passwd",
    "static/../viewer.js", "openseadragon/..%2f..%2fserver.py", "image_files/09/0_0.jpeg",
    "image_files/99/0_0.jpeg", "overlay/2.dzi", "overlay/1_files/9/5_5.png", "cells/9_9.bin",
    "square.zarr/zarr.json", "viewer.js/", "%2fetc%2fpasswd",
])
def test_only_its_own_files_are_served(served, path):
    assert _get(served + path)[0] == 404


def test_static_files_and_vendored_openseadragon(served):
    for name in ("", "index.html", "viewer.js", "viewer.css", "openseadragon/LICENSE.txt",
                 "openseadragon/images/home_rest.png", "image.dzi", "overlay/0.dzi"):
        assert _get(served + name)[0] == 200, name
    head = (STATIC / "openseadragon" / "openseadragon.min.js").read_text()[:40]
    assert f"openseadragon {OSD_VERSION}" in head  # the version VENDOR.txt names


# --------------------------------------------------------------------------- bad input


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nofc: error: ") and "\n" not in err
    return err


def test_refuses_what_is_not_a_nofc_map(tmp_path, capsys):
    import zarr

    assert "not found" in _error(["view", str(tmp_path / "nothing.zarr")], capsys)
    assert "is not a nofc map" in _error(["view", str(tmp_path)], capsys)
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=(2, 3, 4), dtype="f4")
    err = _error(["view", str(tmp_path / "plain.zarr")], capsys)
    assert "without nofc's attributes" in err


def test_missing_image_names_the_path_and_image_overrides(tmp_path, capsys):
    tif, store = _make_store(tmp_path)
    moved = tmp_path / "moved.tif"
    tif.rename(moved)
    err = _error(["view", str(store)], capsys)
    assert str(tif) in err and "nofc view" in err and "IMAGE" in err
    with _running(serve(store, moved)) as url:  # IMAGE points to the moved file
        assert _get(url + "image_files/0/0_0.jpeg")[0] == 200
    assert "image file not found" in _error(["view", str(store), str(tmp_path / "x.tif")],
                                            capsys)


def test_store_without_image_path_asks_for_it(tmp_path, capsys):
    _, store = _make_store(tmp_path, record_image=False)
    assert "does not record which image" in _error(["view", str(store)], capsys)


def test_image_of_another_size_is_refused(made, tmp_path, capsys):
    import tifffile

    _, _, store = made
    tifffile.imwrite(tmp_path / "small.tif", np.zeros((100, 100), np.uint8))
    err = _error(["view", str(store), str(tmp_path / "small.tif")], capsys)
    assert "is 100x100 but" in err and "1024x1536" in err


def test_port_in_use(made, capsys):
    _, _, store = made
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        err = _error(["view", str(store), "--port", str(port)], capsys)
    assert f"port {port} on 127.0.0.1 is in use" in err


def test_export_refuses_to_overwrite(made, tmp_path, capsys):
    _, _, store = made
    (tmp_path / "out").mkdir()
    assert "exists; pass --force" in _error(["view", str(store), "--export",
                                             str(tmp_path / "out")], capsys)


# --------------------------------------------------------------------------- the browser


def _browser_missing() -> str | None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        return (f"browser tests skipped: {', '.join(missing)} missing (apt-get install -y "
                "chromium chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "browser tests skipped: selenium is not installed (pip install 'nofc[test]')"
    return None


browser_test = pytest.mark.skipif(_browser_missing() is not None,
                                  reason=_browser_missing() or "")
TIMEOUT = 20  # seconds for the page to report that it is ready


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _subprocess_server(argv: list[str], ready: str):
    """A server in a subprocess, until the line that says it is up; killed on exit."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, seen = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            seen.append(line)
            if ready in line or proc.poll() is not None:
                break
        assert proc.poll() is None, "server exited: " + "".join(seen)
        yield line
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


@pytest.fixture(scope="module")
def live(made):
    """``nofc view`` in a subprocess, on a free loopback port."""
    _, _, store = made
    argv = [sys.executable, "-m", "nofc.cli", "view", str(store)]
    with _subprocess_server(argv, "http://127.0.0.1:") as line:
        yield line.split(" at ")[1].split()[0]


@pytest.fixture(scope="module")
def exported(made, tmp_path_factory):
    """The static export, served by a plain ``python -m http.server``."""
    _, _, store = made
    out = tmp_path_factory.mktemp("export") / "site"
    assert main(["view", str(store), "--export", str(out)]) == 0
    port = _port()
    argv = [sys.executable, "-u", "-m", "http.server", str(port), "--bind", "127.0.0.1",
            "--directory", str(out)]
    with _subprocess_server(argv, "Serving HTTP"):
        yield f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,700", "--force-device-scale-factor=1",
                "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    d.set_page_load_timeout(TIMEOUT)
    try:
        yield d
    finally:
        d.quit()


def _wait_ready(driver) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, TIMEOUT, poll_frequency=0.05).until(
        lambda d: d.execute_script("return window.nofcReady === true"))


def _open(driver, url: str) -> None:
    driver.get(url)
    _wait_ready(driver)


def _shot(driver) -> np.ndarray:
    """The viewer's canvas as an (h, w, 3) array (the panel cropped off)."""
    from PIL import Image

    png = driver.get_screenshot_as_png()
    rect = driver.execute_script("return document.getElementById('osd').getBoundingClientRect()"
                                 ".toJSON()")
    arr = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    return arr[int(rect["top"]):int(rect["bottom"]), int(rect["left"]):int(rect["right"])]


def _to_screen(driver, y: float, x: float) -> tuple[float, float]:
    """Image pixel (y, x) to the viewer element's pixel (row, column)."""
    p = driver.execute_script(
        "const v = window.nofc.viewer, W = window.nofc.info.image.width;"
        "const p = v.viewport.pixelFromPoint(new OpenSeadragon.Point(arguments[1] / W, "
        "arguments[0] / W), true); return [p.y, p.x];", y, x)
    return p[0], p[1]


def _coloured(driver, shot: np.ndarray) -> np.ndarray:
    """Pixels with colour in the main view: the image is gray, so these are the overlay's
    (the navigator, the small overview in the corner, is left out)."""
    out = (shot.max(axis=2) - shot.min(axis=2)) > 40
    nav = driver.execute_script("const v = window.nofc.viewer, o = v.element"
                                ".getBoundingClientRect(), n = v.navigator.element"
                                ".getBoundingClientRect(); return [n.top - o.top, "
                                "n.bottom - o.top, n.left - o.left, n.right - o.left];")
    t, b, l, r = (int(round(v)) for v in nav)
    out[max(t, 0):b, max(l, 0):r] = False
    return out


def _show_class(driver, k: int) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", "class")).select_by_value(str(k))
    _wait_ready(driver)


def _set_range(driver, element_id: str, value: float) -> None:
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input'));", element_id, value)
    _wait_ready(driver)


def _console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


@browser_test
def test_overlay_lines_up_with_the_hot_region(driver, live):
    _open(driver, live)
    _show_class(driver, 1)
    shot = _shot(driver)
    y0, y1, x0, x1 = SQUARE
    cy, cx = _to_screen(driver, (y0 + y1) / 2, (x0 + x1) / 2)
    far_y, far_x = _to_screen(driver, 40, 40)
    hot, cold = shot[int(cy), int(cx)], shot[int(far_y), int(far_x)]
    assert np.abs(hot - cold).sum() > 100, (hot, cold)
    _set_range(driver, "threshold", 0.5)  # only the cells that say "bright" stay coloured
    rows, cols = np.nonzero(_coloured(driver, _shot(driver)))
    assert rows.size, "no overlay pixels above the threshold"
    (top, left), (bottom, right) = _to_screen(driver, y0, x0), _to_screen(driver, y1, x1)
    cell = _to_screen(driver, 4, 4)[0] - _to_screen(driver, 0, 0)[0]  # one step on screen
    for seen, expected in ((rows.min(), top), (rows.max() + 1, bottom), (cols.min(), left),
                           (cols.max() + 1, right)):
        assert abs(seen - expected) <= cell + 1, (seen, expected, cell)
    assert not _console_errors(driver)


@browser_test
def test_hover_shows_cell_window_and_classes(driver, live):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _open(driver, live)
    osd = driver.find_element(By.ID, "osd")
    cy, cx = _to_screen(driver, 512.5, 896.5)
    size = osd.size
    ActionChains(driver).move_to_element_with_offset(
        osd, int(cx - size["width"] / 2), int(cy - size["height"] / 2)).perform()
    WebDriverWait(driver, TIMEOUT).until(
        lambda d: "cell (" in d.find_element(By.ID, "readout").text)
    text = driver.find_element(By.ID, "readout").text
    i, j = HOT_CELL
    assert f"cell ({i}, {j})" in text
    assert f"window (y0, x0, y1, x1) = ({4 * i}, {4 * j}, {4 * i + 16}, {4 * j + 16})" in text
    assert text.splitlines()[2].endswith("bright") and text.splitlines()[2].startswith("1.000")
    at = re.fullmatch(r"at \(y, x\) = \((\d+), (\d+)\) level-0 px", text.splitlines()[-1])
    assert at and abs(int(at[1]) - 512) <= 3 and abs(int(at[2]) - 896) <= 3  # a screen pixel


@browser_test
def test_class_and_opacity_change_the_pixels(driver, live):
    _open(driver, live)
    y0, y1, x0, x1 = SQUARE
    cy, cx = (int(v) for v in _to_screen(driver, (y0 + y1) / 2, (x0 + x1) / 2))
    first = _shot(driver)
    _show_class(driver, 1)
    second = _shot(driver)
    assert np.abs(first[cy, cx] - second[cy, cx]).sum() > 60  # bright <-> background
    _set_range(driver, "opacity", 0.1)
    third = _shot(driver)
    assert np.abs(third[cy, cx] - second[cy, cx]).sum() > 60
    _set_range(driver, "opacity", 0.0)  # the overlay gone: the bright square itself
    assert (_shot(driver)[cy, cx] > 240).all()
    assert not _console_errors(driver)


@browser_test
def test_zoom_fetches_deeper_tiles(driver, live):
    size = driver.get_window_size()
    driver.set_window_size(600, 400)  # the whole image on about 300 pixels: level 9 of 11
    try:
        _open(driver, live)
    finally:
        driver.set_window_size(size["width"], size["height"])
    _show_class(driver, 1)
    before = driver.execute_script("return JSON.stringify(window.nofc.maxLevel)")
    driver.execute_script(  # zoom onto one 16x16 window of the square
        "const W = window.nofc.info.image.width; window.nofc.viewer.viewport.fitBounds("
        "new OpenSeadragon.Rect(888 / W, 504 / W, 16 / W, 16 / W), true); window.nofc.settle();")
    _wait_ready(driver)
    levels = json.loads(driver.execute_script("return JSON.stringify(window.nofc.maxLevel)"))
    assert levels["image"] == 11 and levels["overlay"] == 9, (before, levels)  # full sizes
    assert json.loads(before)["image"] < 11
    shot = _shot(driver)
    assert shot.shape[0] > 100 and _coloured(driver, shot).mean() > 0.9  # one cell fills the view
    assert not _console_errors(driver)


@browser_test
def test_static_export_shows_the_same(driver, live, exported):
    shots = []
    for url in (live, exported):
        _open(driver, url)
        _show_class(driver, 1)
        shots.append(_shot(driver))
    assert shots[0].shape == shots[1].shape
    assert np.abs(shots[0] - shots[1]).mean() < 0.5
    assert not _console_errors(driver)


# --------------------------------------------------------------------------- every map
# A 3-level pyramidal TIFF slide (0.25 um per pixel at level 0) of the same picture, maps
# computed at level 1 (a zarr store and a GeoTIFF), and a uint16 UTM scene with a nodata
# strip and its maps: the viewer shows each over its image at full resolution.

MPP = 0.25
SCENE_T = (10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0)  # 10 m pixels, UTM 33N
SCENE_SQUARE = (200, 328, 400, 528)


def _picture() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = (40 + 30 * rng.random((1024, 1536))).astype(np.uint8)
    img[::64, :] = 90
    img[:, ::64] = 90
    y0, y1, x0, x1 = SQUARE
    img[y0:y1, x0:x1] = 250
    return img


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    """``{name: path}``: the slide, its level-1 maps, the scene and its maps."""
    pytest.importorskip("openslide")
    rasterio = pytest.importorskip("rasterio")
    import tifffile
    from affine import Affine

    from nofc.sinks import GeoTiffOutput
    from nofc.sources import open_source

    d = tmp_path_factory.mktemp("maps")
    rgb = np.repeat(_picture()[..., None], 3, axis=-1)
    with tifffile.TiffWriter(d / "slide.tif") as tw:
        for k in range(3):
            res = 1e4 / (MPP * 2 ** k)
            tw.write(rgb[:: 2 ** k, :: 2 ** k], tile=(64, 64), photometric="rgb",
                     compression="zlib", resolution=(res, res), resolutionunit="CENTIMETER",
                     subfiletype=0 if k == 0 else 1)
    rng = np.random.default_rng(1)
    scene = (20000 + 3000 * rng.random((600, 800))).astype(np.uint16)
    y0, y1, x0, x1 = SCENE_SQUARE
    scene[y0:y1, x0:x1] = 40000
    scene[:, :100] = 0  # nodata
    with rasterio.open(d / "scene.tif", "w", driver="GTiff", height=600, width=800, count=1,
                       dtype="uint16", crs="EPSG:32633", transform=Affine(*SCENE_T),
                       tiled=True, blockxsize=256, blockysize=256, nodata=0) as dst:
        dst.write(scene[None])
    fcn = nofc.convert(Bright().eval(), (1, 16, 16))
    meta = {"classes": ["background", "bright"]}
    out = {"slide": d / "slide.tif", "scene": d / "scene.tif", "scene_array": scene}
    for name, image in (("l1", lambda: open_source(str(d / "slide.tif"), level=1,
                                                   channels=1)),
                        ("mpp", lambda: open_source(str(d / "slide.tif"), mpp=0.6,
                                                    channels=1)),
                        ("scene", lambda: str(d / "scene.tif"))):
        for suffix, output in ((".zarr", ZarrOutput), (".tif", GeoTiffOutput)):
            path = d / f"{name}_map{suffix}"
            nofc.tiled_predict(fcn, image(), (1, 16, 16), tile=256, progress=False,
                               out=output(str(path), metadata=meta))
            out[f"{name}{suffix}"] = path
    return out


def test_level_1_map_is_drawn_over_level_0_in_level_0_pixels(maps):
    import rasterio

    from nofc.viewer.server import Viewer, open_result

    zarr_info = Viewer(open_result(maps["l1.zarr"])).info
    # the GeoTIFF sink's affine, read back by rasterio: the reference for where cells lie
    with rasterio.open(maps["l1.tif"]) as ds:
        t = ds.transform
    assert (zarr_info["image"]["width"], zarr_info["image"]["height"]) == (1536, 1024)
    assert zarr_info["overlay"] == {"x": t.c, "y": t.f, "cell": t.a} == \
        {"x": 12.0, "y": 12.0, "cell": 8.0}  # level-1 centre 8 -> 16, minus 8 / 2
    assert zarr_info["coords"] == {"kind": "slide", "unit": "µm", "per_pixel": MPP}
    assert zarr_info["map"]["downsample"] == 2.0 and zarr_info["image"]["level"] == 0
    tif_info = Viewer(open_result(maps["l1.tif"])).info
    assert tif_info["overlay"] == zarr_info["overlay"] and tif_info["coords"] == \
        zarr_info["coords"]
    # a map at 0.6 um per pixel: 2.4 level-0 pixels per pixel read, resampled from level 1
    mpp = [Viewer(open_result(maps[k])).info["overlay"] for k in ("mpp.zarr", "mpp.tif")]
    with rasterio.open(maps["mpp.tif"]) as ds:
        t = ds.transform
    for overlay in mpp:
        assert overlay == pytest.approx({"x": t.c, "y": t.f, "cell": t.a}, rel=1e-12)
    assert mpp[0]["cell"] == pytest.approx(4 * 2.4)
    shown = Viewer(open_result(maps["l1.zarr"], level=1)).info  # nofc view --level 1
    assert (shown["image"]["width"], shown["overlay"]) == (768, {"x": 6.0, "y": 6.0,
                                                                 "cell": 4.0})
    assert shown["coords"]["per_pixel"] == 2 * MPP


def test_geotiff_map_tiles_equal_the_store_and_the_class_view_is_the_argmax(maps, tmp_path):
    import rasterio
    import zarr
    from PIL import Image

    from nofc.viewer.server import Viewer, open_result

    scores = np.asarray(zarr.open_array(str(maps["l1.zarr"]), mode="r")[:])
    store, tif = (Viewer(open_result(maps[k])) for k in ("l1.zarr", "l1.tif"))
    top = store.map.pyramid.top  # a pixel per cell
    for name in (f"overlay/1_files/{top}/0_0.png", f"overlay/class_files/{top}/0_0.png"):
        a, b = (np.asarray(Image.open(io.BytesIO(v.get(name)[1]))) for v in (store, tif))
        np.testing.assert_array_equal(a, b)
    codes = np.asarray(Image.open(io.BytesIO(store.get(f"overlay/class_files/{top}/0_0.png")[1])))
    np.testing.assert_array_equal(codes, 1 + np.argmax(scores, axis=0)[:, :256])
    # a band described "class" is the class view, not one more class
    with rasterio.open(maps["l1.tif"]) as ds:
        profile, bands = ds.profile, ds.read()
    profile.update(count=3)
    with rasterio.open(tmp_path / "with_class.tif", "w", **profile) as dst:
        dst.write(np.concatenate([bands, np.zeros_like(bands[:1])]))  # class 0 everywhere
        dst.descriptions = ("background", "bright", "class")
        dst.update_tags(nofc=json.dumps({"image": {"path": str(maps["slide"]), "kind": "slide",
                                                   "shape": [512, 768],
                                                   "downsample": [2.0, 2.0]}}))
    banded = Viewer(open_result(tmp_path / "with_class.tif"))
    assert [c["name"] for c in banded.info["legend"]] == ["background", "bright"]
    assert banded.info["map"]["class_band"] is True
    codes = np.asarray(Image.open(io.BytesIO(banded.get(f"overlay/class_files/{top}/0_0.png")[1])))
    assert (codes == 1).all()  # the band's class 0, not the argmax


def test_scene_is_stretched_with_nodata_transparent_and_in_map_coordinates(maps):
    from PIL import Image

    from nofc.viewer.server import Viewer, open_result

    v = Viewer(open_result(maps["scene.tif"]))
    scene = maps["scene_array"]
    lo, hi = np.percentile(scene[scene != 0], [2, 98])  # the pixels with data
    assert v.info["image"]["format"] == "png"
    np.testing.assert_allclose([v.info["image"]["stretch"]["low"][0],
                                v.info["image"]["stretch"]["high"][0]], [lo, hi])
    gray, alpha = np.moveaxis(np.asarray(Image.open(io.BytesIO(
        v.get(f"image_files/{v.image.pyramid.top}/0_0.png")[1]))), -1, 0)
    raw = scene[:256, :256].astype(np.float64)
    want = np.clip((raw - lo) / (hi - lo), 0, 1) * 255
    valid = raw != 0
    np.testing.assert_array_equal(alpha, np.where(valid, 255, 0))
    assert np.abs(gray[valid] - want[valid]).max() <= 1
    coords = v.info["coords"]
    assert coords["crs"] == "EPSG:32633" and coords["unit"] == "m" and coords["per_pixel"] == 10
    assert coords["transform"] == list(SCENE_T)
    # the GeoTIFF's world affine and the store's pixel geometry put the cells in one place
    assert v.info["overlay"] == Viewer(open_result(maps["scene.zarr"])).info["overlay"]


def test_maps_that_do_not_fit_their_image_are_refused(maps, tmp_path, capsys):
    import tifffile

    tifffile.imwrite(tmp_path / "plain.tif", maps["scene_array"])  # no georeferencing
    err = _error(["view", str(maps["scene.tif"]), str(tmp_path / "plain.tif")], capsys)
    assert "in map coordinates but" in err and "not georeferenced" in err
    err = _error(["view", str(maps["scene.tif"]), str(maps["slide"])], capsys)
    assert "is 1024x1536 (level 0) but" in err and "600x800" in err
    err = _error(["view", str(maps["l1.zarr"]), "--level", "5"], capsys)
    assert "has levels 0..2" in err and "not level 5" in err
    err = _error(["view", str(maps["scene.tif"]), "--level", "1"], capsys)
    assert "--level 1 picks a level of a slide" in err and "scene.tif is not one" in err
    err = _error(["view", str(maps["slide"])], capsys)  # the image, not a map
    assert "is not a nofc map (3 bands of uint8, not one float band" in err
    tifffile.imwrite(tmp_path / "small.tif", np.zeros((100, 100, 3), np.uint8))
    err = _error(["view", str(maps["l1.tif"]), str(tmp_path / "small.tif")], capsys)
    assert "is 100x100 (level 0) but" in err and "1024x1536" in err
    (tmp_path / "notes.tif").write_text("not a raster")
    assert "is not a nofc map" in _error(["view", str(tmp_path / "notes.tif")], capsys)


@pytest.fixture(scope="module")
def served_maps(maps):
    """The viewers of the level-1 store, the level-1 GeoTIFF and the scene's GeoTIFF."""
    with contextlib.ExitStack() as stack:
        yield {k: stack.enter_context(_running(serve(maps[k])))
               for k in ("l1.zarr", "l1.tif", "scene.tif")}


def _aligned(driver, square, cell: float) -> None:
    """At threshold 0.5 the overlay's coloured pixels end within one cell (``cell`` image
    pixels) of ``square`` (y0, y1, x0, x1 in the image's pixels)."""
    _show_class(driver, 1)
    _set_range(driver, "threshold", 0.5)
    rows, cols = np.nonzero(_coloured(driver, _shot(driver)))
    assert rows.size, "no overlay pixels above the threshold"
    y0, y1, x0, x1 = square
    (top, left), (bottom, right) = _to_screen(driver, y0, x0), _to_screen(driver, y1, x1)
    on_screen = _to_screen(driver, cell, cell)[0] - _to_screen(driver, 0, 0)[0]
    for seen, expected in ((rows.min(), top), (rows.max() + 1, bottom), (cols.min(), left),
                           (cols.max() + 1, right)):
        assert abs(seen - expected) <= on_screen + 1, (seen, expected, on_screen)


def _hover(driver, y: float, x: float) -> str:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    osd = driver.find_element(By.ID, "osd")
    cy, cx = _to_screen(driver, y, x)
    ActionChains(driver).move_to_element_with_offset(
        osd, int(cx - osd.size["width"] / 2), int(cy - osd.size["height"] / 2)).perform()
    WebDriverWait(driver, TIMEOUT).until(
        lambda d: "cell (" in d.find_element(By.ID, "readout").text)
    return driver.find_element(By.ID, "readout").text


def _scale_bar(driver, per_pixel: float) -> dict:
    """The scale bar's state, checked against the view: its length in screen pixels times
    the units per screen pixel (from two image points on screen) is its label's value."""
    from selenium.webdriver.common.by import By

    scale = json.loads(driver.execute_script("return JSON.stringify(window.nofc.scale)"))
    bar = driver.find_element(By.CSS_SELECTOR, "#scalebar .bar")
    assert bar.is_displayed() and abs(bar.size["width"] - scale["px"]) <= 1
    per_screen = per_pixel * 1000 / (_to_screen(driver, 0, 1000)[1] - _to_screen(driver, 0, 0)[1])
    assert scale["px"] * per_screen == pytest.approx(scale["value"], rel=0.01)
    assert 40 <= scale["px"] <= 130
    return scale


@browser_test
def test_level_1_store_over_its_slide_with_scale_bar_and_microns(driver, served_maps):
    _open(driver, served_maps["l1.zarr"])
    assert driver.execute_script("return window.nofc.info.image.width") == 1536  # level 0
    _aligned(driver, SQUARE, cell=8)  # a level-1 cell: 8 level-0 pixels
    scale = _scale_bar(driver, MPP)
    assert re.fullmatch(r"[125]0* (µm|mm)", driver.find_element("id", "scalebar").text), scale
    text = _hover(driver, 512.5, 896.5)
    # cell (62, 110): (512 - 12) // 8, (896 - 12) // 8; its level-1 window (248, 440, 264,
    # 456) in level-0 pixels
    assert "cell (62, 110)\nwindow (y0, x0, y1, x1) = (496, 880, 528, 912)" in text
    at = re.search(r"level-0 px = \(([\d.]+), ([\d.]+)\) µm", text)
    assert at and abs(float(at[1]) - 512 * MPP) <= 1 and abs(float(at[2]) - 896 * MPP) <= 1
    driver.save_screenshot("/tmp/viewer_level1.png")
    assert not _console_errors(driver)


@browser_test
def test_geotiff_maps_open_aligned_with_a_legend(driver, served_maps):
    from selenium.webdriver.support.ui import Select

    _open(driver, served_maps["l1.tif"])
    _aligned(driver, SQUARE, cell=8)
    driver.save_screenshot("/tmp/viewer_geotiff.png")
    _open(driver, served_maps["scene.tif"])
    _aligned(driver, SCENE_SQUARE[:2] + SCENE_SQUARE[2:], cell=4)
    assert _scale_bar(driver, 10.0)["unit"] == "m"
    text = _hover(driver, 264.5, 464.5)
    at = re.fullmatch(r"at x = ([\d.]+), y = ([\d.]+) m \(EPSG:32633\)", text.splitlines()[-1])
    from affine import Affine

    x, y = Affine(*SCENE_T) @ (464.5, 264.5)  # the scene's own transform
    assert at and abs(float(at[1]) - x) <= 25 and abs(float(at[2]) - y) <= 25  # 2 screen px
    Select(driver.find_element("id", "class")).select_by_value("class")
    _wait_ready(driver)
    legend = driver.find_element("id", "legend")
    assert legend.is_displayed() and legend.text.splitlines()[1:] == ["background", "bright"]
    driver.save_screenshot("/tmp/viewer_scene.png")
    assert not _console_errors(driver)
