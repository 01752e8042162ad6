"""The classic worked examples of the FC-to-conv equivalence, as tests."""

import pytest
import torch
import torch.nn as nn
import torchvision

import nofc
from nofc.zoo import LeNet5


class ThreeToTwo(nn.Module):
    """f(x) = ReLU(Wx + b), W = [[0, 1, 1], [2, 3, 5]], b = [8, 13]."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[0.0, 1, 1], [2, 3, 5]]))
            self.fc.bias.copy_(torch.tensor([8.0, 13]))

    def forward(self, x):
        return torch.relu(self.fc(torch.flatten(x, 1)))


def test_three_to_two_dense_layer_is_a_1x1_conv():
    model = ThreeToTwo()
    fcn = nofc.convert(model, input_size=(3, 1, 1))
    conv = fcn.fc
    assert isinstance(conv, nn.Conv2d)
    assert conv.weight.shape == (2, 3, 1, 1)  # 2 filters of shape 3x1x1
    assert sum(p.numel() for p in fcn.parameters()) == 8
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert model(x).tolist() == [[13.0, 36.0]]  # [0+2+3+8, 2+6+15+13]
    assert fcn(x.view(1, 3, 1, 1)).flatten().tolist() == [13.0, 36.0]
    # on a 3 x 2 x 2 input the same map is applied at each of the 4 positions
    img = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    out = fcn.double()(img)
    assert out.shape == (1, 2, 2, 2)
    for i in range(2):
        for j in range(2):
            torch.testing.assert_close(out[0, :, i, j], model.double()(img[:, :, i, j])[0],
                                       rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def vgg16():
    torch.manual_seed(0)
    return torchvision.models.vgg16().eval()


def test_vgg16_fc6_is_4096_filters_of_512x7x7(vgg16):
    fcn = nofc.convert(vgg16, input_size=(3, 224, 224))
    fc6, fc7, fc8 = (fcn.get_submodule(f"classifier.{i}") for i in (0, 3, 6))
    assert fc6.weight.shape == (4096, 512, 7, 7)
    assert fc7.weight.shape == (4096, 4096, 1, 1)
    assert fc8.weight.shape == (1000, 4096, 1, 1)
    # the same numbers, only a view: fc6 filter k is row k of the Linear, reshaped
    torch.testing.assert_close(fc6.weight[17], vgg16.classifier[0].weight[17].view(512, 7, 7),
                               rtol=0, atol=0)
    report = nofc.verify(vgg16, fcn, input_size=(3, 224, 224), batch=1)
    assert report.ok and report.output_shape == (1, 1000, 1, 1)
    with torch.no_grad():
        assert fcn(torch.randn(1, 3, 384, 384)).shape == (1, 1000, 6, 6)


def test_vgg16_fc_stride_5_gives_2x2(vgg16):
    fcn = nofc.convert(vgg16, input_size=(3, 224, 224), fc_stride=5)
    with torch.no_grad():
        assert fcn(torch.randn(1, 3, 384, 384)).shape == (1, 1000, 2, 2)


def test_vgg16_explain_table(vgg16):
    table = nofc.explain(vgg16, input_size=(3, 224, 224), at=(384, 384))
    text = str(table)
    row = next(r for r in table.rows if r.name == "classifier.0")
    assert row.kernel_after == "4096x512x7x7" and row.shape_at == "4096x6x6"
    assert row.params_before == row.params_after == 102_764_544
    assert "138,357,544 before, 138,357,544 after (equal)" in text
    assert table.output_at == (1, 1000, 6, 6)


def test_lenet5_c5_already_full_connection():
    model = LeNet5().eval()
    fcn = nofc.convert(model, input_size=(1, 32, 32))
    changed = {c.name for c in fcn._nofc_record.changes}
    assert changed == {"view", "f6", "output"}  # C5 is untouched: already a full connection
    assert fcn.c5.weight.shape == (120, 16, 5, 5)
    assert fcn.f6.weight.shape == (84, 120, 1, 1) and fcn.output.weight.shape == (10, 84, 1, 1)
    assert nofc.verify(model, fcn, input_size=(1, 32, 32)).ok
    x = torch.randn(1, 1, 32, 64, dtype=torch.float64)
    out = fcn.double()(x)
    assert out.shape == (1, 10, 1, 9)
    # no padding: cell j is LeNet-5 on the crop at column 4 * j
    ref = model.double()
    for j in range(9):
        torch.testing.assert_close(out[0, :, 0, j], ref(x[:, :, :, 4 * j:4 * j + 32])[0],
                                   rtol=0, atol=1e-10)
