"""A map for every classifier (issue 23, point 6): where ``convert`` refuses (a ViT reading
its class token), the map is made crop by crop, through the same dense, tiled, store and
CLI paths, and equals the classifier run on each crop by hand."""

import warnings

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import nofc
from nofc import NofcError
from nofc.cli import main
from nofc.crops import CropNet

F64 = torch.float64


def _vit(img_size=32):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size,
                             num_classes=3).eval()


def _by_hand(model, x, window, step):
    """The reference: the classifier on each crop, one at a time."""
    (wh, ww), (sy, sx) = window, step
    H, W = x.shape[-2:]
    rows = []
    with torch.no_grad():
        for y in range(0, H - wh + 1, sy):
            rows.append(torch.stack([model(x[None, :, y:y + wh, c:c + ww])[0]
                                     for c in range(0, W - ww + 1, sx)], -1))
    return torch.stack(rows, -2)  # (K, h, w)


def test_convert_refuses_the_vit_and_auto_makes_its_map_crop_by_crop():
    vit = _vit().double()
    with pytest.raises(NofcError):
        nofc.convert(vit, (3, 32, 32))
    x = torch.randn(3, 70, 57, dtype=F64)
    with pytest.warns(UserWarning, match=r"the map is made crop by crop, one forward of the "
                                         r"classifier per window every 8x8 pixels: each "
                                         r"pixel away from the edges is read by about 16 "
                                         r"windows, so up to about 16x the work of one pass "
                                         r"over the image"):
        got = nofc.dense_predict(vit, x, (3, 32, 32), 8)
    want = _by_hand(vit, x, (32, 32), (8, 8))
    assert got.shape == (1, 3, 5, 4)
    assert (got[0] - want).abs().max() <= 1e-10 * max(1.0, float(want.abs().max()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: no warning
        explicit = nofc.dense_predict(vit, x, (3, 32, 32), 8, method="crops")
    assert torch.equal(explicit, got)
    geo = nofc.geometry(CropNet(vit, (3, 32, 32), 8), (3, 32, 32))
    assert (geo.stride, geo.window, geo.exact, geo.receptive_field) == ((8, 8), (32, 32),
                                                                       True, (32, 32))
    with pytest.raises(NofcError):  # only "auto" falls back: "dilate" keeps the refusal
        nofc.dense_predict(vit, x, (3, 32, 32), 8, method="dilate")


def test_crops_of_a_convertible_net_equal_its_converted_map():
    torch.manual_seed(1)
    model = nofc.zoo.LeNet5().double().eval()
    x = torch.randn(1, 61, 50, dtype=F64)
    fcn = nofc.dense_predict(model, x, (1, 32, 32), 4)
    crops = nofc.dense_predict(model, x, (1, 32, 32), 4, method="crops")
    assert (fcn - crops).abs().max() <= 1e-10


def test_tiled_crop_map_resumes_and_equals_the_crops(tmp_path):
    vit = _vit().double()
    img = np.random.default_rng(2).random((3, 120, 100))
    want = _by_hand(vit, torch.from_numpy(img), (32, 32), (16, 16)).numpy()
    store = tmp_path / "vit.zarr"
    with pytest.warns(UserWarning, match="crop by crop"):
        got = nofc.tiled_predict(vit, img, (3, 32, 32), tile=48, step=16, out=str(store),
                                 dtype=F64, progress=False)
    np.testing.assert_allclose(got[:], want, rtol=0, atol=1e-10)
    # a run cut short: blocks are lost, the same call computes only those again
    done = sorted((store / ".nofc_done").iterdir())
    for marker in done[::2]:
        marker.unlink()
    stats = {}
    with pytest.warns(UserWarning, match="crop by crop"):
        again = nofc.tiled_predict(vit, img, (3, 32, 32), tile=48, step=16, out=str(store),
                                   dtype=F64, progress=False, stats=stats)
    assert stats["tiles_computed"] == len(done[::2]) < stats["tiles"]
    np.testing.assert_allclose(again[:], want, rtol=0, atol=1e-10)


def test_cli_heatmap_of_a_vit_says_it_runs_crops_and_gives_their_map(tmp_path, capsys):
    img = np.random.default_rng(3).integers(0, 256, (256, 288, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "scan.png")
    out, scores = tmp_path / "heat.png", tmp_path / "heat.npz"
    vit = _vit(224)  # the user's 3-class fine-tune
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    assert main(["heatmap", "timm:vit_tiny_patch16_224", str(tmp_path / "scan.png"),
                 "--weights", str(tmp_path / "vit.pth"),
                 "-o", str(out), "--scores", str(scores), "--step", "32",
                 "--out", str(tmp_path / "map.zarr"), "--mean", "0.5", "--std", "0.25"]) == 0
    err = capsys.readouterr().err
    assert "nofc: warning: the map is made crop by crop" in err
    got = np.load(scores)["scores"]
    x = (torch.from_numpy(np.moveaxis(img, -1, 0).astype(np.float32)) / 255 - 0.5) / 0.25
    want = _by_hand(vit, x, (224, 224), (32, 32)).numpy()
    assert got.shape == want.shape == (3, 2, 3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_cli_method_crops_gives_the_converted_map_of_an_exact_net(tmp_path, capsys):
    img = np.random.default_rng(4).integers(0, 256, (70, 90), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "page.png")
    torch.save(nofc.zoo.LeNet5().state_dict(), tmp_path / "lenet.pt")
    maps = {}
    for method in ("auto", "crops"):
        scores = tmp_path / f"{method}.npz"
        assert main(["heatmap", "nofc:lenet5", str(tmp_path / "page.png"), "--input-size",
                     "1x32x32", "--weights", str(tmp_path / "lenet.pt"),
                     "--step", "4", "--method", method, "-o",
                     str(tmp_path / f"{method}.png"), "--scores", str(scores)]) == 0
        maps[method] = np.load(scores)["scores"]
    assert maps["crops"].shape == maps["auto"].shape == (10, 10, 15)
    np.testing.assert_allclose(maps["crops"], maps["auto"], rtol=1e-5, atol=1e-5)
    assert "crop by crop" not in capsys.readouterr().err  # asked for: no warning
