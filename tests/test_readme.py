"""The Python examples of README.md and of every docs/*.md page run, and what they say they
print or return is what they do.

Each page is a test of its own. Its ```python blocks run, in order, in one namespace of the
page's own (later blocks use earlier names; a page never uses another page's names),
inside a temporary folder holding the small files the examples name (``slide.tif``).
A block preceded by ``<!-- readme-test: skip (why) -->`` is not run; the reason is part
of the page, and the skipped blocks are listed in ``SKIPPED``. Checked claims:

* a block followed directly by a plain ``` block: that block is its printed output (the
  measured errors, which depend on the random weights, only have to be numbers);
* a line ``expression  # value`` or ``name = expression  # value``: the value (or the
  shape of an array or tensor) equals the comment, when the comment (up to a ``:``) is
  a Python expression.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md")))]
# The blocks a page does not run, by the reason it gives: no block goes unrun unnoticed.
SKIPPED = {"docs/tiling.md": ["needs dask-jobqueue and a SLURM cluster"]}
# The fewest claims (printed outputs, commented values) a page's blocks are checked
# against: a parser that stopped seeing them would otherwise pass by checking nothing.
CLAIMS = {"README.md": (1, 1), "docs/concepts.md": (0, 3), "docs/dense.md": (0, 2)}
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
_SKIP = re.compile(r"<!-- readme-test: skip \((.+?)\) -->\s*$")


def _blocks(text: str):
    """(python source, expected output or None, skip reason or None) for each python block."""
    fences = list(_FENCE.finditer(text))
    out = []
    for i, m in enumerate(fences):
        if m.group(1) != "python":
            continue
        nxt = fences[i + 1] if i + 1 < len(fences) else None
        expected = None
        if nxt is not None and nxt.group(1) == "" and not text[m.end():nxt.start()].strip():
            expected = nxt.group(2)
        skip = _SKIP.search(text[:m.start()].rstrip() + "\n")
        out.append((m.group(2), expected, skip.group(1) if skip else None))
    return out


def _masked(text: str) -> str:
    """Output with measured errors masked: random weights change their last digits."""
    return re.sub(r"error \d[\d.e+-]*", "error <measured>", text)


def _as_comparable(value):
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim > 1:
        return tuple(value.shape)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    return value


def _claimed(comment: str, ns: dict):
    """The value a ``# comment`` claims, or None when it is prose."""
    text = comment.split(":")[0] if not comment.startswith("torch.Size") else comment
    try:
        return eval(compile(text, "<readme comment>", "eval"), dict(ns))  # noqa: S307
    except Exception:  # noqa: BLE001 - prose, not a value
        return None


def _run_block(source: str, ns: dict, page: str = "README.md") -> int:
    """Run ``source`` statement by statement; check commented values; count the checks."""
    checks = 0
    tree = ast.parse(source)
    lines = source.splitlines()
    where = f"<{page}>"
    for stmt in tree.body:
        code = compile(ast.Module([stmt], []), where, "exec")
        value = None
        if isinstance(stmt, ast.Expr):
            value = eval(compile(ast.Expression(stmt.value), where, "eval"), ns)  # noqa: S307
        else:
            exec(code, ns)  # noqa: S102
            if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
                value = ns[stmt.targets[0].id]
        last = lines[stmt.end_lineno - 1]
        if "#" not in last or value is None:
            continue
        claim = _claimed(last.split("#", 1)[1].strip(), ns)
        if claim is None:
            continue
        got = _as_comparable(value)
        want = _as_comparable(claim)
        assert got == want, f"{page} line {last.strip()!r}: got {got!r}"
        checks += 1
    return checks


def _slide(path: Path) -> None:
    """A small RGB TIFF standing in for the pages' slide."""
    import tifffile

    rng = np.random.default_rng(0)
    tifffile.imwrite(path, rng.integers(0, 256, (300, 260, 3), dtype=np.uint8), tile=(128, 128))


@pytest.mark.parametrize("page", PAGES)
def test_python_examples_run_and_say_what_they_do(page, tmp_path, monkeypatch):
    blocks = _blocks((ROOT / page).read_text())
    monkeypatch.chdir(tmp_path)
    _slide(tmp_path / "slide.tif")
    ns: dict = {"__name__": "__readme__"}
    checks = outputs = 0
    skipped = []
    for source, expected, skip in blocks:
        if skip:
            skipped.append(skip)
            continue
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            checks += _run_block(source, ns, page)
        if expected is not None:
            assert _masked(buf.getvalue()) == _masked(expected), page
            outputs += 1
    least_outputs, least_checks = CLAIMS.get(page, (0, 0))
    assert outputs >= least_outputs and checks >= least_checks, (page, outputs, checks)
    assert skipped == SKIPPED.get(page, []), (page, skipped)


def test_every_page_is_listed_in_the_readme():
    """The README is the front page: each docs page is one link away from it."""
    readme = (ROOT / "README.md").read_text()
    missing = [p for p in PAGES[1:] if f"]({p})" not in readme]
    assert not missing, missing


def _anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a markdown page."""
    headings = re.findall(r"^#+ (.+)$", _FENCE.sub("", text), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_between_pages_resolve():
    """A relative link (``dense.md#measured-speed``) names a file and a heading that exist."""
    bad = []
    for page in PAGES:
        for path, anchor in re.findall(r"\]\(([^)#\s]*)(#[^)\s]*)?\)", (ROOT / page).read_text()):
            if re.match(r"\w+:", path):
                continue  # a URL
            dest = (ROOT / page).parent / path if path else ROOT / page
            if not dest.exists():
                bad.append((page, path))
            elif anchor and dest.suffix == ".md" and anchor[1:] not in _anchors(dest.read_text()):
                bad.append((page, path + anchor))
    assert not bad, bad


@pytest.mark.parametrize("line, ok", [("x = 1 + 1  # 2", True), ("x = 3  # 2", False)])
def test_commented_values_are_checked(line, ok):
    if ok:
        assert _run_block(line, {}) == 1
    else:
        with pytest.raises(AssertionError, match="got 3"):
            _run_block(line, {})
