"""Runs that share one Dask cluster (issue 27, points 1 and 2).

Loading a model on a worker must never trace: torch's own pickle of a GraphModule traces
its code again, and the tracer replaces ``nn.Module.__call__`` for the whole process while
it runs, so a tile of another run on that worker failed with ``NameError: module is not
installed as a submodule``. A model the workers cannot load is one line, and leaves no
plugin behind that would stop the workers started afterwards.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
import torch.fx as fx

import nofc
import nofc.tiling as tiling
from nofc import NofcError, _fx
from nofc.zoo import LeNet5

distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")

SIZE = (1, 32, 32)
F64 = torch.float64


@pytest.fixture(scope="module")
def fcn():
    torch.manual_seed(0)
    return nofc.convert(LeNet5().eval(), SIZE).to(F64)


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster:
        yield cluster


def _model_plugins(cluster) -> list[str]:
    return [n for n in cluster.scheduler.worker_plugins if n.startswith("nofc-model")]


# --------------------------------------------------------------------------- no tracing


def test_loading_a_model_never_traces(fcn, monkeypatch):
    data = _fx.dumps(torch.nn.Sequential(fcn))  # nested GraphModules too

    def no_tracing(*args, **kwargs):
        raise AssertionError("traced while loading")

    monkeypatch.setattr(fx.Tracer, "trace", no_tracing)
    with pytest.raises(AssertionError, match="traced while loading"):
        pickle.loads(pickle.dumps(fcn))  # torch's own way: the check bites
    got = _fx.loads(data)[0]
    x = torch.rand(1, 1, 70, 90, dtype=F64)
    torch.testing.assert_close(got(x), fcn(x), rtol=0, atol=0)
    assert got.code == fcn.code and type(got).__name__ == type(fcn).__name__
    assert list(got.state_dict()) == list(fcn.state_dict())


def test_a_model_runs_while_another_loads(fcn):
    """The standalone reproduction: one thread computes while another loads the model
    (9,976 NameErrors in 8 s with torch's pickle)."""
    data, errors, runs, stop = _fx.dumps(fcn), [], [0], threading.Event()
    x = torch.rand(1, 1, 64, 64, dtype=F64)

    def compute():
        while not stop.is_set():
            try:
                fcn(x)
                runs[0] += 1
            except Exception as exc:  # noqa: BLE001 - counted
                errors.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=compute)
    thread.start()
    loads, end = 0, time.time() + 2
    try:
        while time.time() < end:
            _fx.loads(data)
            loads += 1
    finally:
        stop.set()
        thread.join()
    assert errors == [] and runs[0] > 10 and loads > 10


# --------------------------------------------------------------------------- three runs


_CLIENT = textwrap.dedent("""
    import pathlib, sys, time, numpy as np, torch, nofc
    torch.manual_seed(0)
    deep = torch.nn.Sequential(*[torch.nn.Conv2d(1, 1, 1) for _ in range(60)],
                               nofc.zoo.LeNet5())
    fcn = nofc.convert(deep.eval(), (1, 32, 32)).to(torch.float64)
    img = np.random.default_rng(0).random((1024, 1024))
    go = pathlib.Path(sys.argv[3])
    while not go.exists():
        time.sleep(0.01)
    time.sleep(float(sys.argv[4]))
    nofc.tiled_predict(fcn, img, (1, 32, 32), tile=128, out=sys.argv[2], progress=False,
                       dtype=torch.float64, backend=nofc.Dask(scheduler=sys.argv[1]))
""")


def test_three_runs_on_one_cluster_each_get_the_undisturbed_map(cluster, tmp_path):
    """Before: 2 of 6 runs died with ``NameError: module is not installed as a
    submodule`` (the deep model makes the tracer's window, and the module calls that fall
    into it, wide enough to be seen in a few runs)."""
    torch.manual_seed(0)
    deep = torch.nn.Sequential(*[torch.nn.Conv2d(1, 1, 1) for _ in range(60)], LeNet5())
    fcn = nofc.convert(deep.eval(), SIZE).to(F64)
    img = np.random.default_rng(0).random((1024, 1024))  # 8 x 8 = 64 blocks each
    ref = nofc.tiled_predict(fcn, img, SIZE, tile=128, progress=False, dtype=F64)
    script, go = tmp_path / "client.py", tmp_path / "go"
    script.write_text(_CLIENT)
    stores = [tmp_path / f"map{i}.zarr" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, str(script), cluster.scheduler_address,
                               str(store), str(go), str(0.3 * i)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, store in enumerate(stores)]
    time.sleep(1)
    go.touch()  # all three are imported and converted: they start 0.3 s apart
    outputs = [p.communicate(timeout=150)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    for store in stores:
        np.testing.assert_allclose(zarr.open_array(str(store), mode="r")[:], ref, rtol=0,
                                   atol=1e-10)
    assert _model_plugins(cluster) == []  # each run removed its own plugin


# --------------------------------------------------------------------------- unloadable


_UNSEEN = textwrap.dedent("""
    import torch, torch.fx
    from nofc.zoo import LeNet5

    def leaky(x):
        return torch.where(x > 0, x, 0.5 * x)

    torch.fx.wrap("leaky")  # a node of the converted graph: its pickle names this module

    class Unseen(LeNet5):
        def forward(self, x):
            return super().forward(leaky(x))
""")


def test_a_model_the_workers_cannot_import_is_one_line_and_leaves_no_plugin(
        cluster, tmp_path, monkeypatch):
    (tmp_path / "unseen_models.py").write_text(_UNSEEN)
    monkeypatch.syspath_prepend(str(tmp_path))
    from unseen_models import Unseen  # importable here only: the file goes below

    (tmp_path / "unseen_models.py").unlink()
    model = nofc.convert(Unseen().eval(), SIZE)
    address = cluster.scheduler_address
    img = np.random.default_rng(1).random((96, 96))
    with pytest.raises(NofcError) as err:
        nofc.tiled_predict(model, img, SIZE, tile=32, progress=False,
                           backend=nofc.Dask(scheduler=address))
    assert "\n" not in str(err.value)
    assert "cannot load the model (ModuleNotFoundError: No module named 'unseen_models'" \
        in str(err.value) and "import the modules that define Unseen" in str(err.value)
    assert _model_plugins(cluster) == []
    # such a plugin, left behind (by a killed client: this one is still connected, so no
    # run drops it), stops no worker that starts later
    with distributed.Client(cluster) as client:
        name = f"nofc-model|{client.id}|0"
        client.register_plugin(tiling._ModelPlugin(
            tiling._TileRunner(model, SIZE, None, nofc.Normalize(), torch.float32,
                               torch.device("cpu"))), name=name)
        try:
            cluster.scale(3)
            client.wait_for_workers(3, timeout=120)
            got = nofc.tiled_predict(LeNet5().eval(), img, SIZE, tile=32, progress=False,
                                     backend=nofc.Dask(scheduler=address))
            assert got.shape[1:] == (17, 17)
        finally:
            client.unregister_worker_plugin(name)
            cluster.scale(2)
