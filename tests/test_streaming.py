"""Stage-by-stage passes in chunks (nofc.streaming) give the whole pass's map."""

import pytest
import torch
import torchvision

import nofc
from nofc import streaming
from nofc.streaming import stages

# torchvision models covering each rule: padding and residual adds (resnet18), concatenated
# dense blocks (densenet121), ceil_mode pools (googlenet, squeezenet1_0), branches of
# different kernels and asymmetric convs (inception_v3), channels-last permutes inside a
# stage (convnext_tiny), plain conv stacks (vgg11, alexnet)
MODELS = ["resnet18", "densenet121", "googlenet", "squeezenet1_0", "inception_v3",
          "convnext_tiny", "vgg11", "alexnet", "mnasnet0_5"]


def _model(name: str):
    torch.manual_seed(0)
    kw = {"aux_logits": False, "init_weights": True} if name in ("googlenet",
                                                                 "inception_v3") else {}
    size = (3, 299, 299) if name == "inception_v3" else (3, 224, 224)
    return getattr(torchvision.models, name)(num_classes=5, **kw).eval(), size


def _close(got, want, rel):
    scale = max(1.0, float(want.abs().max()))
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= rel * scale


@pytest.mark.parametrize("name", MODELS)
def test_stages_equal_the_whole_pass_float64(name):
    model, size = _model(name)
    fcn = nofc.convert(model, size).double()
    geo = nofc.geometry(fcn, size)
    parts = stages(fcn, geo, 3)
    assert parts is not None and len(parts) >= 3 and all(p.chunked for p in parts)
    x = torch.randn(1, 3, size[1] + 251, size[2] + 187, dtype=torch.float64)
    with torch.no_grad():
        want = fcn(x)
        for chunk in (48, 160):  # chunks of a few cells and of many: every edge case
            _close(streaming._run(parts, x, chunk=chunk), want, 1e-10)


def _bands(stream, x, start, end, heights):
    """The map rows ``start..end-1`` of ``stream``, in bands of the given heights in turn."""
    out, a, i = [], start, 0
    while a < end:
        b = min(end, a + heights[i % len(heights)])
        y0, y1, x0, x1 = stream.read(a, b)
        out.append(stream.advance(x[..., y0:y1, x0:x1], b))
        a, i = b, i + 1
    return torch.cat(out, -2)


@pytest.mark.parametrize("name", [
    n if n in ("resnet18", "densenet121", "googlenet", "inception_v3", "convnext_tiny")
    else pytest.param(n, marks=pytest.mark.slow) for n in MODELS])
def test_row_streams_equal_the_whole_pass_float64(name):
    """Band by band, each stage keeping only the rows its next band reads, in strips
    across: every map cell equals the whole pass's, whatever the bands' heights, the
    strip or the row the stream starts at."""
    model, size = _model(name)
    fcn = nofc.convert(model, size).double()
    geo = nofc.geometry(fcn, size)
    x = torch.randn(1, 3, size[1] + 251, size[2] + 187, dtype=torch.float64)
    hw = tuple(x.shape[-2:])
    h, w = geo.output_shape(hw)
    with torch.no_grad():
        want = fcn(x)[..., :h, :w]
        for cols, start, heights in (((0, w), 0, (1, 3, 2)), ((0, w // 2), 2, (4,)),
                                     ((w // 2, w), 1, (2, 1))):
            stream = streaming.row_stream(fcn, geo, hw, cols, start=start)
            assert stream is not None and stream.band >= geo.stride[0]
            got = _bands(stream, x, start, h, heights)
            _close(got, want[..., start:h, cols[0]:cols[1]], 1e-10)
            assert all(m is None or m.shape[-2] < 2 * stream.band for m in stream.maps)


def test_row_streams_refuse_what_they_cannot_cut():
    """Global context, a stage that runs whole: no row stream (tiles run)."""
    from test_geometry import _two_branches

    torch.manual_seed(0)
    se = nofc.convert(torchvision.models.mobilenet_v3_small(num_classes=3).eval(),
                      (3, 224, 224))
    groups = nofc.convert(_two_branches("nearest"), (1, 32, 32))
    for fcn, size in ((se, (3, 224, 224)), (groups, (1, 32, 32))):
        geo = nofc.geometry(fcn, size)
        assert streaming.row_stream(fcn, geo, (400, 400), (0, 3), channels=size[0]) is None


def test_dense_predict_streams_large_images(monkeypatch):
    """dense_predict at the stride, at a finer step (dilated and shift-and-stitch) and
    tiled_predict give the same map with streaming on as off (float32, channels-last)."""
    model, size = _model("resnet18")
    fcn = nofc.convert(model, size)
    x = torch.rand(3, 421, 389)
    calls = []
    run = streaming._run
    monkeypatch.setattr(streaming, "_run", lambda *a, **k: calls.append(1) or run(*a, **k))
    results = {}
    for limit in (10 ** 12, 1):
        monkeypatch.setattr(streaming, "STREAM_PIXELS", limit)
        monkeypatch.setattr(streaming, "CHUNK", 96)
        results[limit] = [
            nofc.dense_predict(fcn, x, size),
            nofc.dense_predict(fcn, x, size, step=16, method="shift"),
            torch.from_numpy(nofc.tiled_predict(fcn, x.numpy(), size, tile=256,
                                                progress=False))[None],
        ]
    assert calls  # streaming ran
    for got, want in zip(results[1], results[10 ** 12]):
        _close(got, want, 1e-4)


def test_global_context_is_not_streamed():
    """Squeeze-and-excitation sees the whole map: a chunk cannot reproduce it."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=3).eval()
    fcn = nofc.convert(model, (3, 224, 224))
    assert stages(fcn, nofc.geometry(fcn, (3, 224, 224)), 3) is None



@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_a_stage_an_upsampling_leaves_in_groups_of_cells_runs_whole(mode):
    """Up to where a stride as coarse as the low branch's brings the lattice back, the
    upsampled branch's cells repeat in pairs: a chunk starting on an odd cell would cut
    the low branch on another grid, so that stage runs whole; the next is chunked."""
    from test_geometry import _two_branches

    fcn = nofc.convert(_two_branches(mode), (1, 32, 32))
    parts = stages(fcn, nofc.geometry(fcn, (1, 32, 32)), 1)
    assert [(p.scale, p.chunked) for p in parts] == [((2, 2), False), ((8, 8), True)]
    x = torch.randn(1, 1, 32 + 8 * 30, 32 + 8 * 21, dtype=torch.float64)
    with torch.no_grad():
        want = fcn(x)
        for chunk in (16, 26, 48):
            _close(streaming._run(parts, x, chunk=chunk), want, 1e-10)
