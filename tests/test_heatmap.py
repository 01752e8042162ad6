"""Images in every pixel format, heatmap PNGs, and `nofc heatmap`."""

import json

import numpy as np
import pytest
from PIL import Image

import nofc
from nofc import NofcError
from nofc.cli import main
from nofc.images import IMAGENET_MEAN, IMAGENET_STD, Normalize
from nofc.sources import load_image

RNG = np.random.default_rng(0)


def _save(path, arr, mode=None, **kw):
    im = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    im.save(path, **kw)
    return path


@pytest.fixture
def gray8():
    return RNG.integers(0, 256, (20, 30), dtype=np.uint8)


def test_gray_rgb_and_channel_matching(tmp_path, gray8):
    p = _save(tmp_path / "g.png", gray8)
    one = load_image(p, channels=1)
    assert one.shape == (1, 20, 30) and one.dtype == np.float32
    np.testing.assert_allclose(one[0], gray8 / 255.0, atol=1e-7)
    three = load_image(p, channels=3)
    assert three.shape == (3, 20, 30) and (three[0] == three[2]).all()
    rgb = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    q = _save(tmp_path / "c.jpg", rgb, quality=100)
    assert load_image(q).shape == (3, 20, 30)
    luma = load_image(_save(tmp_path / "c.png", rgb), channels=1)[0]
    np.testing.assert_allclose(luma, rgb @ np.array([0.299, 0.587, 0.114]) / 255, atol=1e-5)


def test_16_bit_png_and_tiff(tmp_path):
    a = RNG.integers(0, 65536, (12, 9), dtype=np.uint16)
    p = tmp_path / "d.png"
    Image.fromarray(a).save(p)
    np.testing.assert_allclose(load_image(p, channels=1)[0], a / 65535.0, atol=1e-6)
    import tifffile

    rgb16 = RNG.integers(0, 65536, (12, 9, 3), dtype=np.uint16)
    t = tmp_path / "e.tif"
    tifffile.imwrite(t, rgb16)
    np.testing.assert_allclose(load_image(t), np.moveaxis(rgb16, -1, 0) / 65535.0, atol=1e-6)
    f = tmp_path / "f.tiff"
    tifffile.imwrite(f, np.full((5, 6), 2.5, np.float32))
    assert load_image(f, channels=1).max() == 2.5  # floats are kept as stored


def test_alpha_palette_and_bilevel(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red
    rgba[:2, :, 3] = 255  # top half opaque, bottom half transparent
    img = load_image(_save(tmp_path / "a.png", rgba))
    assert img[:, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert img[:, 3, 0].tolist() == [1.0, 1.0, 1.0]  # over the white background
    black = load_image(tmp_path / "a.png", background=(0, 0, 0))
    assert black[:, 3, 0].tolist() == [0.0, 0.0, 0.0]
    pal = Image.fromarray(RNG.integers(0, 256, (6, 7, 3), dtype=np.uint8)).convert("P")
    pal.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").shape == (3, 6, 7)
    Image.fromarray(np.eye(5, dtype=bool)).save(tmp_path / "b.png")
    assert sorted(np.unique(load_image(tmp_path / "b.png", channels=1))) == [0.0, 1.0]


def test_image_errors(tmp_path):
    with pytest.raises(NofcError, match="not found"):
        load_image(tmp_path / "none.png")
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(NofcError, match="cannot read image"):
        load_image(tmp_path / "x.png")
    rgb = _save(tmp_path / "c.png", RNG.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    with pytest.raises(NofcError, match="3 colour channels and the network expects 2"):
        load_image(rgb, channels=2)
    with pytest.raises(NofcError, match="--std has 2 values and the image 3"):
        Normalize(std=(1, 2))(np.zeros((3, 2, 2), np.float32))
    with pytest.raises(NofcError, match="positive"):
        Normalize(std=(0,))


@pytest.mark.parametrize("bad, says", [
    (dict(std=float("nan")), "--std must be finite numbers, got \\[nan\\]"),
    (dict(mean=(0.5, float("inf"))), "--mean must be finite numbers"),
    (dict(mean="abc"), "--mean must be numbers, got 'abc'"),
    (dict(scale=float("nan")), "scale must be a positive finite number, got nan"),
    (dict(scale=0), "scale must be a positive finite number, got 0"),
])
def test_normalize_refuses_what_would_make_a_nan_map(bad, says):
    with pytest.raises(NofcError, match=f"^{says}"):
        Normalize(**bad)


def test_normalize():
    x = np.ones((3, 2, 2), np.float32)
    y = Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)(x)
    np.testing.assert_allclose(y[:, 0, 0], (1 - np.array(IMAGENET_MEAN)) / IMAGENET_STD,
                               rtol=1e-6)
    assert (Normalize(mean=0.5, std=2.0)(x) == 0.25).all()
    u8 = np.full((1, 2, 2), 255, np.uint8)  # integers are scaled to [0, 1] first
    assert (Normalize()(u8) == 1).all() and (Normalize(scale=2.0)(u8) == 510).all()


def _png_size(path):
    with Image.open(path) as im:
        return im.format, im.size


def test_cli_heatmap_lenet(tmp_path, capsys):
    img = _save(tmp_path / "page.png", RNG.integers(0, 256, (48, 60), dtype=np.uint8))
    out, scores = tmp_path / "heat.png", tmp_path / "s.npz"
    code = main(["heatmap", "nofc:lenet5", str(img), "--input-size", "1x32x32", "--top", "2",
                 "--step", "2", "-o", str(out), "--scores", str(scores)])
    assert code == 0
    text = capsys.readouterr().out
    assert "map 9x15" in text and "step 2x2" in text and "exact" in text
    assert _png_size(out)[0] == "PNG"
    z = np.load(scores)
    assert z["scores"].shape == (10, 9, 15) and z["boxes"].shape == (9, 15, 4)
    assert z["boxes"][1, 2].tolist() == [2, 4, 34, 36]
    assert z["step"].tolist() == [2, 2] and z["stride"].tolist() == [4, 4]
    assert json.loads(str(z["geometry"]))["exact"] is True
    # nothing is overwritten without --force
    before = out.read_bytes()
    assert main(["heatmap", "nofc:lenet5", str(img), "--input-size", "1x32x32",
                 "-o", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_cli_heatmap_npy_json_and_class(tmp_path, capsys):
    rgb = _save(tmp_path / "c.png", RNG.integers(0, 256, (70, 80, 3), dtype=np.uint8))
    out, scores = tmp_path / "h.png", tmp_path / "s.npy"
    assert main(["heatmap", "torchvision:resnet18", str(rgb), "--input-size", "3x64x64",
                 "--class", "7", "-o", str(out), "--scores", str(scores)]) == 0
    text = capsys.readouterr().out
    assert "not exact" in text and "cock (7)" in text  # ImageNet names without weights
    assert np.load(scores).shape == (1000, 1, 1)  # one window fits (the net gives 2x2: padding)
    meta = json.loads((tmp_path / "s.json").read_text())
    assert meta["window"] == [64, 64] and meta["mean"] == pytest.approx(list(IMAGENET_MEAN))


@pytest.mark.parametrize("args,message", [
    (["--class", "10"], "--class 10 is out of range: the model has classes 0..9"),
    (["--step", "3"], "steps that work are 1, 2, 4"),
    (["--mean", "0.5,0.5"], "--mean has 2 values and the image 1"),
    (["--scores", "x.txt"], "--scores must end in .npz or .npy"),
    (["--top", "0"], "--top must be at least 1"),
])
def test_cli_heatmap_errors(tmp_path, capsys, args, message):
    img = _save(tmp_path / "g.png", RNG.integers(0, 256, (40, 40), dtype=np.uint8))
    out = tmp_path / "h.png"
    code = main(["heatmap", "nofc:lenet5", str(img), "--input-size", "1x32x32",
                 "-o", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_small_image_is_refused(tmp_path, capsys):
    img = _save(tmp_path / "g.png", RNG.integers(0, 256, (20, 40), dtype=np.uint8))
    assert main(["heatmap", "nofc:lenet5", str(img), "--input-size", "1x32x32",
                 "-o", str(tmp_path / "h.png")]) == 2
    assert "smaller than the 32x32 window" in capsys.readouterr().err


def test_render_places_cells_at_window_centres(tmp_path):
    from nofc.render import render_heatmap

    fcn = nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32))
    geo = nofc.geometry(fcn, (1, 32, 32))
    left, right, bottom, top = geo.extent(geo.output_shape((64, 40)))
    # first cell centre 16, last 16 + 8*4 = 48; each cell spans one step
    assert (top, bottom) == (14.0, 50.0) and (left, right) == (14.0, 26.0)
    path = tmp_path / "r.png"
    render_heatmap(path, np.zeros((1, 64, 40)), np.random.rand(2, 9, 3), ["a", "b"], geo,
                   geo.stride, marks=[(20, 20, "7")])
    assert _png_size(path)[0] == "PNG"


def test_cli_heatmap_verify_measures_map_against_crops(tmp_path, capsys):
    img = _save(tmp_path / "g.png", RNG.integers(0, 256, (45, 50), dtype=np.uint8))
    assert main(["heatmap", "nofc:lenet5", str(img), "--input-size", "1x32x32", "--verify",
                 "-o", str(tmp_path / "a.png")]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("map vs crops")][0]
    assert "OK: float32" in line and "20 map cells" in line  # 4 x 5 windows
    rgb = _save(tmp_path / "c.png", RNG.integers(0, 256, (100, 70, 3), dtype=np.uint8))
    assert main(["heatmap", "torchvision:resnet18", str(rgb), "--input-size", "3x64x64",
                 "--verify", "-o", str(tmp_path / "b.png")]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("map vs crops")][0]
    assert "NOT EXACT (measured)" in line and "pads its input" in line

