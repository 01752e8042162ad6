"""precision=: the fast low-precision pass against float32 and float64 references.

The agreement on a trained network (the digits demo's) is in tests/test_demo.py."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import nofc
import nofc.precision as precision
from nofc import NofcError

from test_dense import _deep_padding_free

CUDA = torch.cuda.is_available()
TOL = 3e-2  # of the map's largest score: bfloat16 keeps 8 bits of mantissa


def _padding_free():
    """VGG-like, no padding, BatchNorm, a flattened Linear (FullConv2d): stride 8."""
    torch.manual_seed(3)
    return _deep_padding_free().float()


SIZE = (3, 36, 36)


def _close(low: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    assert low.dtype == torch.float32 and low.shape == ref.shape
    err = float((low.double() - ref.double()).abs().max() / ref.double().abs().max())
    assert err <= tol, err


@pytest.mark.parametrize("step,method", [(None, "auto"), (2, "dilate"), (4, "shift")])
def test_bf16_map_is_the_crops_in_float64_to_bf16_rounding(step, method):
    """Every cell against the float64 classifier on its crop (an independent reference):
    the whole pass, the dilated pass and shift-and-stitch, all in bfloat16."""
    model = _padding_free()
    fcn = nofc.convert(model, SIZE)
    image = torch.randn(2, 3, 70, 81)
    naive = nofc.sliding_window_predict(model.double(), image.double(), SIZE,
                                        step=step or 8)
    low = nofc.dense_predict(fcn, image, SIZE, step, method=method, precision="bf16")
    _close(low, naive)
    assert (low.argmax(1) == naive.argmax(1)).float().mean() >= 0.97


def test_streamed_pass_in_bf16(monkeypatch):
    """A large image runs stage by stage in chunks (nofc.streaming), in bfloat16 too."""
    from nofc import streaming

    torch.manual_seed(0)
    fcn = nofc.convert(torchvision.models.resnet18().eval(), (3, 224, 224))
    image = torch.randn(1, 3, 352, 320)
    with torch.no_grad():
        whole = fcn(image)
    monkeypatch.setattr(streaming, "STREAM_PIXELS", 1)
    monkeypatch.setattr(streaming, "CHUNK", 96)
    calls = []
    run = streaming._run
    monkeypatch.setattr(streaming, "_run", lambda parts, x, **k: calls.append(
        (x.dtype, [s.chunked for s in parts])) or run(parts, x, **k))
    low = nofc.dense_predict(fcn, image, (3, 224, 224), precision="bf16")
    assert calls == [(torch.bfloat16, [True] * 5)]  # streamed in chunks, in bfloat16
    _close(low, whole)


def test_full_conv_unfold_path_runs_in_bf16():
    """fc6 (FullConv2d) keeps its unfold + matmul path in bfloat16: the same numbers as
    the float32 convolution of the same rounded weights and input."""
    conv = nofc.FullConv2d(64, 32, (7, 7)).eval()
    x = torch.randn(1, 64, 12, 13)
    low = conv.to(torch.bfloat16)
    xb = x.bfloat16().contiguous(memory_format=torch.channels_last)
    assert low._unfold_ok(xb)
    with torch.no_grad():
        got = low(xb)
        ref = F.conv2d(xb.float(), low.weight.float(), low.bias.float())
    assert got.dtype == torch.bfloat16
    _close(got.float(), ref, tol=1e-2)


def test_tiles_in_bf16_equal_the_whole_map_in_bf16(tmp_path):
    zarr = pytest.importorskip("zarr")
    model = _padding_free()
    fcn = nofc.convert(model, SIZE)
    image = np.random.default_rng(0).random((3, 150, 130), dtype=np.float32)
    whole = nofc.dense_predict(fcn, image, SIZE, precision="bf16")[0]
    ref = nofc.dense_predict(fcn, image, SIZE)[0]
    store = tmp_path / "map.zarr"
    tiled = nofc.tiled_predict(fcn, image, SIZE, tile=64, out=str(store), progress=False,
                               precision="bf16")
    assert tiled.dtype == np.float32
    _close(torch.from_numpy(tiled[:]), ref)
    _close(torch.from_numpy(tiled[:]), whole, tol=1e-2)  # tiles' rounding may differ a bit
    assert zarr.open_array(str(store), mode="r").attrs["nofc"]["arguments"]["precision"] \
        == "bf16"
    with pytest.raises(NofcError, match=r"written for different arguments \(precision\)"):
        nofc.tiled_predict(fcn, image, SIZE, tile=64, out=str(store), progress=False)


def test_low_copy_is_kept_until_the_weights_change():
    model = _padding_free()
    fcn = nofc.convert(model, SIZE)
    image = torch.randn(1, 3, 60, 60)
    a = nofc.dense_predict(fcn, image, SIZE, precision="bf16")
    low = precision.LowPrecision(torch.bfloat16, torch.device("cpu"))
    assert low.network(fcn) is low.network(fcn)  # made once
    before = low.network(fcn)
    kinds = [type(m) for m in before.modules()]
    # BatchNorm folded, each Conv2d + ReLU one oneDNN call, fc6 (FullConv2d) kept as it is
    assert torch.nn.BatchNorm2d not in kinds and kinds.count(precision.ConvReLU) == 5
    assert kinds.count(nofc.FullConv2d) == 1
    convs = [m for m in before.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[-1].weight.dtype == torch.float32  # the scores' layer
    assert {m.weight.dtype for m in convs[:-1]} == {torch.bfloat16}
    with torch.no_grad():
        for p in fcn.parameters():
            p.mul_(-1)
    assert low.network(fcn) is not before
    b = nofc.dense_predict(fcn, image, SIZE, precision="bf16")
    _close(b, nofc.dense_predict(fcn, image, SIZE))
    assert not torch.allclose(a, b)
    assert next(fcn.parameters()).dtype == torch.float32  # the network itself untouched


def test_auto_picks_bf16_only_on_bf16_hardware_and_says_so_once(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "_NOTED", set())
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx2"}))
    with pytest.warns(UserWarning, match="runs fp32 on cpu: no bfloat16 matrix units"):
        assert precision.low_precision("auto", cpu, None) is None
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")  # once: no second warning
        assert precision.low_precision("auto", cpu, None) is None
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx512_bf16"}))
    with pytest.warns(UserWarning, match="runs bf16 on cpu"):
        assert precision.low_precision("auto", cpu, None).dtype == torch.bfloat16


def test_errors(monkeypatch):
    fcn = nofc.convert(nofc.zoo.LeNet5(), (1, 32, 32))
    image = torch.randn(1, 40, 40)
    with pytest.raises(NofcError, match="precision must be one of 'fp32', 'bf16'"):
        nofc.dense_predict(fcn, image, (1, 32, 32), precision="int8")
    with pytest.raises(NofcError, match="give one or the other"):
        nofc.dense_predict(fcn, image, (1, 32, 32), dtype=torch.float64, precision="bf16")
    with pytest.raises(NofcError, match="precision must be one of"):
        nofc.tiled_predict(fcn, image[0].numpy(), (1, 32, 32), precision="half",
                           progress=False)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx512_bf16"}))
    with pytest.raises(NofcError, match="no float16 matrix units.*use precision='bf16'"):
        nofc.dense_predict(fcn, image, (1, 32, 32), precision="fp16")


def test_heatmap_cli_precision(tmp_path, capsys):
    from PIL import Image
    from nofc.cli import main

    weights = tmp_path / "lenet.pt"
    torch.save(nofc.zoo.LeNet5().state_dict(), weights)
    path = tmp_path / "page.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 60), np.uint8)).save(path)
    npz = {p: tmp_path / f"{p}.npz" for p in ("fp32", "bf16")}
    for p, scores in npz.items():
        argv = ["heatmap", "nofc:lenet5", "--weights", str(weights), str(path),
                "--input-size", "1x32x32",
                "-o", str(tmp_path / f"{p}.png"), "--scores", str(scores), "--precision", p]
        assert main(argv) == 0
    ref, low = (np.load(npz[p])["scores"] for p in ("fp32", "bf16"))
    assert low.dtype == np.float32
    _close(torch.from_numpy(low), torch.from_numpy(ref))
    assert main(["heatmap", "nofc:lenet5", str(path), "--input-size", "1x32x32", "-o",
                 str(tmp_path / "x.png"), "--precision", "fp8"]) == 2
    assert "--precision: invalid choice: 'fp8'" in capsys.readouterr().err


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_cuda_autocast(name):
    model = _padding_free()
    fcn = nofc.convert(model, SIZE)
    image = torch.randn(2, 3, 70, 81)
    ref = nofc.dense_predict(fcn, image, SIZE, step=2, device="cuda")
    low = nofc.dense_predict(fcn, image, SIZE, step=2, device="cuda", precision=name)
    assert low.device.type == "cuda"
    _close(low.cpu(), ref.cpu())


def test_bf16_squeeze_excitation_network():
    """Global context (squeeze-and-excitation) survives the bfloat16 copy: its geometry
    still knows which global pools were kept on purpose."""
    torch.manual_seed(0)
    fcn = nofc.convert(torchvision.models.mobilenet_v3_small().eval(), (3, 224, 224))
    image = torch.randn(1, 3, 256, 288)
    _close(nofc.dense_predict(fcn, image, (3, 224, 224), precision="bf16"),
           nofc.dense_predict(fcn, image, (3, 224, 224)), tol=5e-2)
