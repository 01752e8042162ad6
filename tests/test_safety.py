"""Safety: model files cannot run code unasked, the user's model is never touched, and an
output file is either the old one or the complete new one (never half-written)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torchvision

import nofc
from nofc import NofcError
from nofc.cli import main
from nofc.io import atomic_output, load_model
from nofc.zoo import LeNet5

from conftest import state_hash

LENET = ["nofc:lenet5", "--input-size", "1x32x32"]


class _Payload:
    """Unpickling this object runs ``open(marker, 'w')``: the classic pickle exploit."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def _error_line(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------- model files


def test_state_dicts_load_with_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    sd = LeNet5().state_dict()
    torch.save(sd, path)
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model = load_model("nofc:lenet5", weights=str(path))
    assert calls == [True]
    torch.testing.assert_close(model.state_dict(), sd, rtol=0, atol=0)


def test_weights_file_with_code_does_not_run(tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = tmp_path / "w.pt"
    sd = dict(LeNet5().state_dict())
    sd["f6.weight"] = _Payload(marker)
    torch.save(sd, evil)
    err = _error_line(capsys, ["explain", *LENET, "--weights", str(evil)])
    assert "weights_only=True" in err and "cannot run code" in err
    assert not marker.exists(), "loading weights ran code from the file"
    with pytest.raises(NofcError, match="pickled Python objects"):
        load_model("nofc:lenet5", weights=str(evil))
    assert not marker.exists()


def test_pickled_model_needs_trust_pickle(tmp_path, capsys):
    path = tmp_path / "lenet.pt"
    torch.save(LeNet5(), path)
    err = _error_line(capsys, ["explain", str(path), "--input-size", "1x32x32"])
    assert "unpickling can run arbitrary code" in err and "--trust-pickle" in err
    assert main(["explain", str(path), "--input-size", "1x32x32", "--trust-pickle"]) == 0
    assert "Conv2d 120->84" in capsys.readouterr().out


def test_model_file_with_code_does_not_run_without_trust(tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = tmp_path / "model.pt"
    torch.save(_Payload(marker), evil)
    err = _error_line(capsys, ["convert", str(evil), "--input-size", "1x32x32",
                               "-o", str(tmp_path / "out.pt")])
    assert "--trust-pickle" in err
    assert not marker.exists(), "a model file ran code without --trust-pickle"
    with pytest.raises(NofcError, match="unpickling can run arbitrary code"):
        load_model(str(evil))
    assert not marker.exists()
    # the file really is hostile: with --trust-pickle (the user's explicit choice) it runs
    _error_line(capsys, ["explain", str(evil), "--input-size", "1x32x32", "--trust-pickle"])
    assert marker.read_text() == "code ran"
    assert not (tmp_path / "out.pt").exists()


def test_python_file_runs_only_when_named_as_factory(tmp_path, capsys):
    marker = tmp_path / "marker"
    src = tmp_path / "net.py"
    src.write_text(f"open({str(marker)!r}, 'w').write('imported')\n"
                   "from nofc.zoo import LeNet5\n\ndef build():\n    return LeNet5()\n")
    _error_line(capsys, ["explain", str(src), "--input-size", "1x32x32"])  # no :factory
    _error_line(capsys, ["explain", *LENET, "--weights", str(src)])  # as weights
    assert not marker.exists(), "a .py file was imported without being named as MODEL"
    assert main(["explain", f"{src}:build", "--input-size", "1x32x32"]) == 0
    assert marker.exists()


# --------------------------------------------------------------------------- the user's model


def _everything(model, size):
    """Every public function that takes the user's model, with small inputs."""
    fcn = nofc.convert(model, input_size=size)
    assert nofc.verify(model, fcn, input_size=size, dtype=torch.float64).ok
    nofc.explain(model, size, at=(size[1] + 32, size[2] + 32))
    image = torch.randn(size[0], size[1] + 32, size[2] + 32)
    if hasattr(nofc, "dense_predict"):
        nofc.dense_predict(model, image, size)  # converts a copy itself
    if hasattr(nofc, "tiled_predict") and not fcn._nofc_record.global_context:
        nofc.tiled_predict(model, nofc.open_source(image.numpy(), layout="chw"), size,
                           tile=size[1] + 32, progress=False)
    return fcn


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "squeezenet1_0"])
def test_torchvision_model_is_never_modified(name):
    """Train mode (BatchNorm statistics would move if nofc ran the model itself) and a few
    frozen parameters (requires_grad must survive)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).train()
    for p in list(model.parameters())[:3]:
        p.requires_grad_(False)
    before = state_hash(model)
    _everything(model, (3, 32, 32))
    assert state_hash(model) == before, f"nofc modified {name}"
    assert model.training


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_lenet_is_never_modified(mode):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LeNet5().to(device).train(mode == "train")
    before = state_hash(model)
    fcn = _everything(model, (1, 32, 32))
    assert state_hash(model) == before
    assert next(fcn.parameters()).device.type == device


def test_sliding_window_predict_keeps_training_flag():
    model = LeNet5().train()
    before = state_hash(model)
    nofc.sliding_window_predict(model, torch.randn(1, 64, 64), (1, 32, 32), step=32)
    assert state_hash(model) == before and model.training


# --------------------------------------------------------------------------- no lost work


def test_output_is_written_next_to_target_then_renamed(tmp_path, monkeypatch):
    renames = []
    real = os.replace

    def spy(src, dst):
        renames.append((Path(src), Path(dst)))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    target = tmp_path / "fcn.pt"
    assert main(["convert", *LENET, "-o", str(target)]) == 0
    (src, dst), = renames
    assert dst == target and src.parent == target.parent
    assert src.name.startswith(".fcn.") and src.name.endswith(".part.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fcn.pt"]
    torch.jit.load(str(target))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    """Written through a temporary file (mkstemp makes it 0600), an output still gets the
    mode any program's new file gets, so colleagues on a shared server can read it."""
    old = os.umask(umask)
    try:
        assert main(["convert", *LENET, "-o", str(tmp_path / "fcn.pt")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "fcn.pt").stat().st_mode & 0o777 == mode


def test_force_overwrites_only_when_asked(tmp_path, capsys):
    target = tmp_path / "fcn.pt"
    target.write_bytes(b"old")
    assert main(["convert", *LENET, "-o", str(target)]) == 2
    assert target.read_bytes() == b"old"
    assert main(["convert", *LENET, "-o", str(target), "--force"]) == 0
    assert target.read_bytes() != b"old"
    torch.jit.load(str(target))


def test_error_while_writing_keeps_old_file(tmp_path, monkeypatch, capsys):
    target = tmp_path / "fcn.pt"
    target.write_bytes(b"old")

    def half_then_interrupt(module, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt  # Ctrl-C while writing

    monkeypatch.setattr(torch.jit, "save", half_then_interrupt)
    assert main(["convert", *LENET, "-o", str(target), "--force"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fcn.pt"]


def test_atomic_output_cleans_up_on_error(tmp_path):
    target = tmp_path / "map.npy"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            Path(tmp).write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


_KILLED_RUN = textwrap.dedent("""
    import signal, sys, time, torch
    from nofc.cli import main

    # Ctrl-C as in a terminal, also when the suite runs as a background job (whose
    # children inherit SIGINT ignored, so Python installs no KeyboardInterrupt handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def slow_save(module, path, *args, **kwargs):  # a long write, stopped halfway
        with open(path, "wb") as f:
            f.write(b"PK half of a TorchScript archive")
            f.flush()
            print("WRITING", path, flush=True)
            time.sleep(120)

    torch.jit.save = slow_save
    sys.exit(main(["convert", "nofc:lenet5", "--input-size", "1x32x32", "-o", sys.argv[1],
                   "--force"]))
""")


@pytest.mark.parametrize("sig, old", [("SIGKILL", True), ("SIGKILL", False), ("SIGINT", True)])
def test_killed_run_leaves_old_file_or_nothing(tmp_path, sig, old):
    target = tmp_path / "fcn.pt"
    if old:
        target.write_bytes(b"old")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(target)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # blocks until the write has started
        assert line.startswith("WRITING"), (line, proc.stderr.read())
        part = Path(line.split(maxsplit=1)[1].strip())
        assert part.parent == tmp_path and part.name.startswith(".fcn.")
        assert part.exists()
        proc.send_signal(getattr(signal, sig))
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if old:
        assert target.read_bytes() == b"old"
    else:
        assert not target.exists()
    if sig == "SIGINT":  # Ctrl-C: the temp file is removed, exit code 130
        assert code == 130 and not part.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["fcn.pt"]
    else:  # SIGKILL cannot be caught: a hidden temp file may stay, never at the target
        assert code == -signal.SIGKILL and part.exists()
        # the leftover does not get in the way of the next run
        assert main(["convert", *LENET, "-o", str(target), "--force"]) == 0
        torch.jit.load(str(target))
