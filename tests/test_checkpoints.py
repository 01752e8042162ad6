"""Checkpoints as people save them (issue 23): a fine-tuned head of any size, DDP's
``module.`` prefix, Lightning's nested ``.ckpt``, ``.safetensors``; each gives the map of the
model built by hand, in one command."""

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

import nofc
from nofc import NofcError
from nofc.cli import main
from nofc.io import head_classes, load_model

CLASSES = ["tumour", "stroma"]


def _finetuned(spec: str) -> torch.nn.Module:
    """A 2-class fine-tune, built the way its user built it (random weights, seeded)."""
    torch.manual_seed(0)
    kind, name = spec.split(":")
    if kind == "timm":
        return timm.create_model(name, pretrained=False, num_classes=2).eval()
    return torchvision.models.get_model(name, weights=None, num_classes=2).eval()


def _save(model, path, form: str):
    sd = model.state_dict()
    if form == "ddp":
        torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    elif form == "lightning":
        torch.save({"epoch": 7, "global_step": 700,
                    "state_dict": {f"model.{k}": v for k, v in sd.items()},
                    "hyper_parameters": {"classes": CLASSES, "lr": 1e-3}}, path)
    elif form == "ema":
        torch.save({"state_dict": sd, "state_dict_ema": sd, "optimizer": {}}, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


FORMS = {"ddp": "w.pth", "lightning": "w.ckpt", "ema": "w.pt", "safetensors": "w.safetensors"}


@pytest.mark.parametrize("spec, form", [("timm:resnet18", f) for f in FORMS]
                         + [("torchvision:resnet50", "lightning")])
def test_a_two_class_checkpoint_loads_as_saved(spec, form, tmp_path):
    model = _finetuned(spec)
    path = _save(model, tmp_path / FORMS[form], form)
    loaded = load_model(spec, weights=str(path))
    want = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert getattr(loaded, "nofc_class_names", None) == (CLASSES if form == "lightning"
                                                         else None)


def _scores(tmp_path, argv) -> np.ndarray:
    out, scores = tmp_path / "map.png", tmp_path / "map.npz"
    assert main(["heatmap", *argv, "-o", str(out), "--scores", str(scores), "--force",
                 "--mean", "0.5", "--std", "0.25"]) == 0
    return np.load(scores)["scores"]


@pytest.mark.parametrize("spec, form", [("timm:resnet18", "lightning"),
                                        ("torchvision:resnet50", "ddp"),
                                        ("timm:resnet18", "safetensors")])
def test_heatmap_of_a_checkpoint_is_the_map_of_the_model_built_by_hand(spec, form, tmp_path,
                                                                       capsys):
    model = _finetuned(spec)
    path = _save(model, tmp_path / FORMS[form], form)
    img = np.random.default_rng(1).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "scan.png")
    got = _scores(tmp_path, [spec, str(tmp_path / "scan.png"), "--weights", str(path),
                             "--input-size", "3x64x64"])
    x = (torch.from_numpy(np.moveaxis(img, -1, 0).astype(np.float32)) / 255 - 0.5) / 0.25
    want = nofc.dense_predict(nofc.convert(model, (3, 64, 64)), x[None], (3, 64, 64))[0]
    assert got.shape == tuple(want.shape) == (2, 2, 3)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4,
                               atol=1e-4 * float(want.abs().max()))
    if form == "lightning":
        assert "tumour (0): peak probability" in capsys.readouterr().out


def test_num_classes_and_what_does_not_fit(tmp_path, capsys):
    assert load_model("timm:resnet18", num_classes=3).fc.out_features == 3
    path = _save(_finetuned("timm:resnet18"), tmp_path / "w.pth", "ddp")
    with pytest.raises(NofcError, match=r"fc.weight: file \(2, 512\) vs model \(3, 512\)"):
        load_model("timm:resnet18", weights=str(path), num_classes=3)
    with pytest.raises(NofcError, match="does not fit VGG: .* missing"):
        load_model("torchvision:vgg11", weights=str(path))
    with pytest.raises(NofcError, match="--num-classes applies to torchvision:NAME and timm"):
        load_model("nofc:lenet5", num_classes=2)
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "bare.ckpt")
    with pytest.raises(NofcError, match="not a state_dict .*none of state_dict, model"):
        load_model("timm:resnet18", weights=str(tmp_path / "bare.ckpt"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{junk")
    with pytest.raises(NofcError, match="not a safetensors file"):
        load_model("timm:resnet18", weights=str(tmp_path / "junk.safetensors"))
    assert main(["explain", "nofc:lenet5", "--input-size", "1x32x32",
                 "--num-classes", "0"]) == 2
    assert "--num-classes must be a positive number" in capsys.readouterr().err


def test_head_classes_reads_only_a_classifier_difference():
    own = {"a.weight": torch.zeros(4, 3), "fc.weight": torch.zeros(10, 4)}
    assert head_classes({"a.weight": torch.zeros(4, 3), "fc.weight": torch.zeros(5, 4)}, own) == 5
    assert head_classes({"a.weight": torch.zeros(5, 3), "fc.weight": torch.zeros(5, 4)}, own) \
        is None  # a body that differs is another architecture, not another head
    assert head_classes(dict(own), own) is None


def test_pretrained_weights_come_from_the_library_cache_and_are_never_downloaded(
        tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    # offline and empty: one line naming the file and where it goes
    with pytest.raises(NofcError, match=r"torchvision:resnet18.IMAGENET1K_V1 weights are not "
                                        r"in torch hub's cache: put https://download.pytorch"
                                        r".org/models/resnet18-f37072fd.pth at .*torch/hub/"
                                        r"checkpoints/resnet18-f37072fd.pth"):
        load_model("torchvision:resnet18", pretrained=True)
    with pytest.raises(NofcError, match=r"timm:resnet18.a1_in1k pretrained weights are not in "
                                        r"the local cache; nofc never downloads: fetch them "
                                        r"\(huggingface-cli download timm/resnet18.a1_in1k\)"):
        load_model("timm:resnet18.a1_in1k")
    with pytest.raises(NofcError, match="has weights IMAGENET1K_V1, DEFAULT, not 'V9'"):
        load_model("torchvision:resnet18.V9")
    # the files placed where each library keeps them (weights made here: no hub)
    torch.manual_seed(3)
    tv = torchvision.models.resnet18()
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(tv.state_dict(), folder / "resnet18-f37072fd.pth")
    got = load_model("torchvision:resnet18.IMAGENET1K_V1")
    assert all(torch.equal(got.state_dict()[k], v) for k, v in tv.state_dict().items())
    assert got.pretrained_cfg["input_size"] == (3, 224, 224)
    assert got.nofc_class_names[:2] == ["tench", "goldfish"]
    tm = timm.create_model("resnet18", pretrained=False)
    snap = tmp_path / "hf" / "models--timm--resnet18.a1_in1k" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    save_file(tm.state_dict(), str(snap / "model.safetensors"))
    got = load_model("timm:resnet18", pretrained=True)  # the default tag, a1_in1k
    assert all(torch.equal(got.state_dict()[k], v) for k, v in tm.state_dict().items())
    assert got.nofc_class_names[0].startswith("tench")
    # the CLI reads the input size from the torchvision weights
    assert main(["explain", "torchvision:resnet18", "--pretrained", "--changed"]) == 0
    assert "224" in capsys.readouterr().out
