"""Hostile and wrong input: each case ends in one clear line, never a traceback.

Command line: exit code 2, exactly one line on stderr starting ``nofc: error:``, no
``Traceback``, nothing written. API: ``NofcError`` with the same message.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import nofc
from nofc import NofcError
from nofc.cli import main
from nofc.io import atomic_output, load_model
from nofc.zoo import LeNet5

LENET = ["nofc:lenet5", "--input-size", "1x32x32"]


def cli_error(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI, expect a one-line error containing every needle; return it."""
    code = main(argv)
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert code == 2, (code, cap.err)
    assert len(lines) == 1 and lines[0].startswith("nofc: error: "), cap.err
    assert "Traceback" not in cap.err + cap.out
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _factory(tmp_path, body: str, name: str = "net.py") -> str:
    """Write ``body`` (defining build()) to a module; return the ``file.py:build`` spec."""
    path = tmp_path / name
    path.write_text("import torch\nimport torch.nn as nn\n\n" + body)
    return f"{path}:build"


# --------------------------------------------------------------------------- model files


def test_model_file_that_is_text(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_text("this is not a model\n")
    cli_error(capsys, ["explain", str(bad), "--input-size", "1x32x32", "--trust-pickle"],
              "cannot load", "model.pt")


def test_model_file_holding_a_state_dict(tmp_path, capsys):
    sd = tmp_path / "weights.pt"
    torch.save(LeNet5().state_dict(), sd)
    cli_error(capsys, ["explain", str(sd), "--input-size", "1x32x32", "--trust-pickle"],
              "holds a", "not an nn.Module", "--weights")


def test_unknown_model_spec(capsys):
    cli_error(capsys, ["explain", "model.onnx.txt", "--input-size", "1x32x32"],
              "cannot tell what model", "torchvision:NAME")
    cli_error(capsys, ["explain", "torchvision:resnet19", "--input-size", "3x32x32"],
              "unknown torchvision model 'resnet19'", "resnet18")


def test_factory_that_returns_something_else(tmp_path, capsys):
    spec = _factory(tmp_path, "def build():\n    return 42\n")
    cli_error(capsys, ["explain", spec, "--input-size", "1x32x32"],
              "returned int, not an nn.Module")


def test_factory_file_that_does_not_import(tmp_path, capsys):
    spec = _factory(tmp_path, "def build(:\n")
    cli_error(capsys, ["explain", spec, "--input-size", "1x32x32"], "cannot import", "net.py")


def test_weights_file_that_is_not_weights(tmp_path, capsys):
    bad = tmp_path / "w.pt"
    bad.write_bytes(np.random.default_rng(0).bytes(256))
    cli_error(capsys, ["explain", *LENET, "--weights", str(bad)],
              "cannot read weights from", "w.pt")


def test_whole_model_given_as_weights(tmp_path, capsys):
    path = tmp_path / "lenet.pt"
    torch.save(LeNet5(), path)
    cli_error(capsys, ["explain", *LENET, "--weights", str(path)],
              "holds pickled Python objects (nofc.zoo.LeNet5)", "model.state_dict()")


def test_weights_file_holding_a_list(tmp_path, capsys):
    bad = tmp_path / "w.pt"
    torch.save([torch.zeros(3)], bad)
    cli_error(capsys, ["explain", *LENET, "--weights", str(bad)], "is not a state_dict")


# --------------------------------------------------------------------------- empty files


def test_empty_weights_file(tmp_path, capsys):
    empty = tmp_path / "w.pt"
    empty.touch()
    cli_error(capsys, ["explain", *LENET, "--weights", str(empty)], "weights file is empty")


def test_empty_model_file(tmp_path, capsys):
    empty = tmp_path / "model.pt"
    empty.touch()
    cli_error(capsys, ["explain", str(empty), "--input-size", "1x32x32", "--trust-pickle"],
              "model file is empty")


def test_empty_factory_file(tmp_path, capsys):
    empty = tmp_path / "net.py"
    empty.touch()
    cli_error(capsys, ["explain", f"{empty}:build", "--input-size", "1x32x32"],
              "has no 'build'")


def test_missing_files(tmp_path, capsys):
    cli_error(capsys, ["explain", *LENET, "--weights", str(tmp_path / "nope.pt")],
              "weights file not found")
    cli_error(capsys, ["explain", str(tmp_path / "nope.pt"), "--input-size", "1x32x32"],
              "model file not found")


# --------------------------------------------------------------------------- state_dicts


@pytest.mark.parametrize("damage, needle", [
    ("missing", "1 missing (e.g. f6.bias)"),
    ("extra", "1 unexpected (e.g. f7.weight)"),
    ("shape", "1 wrongly shaped (e.g. output.weight: file (5, 84) vs model (10, 84))"),
])
def test_state_dict_that_does_not_fit(tmp_path, capsys, damage, needle):
    sd = LeNet5().state_dict()
    if damage == "missing":
        del sd["f6.bias"]
    elif damage == "extra":
        sd["f7.weight"] = torch.zeros(2, 2)
    else:
        sd["output.weight"] = torch.zeros(5, 84)
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    cli_error(capsys, ["explain", *LENET, "--weights", str(path)],
              "does not fit LeNet5", needle)
    with pytest.raises(NofcError, match="does not fit LeNet5"):
        load_model("nofc:lenet5", weights=str(path))


# --------------------------------------------------------------------------- sizes


def test_input_size_inconsistent_with_first_linear(capsys):
    msg = cli_error(capsys, ["explain", "nofc:lenet5", "--input-size", "1x36x36"],
                    "'f6' (Linear)", "Linear expects 120 inputs",
                    "the feature map is 120x2x2 = 480", "input_size=(1, 32, 32)")
    assert msg.endswith("?")
    with pytest.raises(NofcError, match=r"pass input_size=\(1, 32, 32\)"):
        nofc.convert(LeNet5(), input_size=(1, 36, 36))


def test_input_size_inconsistent_flatten_linear(tmp_path, capsys):
    """A plain conv + flatten + Linear classifier trained on 3x24x24, given 3x40x40."""
    spec = _factory(tmp_path, (
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(),\n"
        "                         nn.Linear(4 * 11 * 11, 5))\n"))
    cli_error(capsys, ["explain", spec, "--input-size", "3x40x40"],
              "Linear expects 484 inputs", "the feature map is 4x19x19 = 1444",
              "input_size=(3, 23, 23)")


def test_wrong_channel_count(capsys):
    cli_error(capsys, ["explain", "nofc:lenet5", "--input-size", "3x32x32"],
              "'c1' (Conv2d)", "expects 1 input channels")
    with pytest.raises(NofcError, match="expects 1 input channels"):
        nofc.convert(LeNet5(), input_size=(3, 32, 32))


@pytest.mark.parametrize("text", ["32x32", "1x0x32", "ax32x32", "1x32x32x2", ""])
def test_malformed_input_size(capsys, text):
    cli_error(capsys, ["explain", "nofc:lenet5", "--input-size", text],
              "--input-size must be 3 positive integers like 3x224x224")


def test_api_rejects_bad_options():
    with pytest.raises(NofcError, match="input_size must be"):
        nofc.convert(LeNet5(), input_size=(32, 32))
    with pytest.raises(NofcError, match="pooling must be 'window' or 'global'"):
        nofc.convert(LeNet5(), input_size=(1, 32, 32), pooling="mean")
    with pytest.raises(NofcError, match="fc_stride must be a positive integer"):
        nofc.convert(LeNet5(), input_size=(1, 32, 32), fc_stride=0)
    with pytest.raises(NofcError, match="model must be a torch.nn.Module"):
        nofc.convert("resnet18", input_size=(3, 32, 32))


# --------------------------------------------------------------------------- layers


def test_unsupported_layer_after_flatten(tmp_path, capsys):
    spec = _factory(tmp_path, (
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),\n"
        "                         nn.LayerNorm(4 * 6 * 6), nn.Linear(4 * 6 * 6, 3))\n"))
    cli_error(capsys, ["explain", spec, "--input-size", "1x8x8"],
              "cannot convert '3' (LayerNorm)", "window by window", "nothing was converted")


def test_data_dependent_model_is_refused():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
                x = -x
            return self.fc(x.flatten(1))

    with pytest.raises(NofcError, match="cannot trace Branchy with torch.fx"):
        nofc.convert(Branchy(), input_size=(1, 2, 2))


# --------------------------------------------------------------------------- outputs


def test_output_in_missing_folder(tmp_path, capsys):
    target = tmp_path / "no" / "such" / "fcn.pt"
    cli_error(capsys, ["convert", *LENET, "-o", str(target)], "folder", "does not exist")
    assert not target.parent.exists()


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0,
                    reason="root writes into read-only folders; see test below")
def test_output_in_read_only_folder(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        cli_error(capsys, ["convert", *LENET, "-o", str(folder / "fcn.pt")], "not writable")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux sysfs")
def test_output_on_unwritable_filesystem(capsys):
    """sysfs refuses new files even for root (os.access says yes): still one line."""
    cli_error(capsys, ["convert", *LENET, "-o", "/sys/nofc_fcn.pt"], "cannot write /sys/nofc_fcn.pt")
    assert not os.path.exists("/sys/nofc_fcn.pt")


def test_output_exists_without_force(tmp_path, capsys):
    target = tmp_path / "fcn.pt"
    target.write_bytes(b"precious")
    cli_error(capsys, ["convert", *LENET, "-o", str(target)], "exists", "--force")
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fcn.pt"]


def test_output_is_a_folder(tmp_path, capsys):
    folder = tmp_path / "out.pt"
    folder.mkdir()
    cli_error(capsys, ["convert", *LENET, "-o", str(folder), "--force"], "is a directory")


def test_output_with_unknown_suffix(tmp_path, capsys):
    cli_error(capsys, ["convert", *LENET, "-o", str(tmp_path / "fcn.bin")],
              "unknown output format '.bin'")
    assert list(tmp_path.iterdir()) == []


def test_write_error_midway_becomes_one_line(tmp_path):
    """An OSError while writing (disk full) is a NofcError and leaves no temp file."""
    target = tmp_path / "fcn.pt"
    with pytest.raises(NofcError, match="cannot write .*fcn.pt: No space left on device"):
        with atomic_output(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- images (API)


def _lenet_fcn():
    return nofc.convert(LeNet5(), input_size=(1, 32, 32))


def test_dense_image_smaller_than_window():
    with pytest.raises(NofcError, match="image is 20x40, smaller than the 32x32 window; pad or "
                                        "resize it to at least 32x32"):
        nofc.dense_predict(_lenet_fcn(), torch.randn(1, 20, 40), (1, 32, 32))


def test_dense_wrong_channel_count():
    with pytest.raises(NofcError, match="image has 3 channels, the network expects 1"):
        nofc.dense_predict(_lenet_fcn(), torch.randn(3, 40, 40), (1, 32, 32))


@pytest.mark.parametrize("step", [3, 5, 8])
def test_dense_step_that_does_not_divide_stride(step):
    with pytest.raises(NofcError, match=f"step {step} .* does not divide the network stride 4: "
                                        "steps that work are 1, 2, 4"):
        nofc.dense_predict(_lenet_fcn(), torch.randn(1, 40, 40), (1, 32, 32), step=step)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_dense_nan_inf_warns_and_map_shows_where(bad):
    """A warning, and the non-finite cells are exactly the windows that hold the bad pixel
    (LeNet's tanh would turn Inf into a finite, wrong score without the marking)."""
    fcn = _lenet_fcn()
    image = torch.randn(1, 64, 48)
    image[0, 37, 21] = bad
    with pytest.warns(UserWarning, match=r"1 pixels with NaN or Inf \(the first at row 37, "
                                         r"column 21\); the 35 map cells"):
        scores = nofc.dense_predict(fcn, image, (1, 32, 32))[0]  # (K, h, w)
    boxes = torch.as_tensor(nofc.geometry(fcn, (1, 32, 32)).boxes((64, 48)))  # (h, w, 4)
    inside = ((boxes[..., 0] <= 37) & (37 < boxes[..., 2])
              & (boxes[..., 1] <= 21) & (21 < boxes[..., 3]))
    assert inside.sum() == 35 and not inside.all()
    assert torch.equal(scores.isnan().all(0), inside)
    assert torch.isfinite(scores[:, ~inside]).all()


@pytest.mark.parametrize("step", [None, 2])
def test_dense_inf_padded_network_marks_receptive_field(step):
    """With padding a cell sees past its window: every cell that the Inf can reach is NaN,
    and every other cell equals the map of the clean image."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
                          nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 2)).eval()
    fcn = nofc.convert(model, input_size=(1, 8, 8))
    clean = torch.randn(1, 30, 26, dtype=torch.float64)
    image = clean.clone()
    image[0, 13, 9] = float("inf")
    ref = nofc.dense_predict(fcn, clean, (1, 8, 8), step=step, dtype=torch.float64)
    with pytest.warns(UserWarning, match="NaN or Inf"):
        got = nofc.dense_predict(fcn, image, (1, 8, 8), step=step, dtype=torch.float64)
    marked = got.isnan().all(1)  # (B, h, w)
    assert marked.any() and not marked.all()
    torch.testing.assert_close(got[:, :, ~marked[0]], ref[:, :, ~marked[0]], rtol=0, atol=0)


# --------------------------------------------------------------------------- images (CLI)

needs_heatmap = pytest.mark.skipif(
    "heatmap" not in __import__("nofc.cli").cli._COMMANDS, reason="no `nofc heatmap` yet")


def _png(path, array, mode=None):
    from PIL import Image

    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return str(path)


def _heatmap(image, out, *extra, model=LENET):
    return ["heatmap", *model, image, "-o", str(out), *extra]


@needs_heatmap
def test_heatmap_image_smaller_than_window(tmp_path, capsys):
    img = _png(tmp_path / "small.png", np.zeros((20, 40), np.uint8))
    cli_error(capsys, _heatmap(img, tmp_path / "map.png"),
              "image is 20x40, smaller than the 32x32 window", "at least 32x32")
    assert not (tmp_path / "map.png").exists()


@needs_heatmap
@pytest.mark.parametrize("kind", ["gray", "rgb", "rgba", "gray16", "palette"])
def test_heatmap_pixel_formats_are_handled(tmp_path, capsys, kind):
    rng = np.random.default_rng(0)
    from PIL import Image

    path = tmp_path / f"{kind}.png"
    if kind == "gray":
        Image.fromarray(rng.integers(0, 256, (40, 36), dtype=np.uint8)).save(path)
    elif kind == "rgb":
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(path)
    elif kind == "rgba":
        Image.fromarray(rng.integers(0, 256, (40, 36, 4), dtype=np.uint8)).save(path)
    elif kind == "gray16":
        Image.fromarray(rng.integers(0, 65536, (40, 36), dtype=np.uint16)).save(path)
    else:
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).convert("P").save(path)
    out = tmp_path / "map.png"
    assert main(_heatmap(str(path), out)) == 0, capsys.readouterr().err
    assert out.exists()
    assert "map 3x2" in capsys.readouterr().out


@needs_heatmap
def test_heatmap_channels_that_cannot_be_matched(tmp_path, capsys):
    spec = _factory(tmp_path, (
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(4, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))\n"))
    img = _png(tmp_path / "rgb.png", np.zeros((10, 10, 3), np.uint8))
    cli_error(capsys, _heatmap(img, tmp_path / "map.png", model=[spec, "--input-size",
                                                                  "4x8x8"]),
              "3 colour channels and the network expects 4")


@needs_heatmap
@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_heatmap_unreadable_image(tmp_path, capsys, damage):
    good = tmp_path / "good.png"
    _png(good, np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    data = good.read_bytes()
    bad = tmp_path / "bad.png"
    bad.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                     "garbage": data[:8] + np.random.default_rng(0).bytes(300)}[damage])
    cli_error(capsys, _heatmap(str(bad), tmp_path / "map.png"), "cannot read image", "bad.png")
    assert not (tmp_path / "map.png").exists()


@needs_heatmap
def test_heatmap_missing_image(tmp_path, capsys):
    cli_error(capsys, _heatmap(str(tmp_path / "nope.png"), tmp_path / "map.png"),
              "image file not found")


@needs_heatmap
def test_heatmap_step_that_does_not_divide_stride(tmp_path, capsys):
    img = _png(tmp_path / "g.png", np.zeros((40, 40), np.uint8))
    cli_error(capsys, _heatmap(img, tmp_path / "map.png", "--step", "3"),
              "step 3 (y) does not divide the network stride 4", "1, 2, 4")


@needs_heatmap
def test_heatmap_output_exists(tmp_path, capsys):
    img = _png(tmp_path / "g.png", np.zeros((40, 40), np.uint8))
    out = tmp_path / "map.png"
    out.write_bytes(b"precious")
    cli_error(capsys, _heatmap(img, out), "exists", "--force")
    assert out.read_bytes() == b"precious"


@needs_heatmap
def test_heatmap_nan_inf_pixels_warn_and_show(tmp_path, capsys):
    """A float TIFF with NaN and Inf: a warning, NaN cells in the saved scores exactly where
    the windows hold a bad pixel, and a finite peak probability from the other cells."""
    tifffile = pytest.importorskip("tifffile")
    image = np.random.default_rng(0).random((64, 48), dtype=np.float32)
    image[10, 10], image[40, 30] = np.nan, np.inf
    path = tmp_path / "bad.tif"
    tifffile.imwrite(path, image)
    out, scores = tmp_path / "map.png", tmp_path / "scores.npz"
    code = main(_heatmap(str(path), out, "--scores", str(scores)))
    cap = capsys.readouterr()
    assert code == 0, cap.err
    warned = [ln for ln in cap.err.splitlines() if "NaN" in ln]
    assert len(warned) == 1 and warned[0].startswith("nofc: warning: the image has 2 pixels "
                                                     "with NaN or Inf"), cap.err
    assert "peak probability nan" not in cap.out
    saved = np.load(scores)
    boxes = saved["boxes"]  # (h, w, 4)
    sees = np.zeros(boxes.shape[:2], bool)
    for y, x in ((10, 10), (40, 30)):
        sees |= ((boxes[..., 0] <= y) & (y < boxes[..., 2])
                 & (boxes[..., 1] <= x) & (x < boxes[..., 3]))
    assert (np.isnan(saved["scores"]).all(0) == sees).all() and not sees.all()
