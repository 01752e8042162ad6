"""Memory layout: the input of a large pass channels-last only where that measures faster.

Where it sits in the flow: ``dense_predict`` -> ``nofc.streaming.streamed`` (the one-image
pass) asks :func:`memory_format_for` which layout to hand the network its input in: the
chunks of a streamed pass, or the whole image of a large pass that is not streamed.
``nofc.precision`` asks :func:`known_format` for the layout of its bfloat16 copy. Nothing
here changes a value: a convolution gives the same numbers in either layout (float32
rounding apart), only its speed differs.

The rule, on a CPU:

* **float32**: oneDNN's convolutions run channels-last 1.1x to 1.7x faster for most
  networks (resnet50, densenet121, mobilenet, vgg16) and slower for some (convnext_tiny,
  whose blocks permute to channels-last themselves). So the network is measured, once, on a
  sample of the size its chunks run at (a crop of the image the caller bounds:
  ``nofc.streaming.CHUNK`` pixels a side): both layouts, interleaved, ``ROUNDS`` runs
  each, the fastest of each; channels-last is taken only when it is faster by more than
  ``MARGIN`` (noise), never where it is slower. Only a large pass measures (the caller
  decides: ``nofc.streaming`` from ``MEASURE_PIXELS``, an image of 640x640); a small one
  keeps the input's layout, as the measurement would cost more than it could save.
* **bfloat16** (and float16): channels-last, without measuring: the layout oneDNN's
  low-precision kernels take; bfloat16 measured never slower (docs/benchmarks.md, the
  hardware table: 1.0x to 2.1x faster); float16 as bfloat16 (the same kernels on a CPU
  with float16 matrix units; not measured here).
* other dtypes, and every other device: contiguous (a GPU keeps today's layout).

The choice is remembered on the network for its device and dtype until its parameters
change, and for the process by the network's architecture (module types, parameter
shapes and layouts, its graph's code), so the same architecture converted again is not
measured again.

``NOFC_LAYOUT=channels_last`` or ``NOFC_LAYOUT=contiguous`` in the environment forces a
layout on every CPU pass, small ones included, without measuring (benchmarks, tests);
unset or ``measure`` is the rule above.

>>> import torch, torch.nn as nn
>>> net = nn.Conv2d(3, 8, 3)
>>> memory_format_for(net, torch.randn(1, 3, 32, 32, dtype=torch.float64))
torch.contiguous_format
>>> memory_format_for(net, torch.randn(1, 3, 32, 32)) in (torch.contiguous_format,
...                                                       torch.channels_last)
True
"""

from __future__ import annotations

import hashlib
import os
import time

import torch
import torch.fx as fx
import torch.nn as nn

from ._fx import param_stamp
from .errors import NofcError

__all__ = ["memory_format_for", "known_format", "fingerprint", "LAYOUT_ENV", "MARGIN",
           "ROUNDS"]

LAYOUT_ENV = "NOFC_LAYOUT"  # "channels_last" / "contiguous" force a layout; "measure"
MARGIN = 1.03  # channels-last must be this much faster: below, noise
ROUNDS = 3  # runs per layout, interleaved; the fastest counts (the first is a warm-up)

_FORCED = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format,
           "measure": None, "": None}
_CHOSEN: dict = {}  # (fingerprint, device, dtype) -> format, for the process


def _forced() -> torch.memory_format | None:
    value = os.environ.get(LAYOUT_ENV, "").strip().lower()
    if value not in _FORCED:
        raise NofcError(f"{LAYOUT_ENV}={os.environ[LAYOUT_ENV]!r}: give 'channels_last', "
                        "'contiguous' or 'measure' (or leave it unset)")
    return _FORCED[value]


def known_format(device: torch.device, dtype: torch.dtype) -> torch.memory_format | None:
    """The layout for a pass in ``dtype`` on ``device`` where it is known without
    measuring (forced by ``NOFC_LAYOUT``, bfloat16 or float16 on a CPU, anything off a CPU
    or in another dtype); None for float32 on a CPU, which is measured.

    >>> known_format(torch.device("cpu"), torch.bfloat16)
    torch.channels_last
    >>> known_format(torch.device("cpu"), torch.float32) is None
    True
    """
    if torch.device(device).type != "cpu":
        return torch.contiguous_format
    forced = _forced()
    if forced is not None:
        return forced
    if dtype in (torch.bfloat16, torch.float16):
        return torch.channels_last
    return None if dtype == torch.float32 else torch.contiguous_format


def memory_format_for(net: nn.Module, sample: torch.Tensor) -> torch.memory_format:
    """The layout to hand ``net`` an input like ``sample`` in: known (:func:`known_format`)
    or measured once on ``sample`` (bounded by the caller: it runs ``2 * ROUNDS`` times),
    then remembered on ``net`` and for its architecture.

    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    >>> fmt = memory_format_for(net, torch.randn(1, 3, 64, 64))
    >>> memory_format_for(net, torch.randn(1, 3, 64, 64)) is fmt  # remembered
    True
    """
    if sample.dim() != 4:
        return torch.contiguous_format
    known = known_format(sample.device, sample.dtype)
    if known is not None:
        return known
    key = (sample.device, sample.dtype)
    cache = net.__dict__.setdefault("_nofc_layout_cache", {})
    stamp = param_stamp(net)
    if key in cache and cache[key][0] == stamp:
        return cache[key][1]
    arch = (fingerprint(net), *key)
    if arch not in _CHOSEN:
        _CHOSEN[arch] = _measure(net, sample)
    cache[key] = (stamp, _CHOSEN[arch])
    return _CHOSEN[arch]


def fingerprint(net: nn.Module) -> str:
    """The network's architecture as a short digest: its modules' types, its parameters'
    and buffers' shapes, dtypes and layouts, and for a graph module its code; two
    conversions of the same classifier have the same one, whatever their weights.

    >>> import torch.nn as nn
    >>> fingerprint(nn.Conv2d(3, 8, 3)) == fingerprint(nn.Conv2d(3, 8, 3))
    True
    >>> fingerprint(nn.Conv2d(3, 8, 3)) == fingerprint(nn.Conv2d(3, 8, 5))
    False
    """
    h = hashlib.sha1()
    for m in net.modules():
        h.update(f"{type(m).__module__}.{type(m).__qualname__};".encode())
    for t in (*net.parameters(), *net.buffers()):
        h.update(f"{tuple(t.shape)}{t.dtype}{t.stride()};".encode())
    if isinstance(net, fx.GraphModule):
        h.update(net.code.encode())
    return h.hexdigest()


def _measure(net: nn.Module, sample: torch.Tensor) -> torch.memory_format:
    """Both layouts on ``sample``, interleaved, the fastest run of each: channels-last
    where it is faster by more than ``MARGIN``. A network that fails channels-last (a
    ``view`` of its map) or at all on the sample stays contiguous."""
    formats = (torch.contiguous_format, torch.channels_last)
    best = dict.fromkeys(formats, float("inf"))
    with torch.no_grad():
        try:
            for _ in range(ROUNDS):
                for fmt in formats:
                    x = sample.clone(memory_format=fmt)  # a copy: a layer may work in place
                    t0 = time.perf_counter()
                    net(x)
                    best[fmt] = min(best[fmt], time.perf_counter() - t0)
        except RuntimeError:
            return torch.contiguous_format
    if best[torch.contiguous_format] > MARGIN * best[torch.channels_last]:
        return torch.channels_last
    return torch.contiguous_format
