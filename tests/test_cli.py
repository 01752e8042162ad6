import subprocess
import sys
from pathlib import Path

import torch
import torchvision

from nofc.cli import main
from nofc.zoo import LeNet5


def test_explain_prints_table(capsys):
    assert main(["explain", "nofc:lenet5", "--input-size", "1x32x32", "--at", "32x64"]) == 0
    out = capsys.readouterr().out
    assert "Linear 120->84" in out and "Conv2d 120->84" in out and "10x1x9" in out


def test_explain_verify(capsys):
    assert main(["explain", "nofc:lenet5", "--input-size", "1x32x32", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "OK: float64" in out and "OK: float32" in out


def test_convert_writes_torchscript_that_runs_larger(tmp_path, capsys):
    out = tmp_path / "fcn.pt"
    assert main(["convert", "torchvision:resnet18", "--input-size", "3x64x64", "-o", str(out)]) == 0
    assert out.exists() and not list(tmp_path.glob(".*part*"))
    loaded = torch.jit.load(str(out))
    assert loaded(torch.randn(1, 3, 96, 128)).shape == (1, 1000, 2, 3)
    # an existing output is kept unless --force
    stamp = out.stat().st_mtime_ns
    assert main(["convert", "torchvision:resnet18", "--input-size", "3x64x64", "-o", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.stat().st_mtime_ns == stamp


def test_factory_and_weights(tmp_path, capsys):
    src = tmp_path / "mynet.py"
    src.write_text("from nofc.zoo import LeNet5\n\ndef build():\n    return LeNet5()\n")
    model = LeNet5()
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "o.pt"
    rc = main(["convert", f"{src}:build", "--weights", str(weights), "--input-size", "1x32x32",
               "-o", str(out)])
    assert rc == 0
    loaded = torch.jit.load(str(out))
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(loaded(x).flatten(1), model(x), rtol=1e-4, atol=1e-5)


def test_errors_are_one_line_exit_2(tmp_path, capsys):
    cases = [
        ["explain", "torchvision:nosuchnet", "--input-size", "3x224x224"],
        ["explain", str(tmp_path / "missing.py") + ":f", "--input-size", "3x224x224"],
        ["explain", "nofc:lenet5", "--input-size", "3x224"],
        ["explain", "nofc:lenet5", "--input-size", "1x28x28"],
        ["convert", "nofc:lenet5", "--input-size", "1x32x32", "-o",
         str(tmp_path / "no" / "dir" / "x.pt")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("nofc: error: ") and err.count("\n") == 1, err
        assert "Traceback" not in err


def test_mismatched_state_dict(tmp_path, capsys):
    weights = tmp_path / "w.pt"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    assert main(["explain", "nofc:lenet5", "--weights", str(weights),
                 "--input-size", "1x32x32"]) == 2
    err = capsys.readouterr().err
    assert "does not fit LeNet5" in err and "missing" in err


def test_console_script_entry_point():
    exe = Path(sys.executable).with_name("nofc")
    res = subprocess.run([str(exe), "explain", "nofc:lenet5", "--input-size", "1x30x32"],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and res.stderr.startswith("nofc: error:")
