import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import nofc
from nofc import NofcError
from nofc.zoo import LeNet5

from conftest import state_hash

TORCHVISION = [
    "alexnet", "vgg11", "vgg16", "vgg16_bn", "resnet18", "resnet50", "densenet121",
    "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "squeezenet1_0",
]


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = torchvision.models.get_model(name, weights=None).eval()
        return cache[name]

    return get


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_equivalence(models, name):
    model = models(name)
    before = state_hash(model)
    fcn = nofc.convert(model, input_size=(3, 224, 224))
    assert not any(isinstance(m, nn.Linear) for m in fcn.modules())
    assert sum(p.numel() for p in fcn.parameters()) == sum(p.numel() for p in model.parameters())
    r64 = nofc.verify(model, fcn, input_size=(3, 224, 224), dtype=torch.float64)
    assert r64.ok and r64.max_abs_error <= 1e-10, r64
    r32 = nofc.verify(model, fcn, input_size=(3, 224, 224), dtype=torch.float32)
    assert r32.ok and r32.max_rel_error <= 1e-4, r32
    with torch.no_grad():
        out = fcn(torch.randn(1, 3, 320, 288))
    stride = 16 if name == "squeezenet1_0" else 32
    expect = ((320 - 224) // stride + 1, (288 - 224) // stride + 1)
    assert out.shape == (1, 1000, *expect)
    assert torch.isfinite(out).all()
    assert state_hash(model) == before, "convert/verify modified the user's model"


def test_squeezenet_only_pooling_and_flatten_change(models):
    table = nofc.explain(models("squeezenet1_0"), input_size=(3, 224, 224))
    changed = [r for r in table.rows if r.changed]
    assert {r.name for r in changed} == {"classifier.3", "flatten"}
    assert "already is convolutional" in str(table)


def test_global_pooling_mode_keeps_one_vector(models):
    model = models("resnet18")
    fcn = nofc.convert(model, input_size=(3, 224, 224), pooling="global")
    assert nofc.verify(model, fcn, input_size=(3, 224, 224)).ok
    x = torch.randn(1, 3, 320, 320, dtype=torch.float64)
    with torch.no_grad():  # copies: the cached model stays float32
        out = copy.deepcopy(fcn).double()(x)
        ref = copy.deepcopy(model).double()(x)
    assert out.shape == (1, 1000, 1, 1)  # one vector at any size: the original's
    torch.testing.assert_close(out.flatten(1), ref, rtol=0, atol=1e-10)


def test_global_mode_equals_original_at_any_size(models):
    model = models("mobilenet_v2")
    fcn = nofc.convert(model, input_size=(3, 224, 224), pooling="global")
    x = torch.randn(1, 3, 300, 260, dtype=torch.float64)
    with torch.no_grad():
        a = copy.deepcopy(model).double()(x)
        b = copy.deepcopy(fcn).double()(x).flatten(1)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_window_pooling_cell_equals_crop_for_resnet_head():
    # global pool -> AvgPool2d(7, stride 1): each cell is the head on one 7x7 feature window
    model = torchvision.models.resnet18().eval().double()
    fcn = nofc.convert(model, input_size=(3, 224, 224)).double()
    feats = nn.Sequential(*list(model.children())[:-2])
    x = torch.randn(1, 3, 256, 256, dtype=torch.float64)
    with torch.no_grad():
        fmap = feats(x)  # (1, 512, 8, 8)
        out = fcn(x)  # (1, 1000, 2, 2)
        for i in range(2):
            for j in range(2):
                cell = model.fc(fmap[:, :, i:i + 7, j:j + 7].mean((2, 3)))
                torch.testing.assert_close(out[:, :, i, j], cell, rtol=0, atol=1e-10)


class FlattenVariants(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(6)
        self.fc1 = nn.Linear(4 * 6 * 6, 6)
        self.fc2 = nn.Linear(6, 5)
        self.flat = nn.Flatten()

    def forward(self, x):
        x = F.relu(self.conv(x))
        if self.how == "module":
            x = self.flat(x)
        elif self.how == "function":
            x = torch.flatten(x, 1)
        elif self.how == "view":
            x = x.view(x.size(0), -1)
        elif self.how == "reshape":
            x = x.reshape(x.shape[0], -1)
        elif self.how == "method":
            x = x.flatten(1)
        x = self.drop(x)
        x = F.relu(self.bn(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=-1)


@pytest.mark.parametrize("how", ["module", "function", "view", "reshape", "method"])
def test_flatten_spellings(how):
    model = FlattenVariants(how).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    fcn = nofc.convert(model, input_size=(3, 8, 8))
    assert isinstance(fcn.fc1, nn.Conv2d) and fcn.fc1.kernel_size == (6, 6)
    assert isinstance(fcn.bn, nn.BatchNorm2d)
    assert nofc.verify(model, fcn, input_size=(3, 8, 8)).ok
    out = fcn(torch.randn(2, 3, 12, 10))
    assert out.shape == (2, 5, 5, 3)
    # log_softmax runs over the channel (class) dimension in every cell
    torch.testing.assert_close(out.exp().sum(1), torch.ones(2, 5, 3))


def test_hwc_flatten_order():
    # weights trained after a channels-last flatten (Keras): permute(0, 2, 3, 1) then flatten
    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4 * 5 * 6, 3)

        def forward(self, x):
            return self.fc(self.conv(x).permute(0, 2, 3, 1).flatten(1))

    model = ChannelsLast().eval().double()

    class Plain(nn.Module):  # same weights, the flatten nofc sees
        def __init__(self, src):
            super().__init__()
            self.conv, self.fc = src.conv, src.fc

        def forward(self, x):
            return self.fc(torch.flatten(self.conv(x), 1))

    fcn = nofc.convert(Plain(model), input_size=(3, 7, 8), flatten_order="hwc").double()
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    torch.testing.assert_close(fcn(x).flatten(1), model(x), rtol=0, atol=1e-10)
    x = torch.randn(1, 3, 9, 11, dtype=torch.float64)
    out = fcn(x)
    assert out.shape == (1, 3, 3, 4)
    torch.testing.assert_close(out[0, :, 2, 3], model(x[:, :, 2:9, 3:11])[0], rtol=0, atol=1e-10)


def test_fc_stride_applies_to_first_converted_layer(models):
    fcn = nofc.convert(models("vgg16"), input_size=(3, 224, 224), fc_stride=5)
    assert fcn.get_submodule("classifier.0").stride == (5, 5)
    assert fcn.get_submodule("classifier.3").stride == (1, 1)
    res = nofc.convert(models("resnet18"), input_size=(3, 224, 224), fc_stride=2)
    out = res(torch.randn(1, 3, 352, 352))  # 11x11 features, 7x7 window, stride 2 -> 3x3
    assert out.shape == (1, 1000, 3, 3)


def test_original_model_untouched_including_training_flag():
    model = LeNet5().train()
    before = state_hash(model)
    fcn = nofc.convert(model, input_size=(1, 32, 32))
    nofc.verify(model, fcn, input_size=(1, 32, 32))
    nofc.explain(model, input_size=(1, 32, 32))
    assert model.training and state_hash(model) == before
    assert not fcn.training


class LayerNormHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.LayerNorm(4 * 6 * 6)
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        return self.fc(self.norm(torch.flatten(self.conv(x), 1)))


class SequenceHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 2, stride=2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)  # (B, 16, 8): a sequence of tokens
        t, _ = self.attn(t, t, t)
        return self.fc(t.mean(1))


class WidthLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(6, 6)  # acts on the width dimension

    def forward(self, x):
        return self.fc(self.conv(x)).mean((1, 2, 3))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(144, 2)

    def forward(self, x):
        v = torch.flatten(self.conv(x), 1)
        w = torch.softmax(v @ v.t(), dim=-1)  # mixes samples of the batch
        return self.fc(w @ v)


@pytest.mark.parametrize("cls, match", [
    (LayerNormHead, r"'norm' \(LayerNorm\).*\(2, 144\)"),
    (SequenceHead, r"'fc' \(Linear\): its input is a vector that does not come from "
                   r"flattening a C x H x W feature map .*\(input \(2, 8\), output \(2, 2\)\)"),
    (WidthLinear, r"'fc' \(Linear\).*reference size"),
    # v @ v.t() mixes the samples of the batch: the transpose is refused
    (Attention, r"node 't' \(method \.t\): this op on the flattened feature vector has no "
                r"per-window equivalent \(input \(2, 144\), output \(144, 2\)\)"),
])
def test_unconvertible_heads_are_refused(cls, match):
    model = cls().eval()
    before = state_hash(model)
    with pytest.raises(NofcError, match=match):
        nofc.convert(model, input_size=(3, 8, 8))
    assert state_hash(model) == before


class SharedLinear(nn.Module):
    """One Linear called twice on vectors of the same layout (tied weights)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 8)
        self.tied = nn.Linear(8, 8)

    def forward(self, x):
        v = self.fc(torch.flatten(self.conv(x), 1))
        return self.tied(torch.relu(self.tied(v)))


class SharedAcrossLayouts(nn.Module):
    """One Linear reading a pooled 4x1x1 vector and a flattened 1x2x2 map."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.Conv2d(3, 1, 7)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.a(x).mean((2, 3))) + self.fc(torch.flatten(self.b(x), 1))


def test_shared_linear_converts_once():
    model = SharedLinear().eval().double()
    fcn = nofc.convert(model, input_size=(3, 8, 8))
    assert isinstance(fcn.tied, nn.Conv2d) and fcn.tied.kernel_size == (1, 1)
    assert [c.name for c in fcn._nofc_record.changes] == ["flatten", "fc", "tied"]
    x = torch.randn(1, 3, 10, 9, dtype=torch.float64)
    with torch.no_grad():
        out = fcn(x)
        assert out.shape == (1, 8, 3, 2)
        torch.testing.assert_close(out[0, :, 2, 1], model(x[:, :, 2:10, 1:9])[0], rtol=0,
                                   atol=1e-10)


def test_shared_linear_on_two_layouts_is_refused():
    with pytest.raises(NofcError, match=r"'fc' \(Linear\): a shared Linear reads vectors of "
                                        r"different layouts"):
        nofc.convert(SharedAcrossLayouts().eval(), input_size=(3, 8, 8))


def test_plan_changes_nothing_and_says_why(models):
    from nofc._fx import probe, trace
    from nofc.conversion import Layout, Options, _plan

    model = models("resnet18")
    gm = trace(model)  # shares the model's modules: a change would show in the model
    code, before = gm.code, state_hash(model)
    plan = _plan(gm, probe(gm, (2, 3, 224, 224)).shapes, Options((3, 224, 224), fc_stride=2))
    assert gm.code == code and state_hash(model) == before and isinstance(model.fc, nn.Linear)
    assert [(r.kind, r.name) for r in plan.replacements] == [
        ("pool", "avgpool"), ("drop", "flatten"), ("linear_to_conv", "fc")]
    assert all(r.reason for r in plan.replacements)
    assert plan.layouts["layer4_1_relu_1"] == Layout(512, 7, 7)
    assert plan.layouts["flatten"] == Layout(512, 1, 1, flat=True)
    text = str(plan)
    assert "avgpool: Adaptiveavgpool -> 1x1 -> AvgPool2d(kernel_size=(7, 7), stride=2" in text
    assert "fc: Linear 512 -> 1000 -> Conv2d 512 -> 1000, kernel 1x1" in text


def test_wrong_input_size_suggests_the_right_one(models):
    net = nn.Sequential(nn.Conv2d(1, 6, 5), nn.MaxPool2d(2), nn.Conv2d(6, 120, 5),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(120 * 5 * 5, 10))
    with pytest.raises(NofcError, match=r"'4' \(Linear\)|'5' \(Linear\)") as info:
        nofc.convert(net, input_size=(1, 36, 36))
    msg = str(info.value)
    assert "Linear expects 3000 inputs but the feature map is 120x6x6 = 4320" in msg
    assert "pass input_size=(1, 32, 32)?" in msg


def test_vgg_wrong_size_names_the_pooling(models):
    with pytest.raises(NofcError, match=r"avgpool.*8x8 to 7x7"):
        nofc.convert(models("vgg11"), input_size=(3, 256, 256))


@pytest.mark.parametrize("kwargs, match", [
    ({"pooling": "mean"}, "pooling"),
    ({"fc_stride": 0}, "fc_stride"),
    ({"flatten_order": "whc"}, "flatten_order"),
    ({"input_size": (3, 224)}, "input_size"),
])
def test_bad_options(kwargs, match):
    args = {"input_size": (1, 32, 32), **kwargs}
    with pytest.raises(NofcError, match=match):
        nofc.convert(LeNet5(), **args)


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        nofc.convert(LeNet5(), (1, 32, 32), "global")


def test_squeeze_excitation_pooling_stays_global(models):
    fcn = nofc.convert(models("efficientnet_b0"), input_size=(3, 224, 224))
    record = fcn._nofc_record
    assert len(record.global_context) >= 16  # every MBConv block's SE pooling
    assert any(c.name == "avgpool" for c in record.changes)


def test_float64_model_and_parameters_on_same_dtype():
    model = LeNet5().double()
    fcn = nofc.convert(model, input_size=(1, 32, 32))
    assert {p.dtype for p in fcn.parameters()} == {torch.float64}


def test_model_on_another_device_converts_there():
    # meta stands in for CUDA here: shapes are probed on the model's own device
    model = torchvision.models.resnet18().to("meta")
    fcn = nofc.convert(model, input_size=(3, 64, 64))
    assert {p.device.type for p in fcn.parameters()} == {"meta"}
    assert fcn(torch.empty(1, 3, 96, 96, device="meta")).shape == (1, 1000, 2, 2)


def test_converting_a_converted_model_is_a_no_op(models):
    # a deep copy of a converted model loses nofc's attributes; converting it again must work
    model = models("alexnet")
    fcn = copy.deepcopy(nofc.convert(model, input_size=(3, 224, 224)))
    again = nofc.convert(fcn, input_size=(3, 224, 224))
    assert type(again.get_submodule("classifier.1")).__name__ == "FullConv2d"
    assert nofc.verify(model, again, input_size=(3, 224, 224), batch=1).ok
    assert nofc.dense_predict(fcn, torch.randn(3, 288, 256), (3, 224, 224)).shape == (1, 1000, 3, 2)


# --------------------------------------------------------------------------- issue 10


class ConvHead(nn.Module):
    """A 3x3 convolution to ``c`` channels and a Linear from ``c`` to 2: forward varies."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3)
        self.fc = nn.Linear(c, 2)


class ShapeBranch(ConvHead):
    """Python control flow on shapes (timm's ConvMlp, norm layers reading x.ndim)."""

    def forward(self, x):
        x = self.conv(x)
        if x.ndim == 4 and x.shape[-1] < 2:  # never true at the sizes used here
            x = F.pad(x, (1, 1, 1, 1))
        return self.fc(x.mean((2, 3)))


class Huge(nn.Module):
    """Logits near 1e12, as inception_v3 and hrnet_w18 give with random weights."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 3)
        with torch.no_grad():
            self.fc.weight.mul_(1e12)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 1), 1))


class ChannelsLastHead(nn.Module):
    """MambaOut-style: the body runs (B, H, W, C); the head pools H and W, LayerNorm, Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = self.conv(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        return self.fc(self.norm(x.mean((1, 2))))


class GlobalAttention(ConvHead):
    """Attention over every position of the map (PVT-v2, CoaT), then a pooled head."""

    def forward(self, x):
        x = self.conv(x)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, HW, C): a token per position
        t = t + F.scaled_dot_product_attention(t, t, t)
        x = t.transpose(1, 2).reshape(b, c, h, w)
        return self.fc(x.mean((2, 3)))


def test_control_flow_on_shapes_is_captured_at_the_reference_size():
    torch.manual_seed(0)
    model = ShapeBranch().eval()
    fcn = nofc.convert(model, input_size=(3, 8, 8))
    assert nofc.verify(model, fcn, (3, 8, 8)).ok
    x = torch.randn(1, 3, 12, 10)
    torch.testing.assert_close(fcn(x)[0, :, 1, 0], model(x[:, :, 1:9, 0:8])[0], rtol=0,
                               atol=1e-5)


def test_control_flow_on_values_is_one_line_naming_the_module():
    class Gate(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = Gate()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.gate(x).flatten(1))

    with pytest.raises(NofcError, match=r"^cannot trace Net with torch.fx .* the control "
                                        r"flow in 'gate' \(Gate\) depends on tensor values"):
        nofc.convert(Net(), input_size=(1, 2, 2))


def test_float64_tolerance_scales_with_the_logits():
    torch.manual_seed(0)
    model = Huge().eval()
    fcn = nofc.convert(model, input_size=(3, 8, 8))
    r = nofc.verify(model, fcn, (3, 8, 8))
    assert r.ok and r.tolerance == "abs 1e-10 x max(1, max|ref|)", r
    assert r.max_rel_error <= 1e-14


def test_float32_inside_a_float64_model_is_named():
    """A model that builds a float32 constant in its forward (timm's csatv2 does) cannot
    meet float64's tolerance; verify says where precision is lost instead of leaving a
    bare MISMATCH, and float32 passes."""

    class Scale(nn.Module):
        def __init__(self, dtype):
            super().__init__()
            self.dtype = dtype

        def forward(self, x):
            return x * torch.tensor(1.1, dtype=self.dtype or x.dtype).to(x.dtype)

    def net(dtype):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), Scale(dtype), nn.Flatten(),
                             nn.Linear(4 * 6 * 6, 5)).eval()

    model, clean = net(torch.float32), net(None)
    fcn = nofc.convert(clean, input_size=(3, 8, 8))
    assert nofc.verify(clean, fcn, (3, 8, 8)).ok
    r = nofc.verify(model, fcn, (3, 8, 8))
    assert not r.ok and 1e-10 < r.max_rel_error < 1e-6
    assert "a float32 constant in module '1'" in r.note and "dtype=torch.float32" in str(r)
    assert nofc.verify(model, fcn, (3, 8, 8), dtype=torch.float32).ok


def test_channels_last_head_becomes_windowed_pooling():
    torch.manual_seed(0)
    model = ChannelsLastHead().eval()
    fcn, record = nofc.conversion.convert_with_record(model, (3, 8, 8))
    assert [r.kind for r in record.plan.replacements] == [
        "pool", "last_dim", "linear_to_conv"]
    assert nofc.verify(model, fcn, (3, 8, 8)).ok
    x = torch.randn(1, 3, 10, 11)
    torch.testing.assert_close(fcn(x)[0, :, 2, 1], model(x[:, :, 2:10, 1:9])[0], rtol=0,
                               atol=1e-5)


def test_attention_over_all_positions_is_global_context():
    torch.manual_seed(0)
    model = GlobalAttention(8).eval()
    fcn, record = nofc.conversion.convert_with_record(model, (3, 8, 8))
    assert record.global_context == ["scaled_dot_product_attention"]
    assert "sums over 36 positions" in str(record.plan)
    assert nofc.verify(model, fcn, (3, 8, 8)).ok
    with pytest.raises(NofcError):  # tiles cannot reproduce it: refused, one line
        nofc.tiled_predict(fcn, torch.randn(3, 40, 40).numpy(), (3, 8, 8), tile=16,
                           progress=False)


def test_class_token_head_is_refused_with_the_reason():
    class ClassToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 2, stride=2)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(2).transpose(1, 2)[:, 0])

    with pytest.raises(NofcError, match=r"'fc' \(Linear\).* takes one token of a "
                                        r"\(2, 16, 8\) sequence \(a class token\)"):
        nofc.convert(ClassToken(), input_size=(3, 8, 8))


class _BufferMath(nn.Module):
    """A forward that computes from a buffer (CSATv2's DCT statistics, ``var ** 0.5``)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.register_buffer("var", torch.rand(4, 1, 1) + 0.5)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        x = self.conv(x) / (self.var ** 0.5 + 1e-8)
        return self.fc(x.flatten(1))


def test_computation_on_a_buffer_stays_in_the_graph():
    """torch.fx folds it into a float32 constant at trace time, which .double() and .to()
    leave behind; read as a node, it follows the module (float64 verifies to 1e-10)."""
    torch.manual_seed(0)
    model = _BufferMath().eval()
    fcn = nofc.convert(model, (1, 8, 8))
    assert not [n for n in fcn.graph.nodes
                if n.op == "get_attr" and n.target.startswith("_tensor_constant")]
    report = nofc.verify(model, fcn, (1, 8, 8))  # float64
    assert report.ok and report.max_rel_error < 1e-14, report


# --------------------------------------------------------------------------- issue 21: in place


class InPlace(nn.Module):
    """Conv, an in-place write whose result the forward does not read (``how``), a stride-2
    conv, Linear: without padding, so every cell of the map is the classifier on its crop."""

    SIZE = (3, 10, 10)  # conv: 8x8, then stride 2: 4x4

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3)
        self.branch = nn.Conv2d(4, 4, 1)
        self.act = nn.ReLU(inplace=True)
        self.gain = nn.Parameter(torch.tensor(1.7))
        self.down = nn.Conv2d(4, 4, 2, stride=2)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        x = self.conv(x) - 0.1  # (B, 4, 8, 8)
        how = self.how
        if how == "mul_":  # timm's NormFreeBlock (skipinit)
            x.mul_(self.gain)
        elif how == "add_ branch":
            x.add_(self.branch(x))
        elif how == "copy_":
            x.copy_(self.branch(x))
        elif how == "x[:, :2] *= 2":
            x[:, :2] *= 2
        elif how == "x[:, 1:3] = branch":
            x[:, 1:3] = self.branch(x)[:, :2]
        elif how == "x[:, 1:3].mul_":
            x[:, 1:3].mul_(self.gain)
        elif how == "v += gain":  # a view's +=: fx alone traces it as v = v + gain
            v = x[:, 2:]
            v += self.gain
        elif how == "alias +=":  # fx alone: shortcut keeps the value from before
            shortcut = x
            x += self.branch(x)
            x = x * shortcut
        elif how == "ReLU(inplace=True)":
            self.act(x)
        elif how == "F.relu(inplace=True)":
            F.relu(x, inplace=True)
        elif how == "F.leaky_relu(x, 0.1, True)":
            F.leaky_relu(x, 0.1, True)
        elif how == "torch.relu_":
            torch.relu_(x)
        elif how == "flat.mul_":  # on the flattened vector, which stays a map
            f = self.down(x).flatten(1)
            f.mul_(self.gain)
            return self.fc(f)
        return self.fc(self.down(x).flatten(1))


_IN_PLACE = ["mul_", "add_ branch", "copy_", "x[:, :2] *= 2", "x[:, 1:3] = branch",
             "x[:, 1:3].mul_", "v += gain", "alias +=", "ReLU(inplace=True)",
             "F.relu(inplace=True)", "F.leaky_relu(x, 0.1, True)", "torch.relu_", "flat.mul_"]


@pytest.mark.parametrize("how", _IN_PLACE)
def test_in_place_writes_are_kept(how):
    torch.manual_seed(0)
    model = InPlace(how).eval()
    size = InPlace.SIZE
    fcn = nofc.convert(model, input_size=size)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        r = nofc.verify(model, fcn, input_size=size, dtype=dtype)
        scale = r.max_abs_error / r.max_rel_error if r.max_rel_error else 1.0
        assert r.ok and r.max_abs_error <= tol * max(1.0, scale), r
    geo = nofc.geometry(fcn, size)
    assert geo.exact and geo.stride == (2, 2) and not geo.measured, geo
    big = torch.randn(2, 3, 10 + 2 * 5, 10 + 2 * 3, dtype=torch.float64)
    f64, m64 = copy.deepcopy(fcn).double(), copy.deepcopy(model).double()
    dense = nofc.dense_predict(f64, big, size)
    naive = nofc.sliding_window_predict(m64, big, size, step=2)
    assert dense.shape == naive.shape == (2, 5, 6, 4)
    torch.testing.assert_close(dense, naive, rtol=0, atol=1e-10)
    # the dilated network (one pass, a cell every pixel) keeps the writes too
    fine = nofc.dense_predict(f64, big, size, step=1, method="dilate")
    torch.testing.assert_close(fine, nofc.sliding_window_predict(m64, big, size, step=1),
                               rtol=0, atol=1e-10)


def test_in_place_writes_stay_in_the_converted_graph():
    torch.manual_seed(0)
    model = InPlace("mul_").eval()
    fcn = nofc.convert(model, input_size=InPlace.SIZE)
    assert [n.name for n in fcn.graph.nodes if n.op == "call_method"] == ["mul_"]
    before = nofc.verify(model, fcn, InPlace.SIZE)
    fcn.graph.eliminate_dead_code()  # what conversion did before: the gain is gone
    fcn.recompile()
    after = nofc.verify(model, fcn, InPlace.SIZE)
    assert before.ok and not after.ok and after.max_rel_error > 0.1, (before, after)


class _PaddedBranch(nn.Module):
    """A 3x3 branch added into the map, in place or not: the field grows by a pixel a side."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.in_place = in_place
        self.conv = nn.Conv2d(3, 4, 3)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        x = self.conv(x)
        if self.in_place:
            x.add_(self.branch(x))  # 'fc' reads x: the graph links it to x before the add
        else:
            x = x + self.branch(x)
        return self.fc(x.flatten(1))


def test_in_place_branch_widens_the_receptive_field():
    torch.manual_seed(0)
    geos = {}
    for in_place in (False, True):
        model = _PaddedBranch(in_place).eval()
        fcn = nofc.convert(model, input_size=(3, 8, 8))
        r = nofc.verify(model, fcn, (3, 8, 8))
        assert r.ok and r.max_abs_error <= 1e-10, r
        geos[in_place] = nofc.geometry(fcn, (3, 8, 8))
    walked, measured = geos[False], geos[True]
    assert walked.receptive_field == (10, 10) and walked.rf_offset == (-1, -1), walked
    assert "'add_' (method .add_) writes in place into the map 'conv'" in measured.measured
    assert (measured.stride, measured.receptive_field, measured.rf_offset, measured.exact) == \
        (walked.stride, walked.receptive_field, walked.rf_offset, walked.exact)


class _CropWrite(nn.Module):
    """A write into rows 1.. of the map: the first row of every window differs, so the map
    of a larger image is not the classifier on crops (verify at the size still holds)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        x = self.conv(x)
        x[:, :, 1:].mul_(2.0)
        return self.fc(x.flatten(1))


def test_in_place_write_into_a_crop_is_not_called_exact():
    torch.manual_seed(0)
    model = _CropWrite().eval()
    fcn = nofc.convert(model, input_size=(3, 8, 8))
    r = nofc.verify(model, fcn, (3, 8, 8))
    assert r.ok and r.max_abs_error <= 1e-10, r
    geo = nofc.geometry(fcn, (3, 8, 8))
    assert not geo.exact and "writes in place into a part of the map 'conv'" in geo.measured
    assert any("differ from the network on their crops" in why for why in geo.reasons), geo
    r = nofc.verify(model, fcn, (3, 8, 8), image=torch.randn(3, 12, 12))
    assert not r.exact and not r.ok, r  # and the map indeed differs


class _NormalisesInPlace(nn.Module):
    """Preprocessing in place on the caller's tensor, then a stride-2 classifier."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        x.sub_(0.5).mul_(2.0)
        return self.fc(self.conv(x).flatten(1))


def test_a_forward_that_writes_into_its_input_gets_a_copy():
    """verify ran the model, then the network, on one tensor (a false MISMATCH); dense
    prediction by shifts ran several passes over one image, each normalising it again."""
    torch.manual_seed(0)
    model = _NormalisesInPlace().eval()
    size = (3, 7, 7)
    fcn = nofc.convert(model, input_size=size)
    r = nofc.verify(model, fcn, size)
    assert r.ok and r.max_abs_error <= 1e-10, r
    image = torch.randn(1, 3, 15, 13, dtype=torch.float64)
    before = image.clone()
    dense = nofc.dense_predict(copy.deepcopy(fcn).double(), image, size, step=1,
                               method="shift")
    assert torch.equal(image, before)
    naive = nofc.sliding_window_predict(copy.deepcopy(model).double(), image, size, step=1)
    torch.testing.assert_close(dense, naive, rtol=0, atol=1e-10)


def test_a_deep_copy_keeps_what_conversion_and_dilation_recorded(models):
    """copy.deepcopy of a converted or dilated network gives the same geometry and
    explanation: what conversion recorded (a squeeze-and-excitation pooling is global
    context) is not lost with the copy (it was: the copy's geometry refused the SE pools)."""
    size = (3, 224, 224)
    fcn = nofc.convert(models("mobilenet_v3_small"), size)
    twin = copy.deepcopy(fcn)
    assert nofc.geometry(twin, size) == nofc.geometry(fcn, size)
    assert nofc.geometry(twin, size).global_context
    # the same layers, before and after (the copy's class is torch.fx's own GraphModule)
    assert (str(nofc.explain(twin, size)).split(":", 1)[1]
            == str(nofc.explain(fcn, size)).split(":", 1)[1])
    lenet = nofc.convert(LeNet5().eval(), (1, 32, 32))
    dilated = nofc.dilate(lenet, (1, 32, 32), 2)
    assert nofc.geometry(copy.deepcopy(dilated), (1, 32, 32)) == nofc.geometry(dilated,
                                                                               (1, 32, 32))
