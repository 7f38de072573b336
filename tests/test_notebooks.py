"""Every notebook in notebooks/ runs top to bottom (nbclient) in a kernel of this Python.

The notebooks are committed without outputs; the test checks that too. They load the real
default model from the local cache (MECHCOPY_CACHE), never the network. Set
MECHCOPY_NOTEBOOK_OUT=DIR to keep the executed notebooks.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
KERNEL = "mechcopy-test-python"


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    """A kernelspec for *this* interpreter (the venv's), found through JUPYTER_PATH.

    Registering in a temporary folder keeps the user's Jupyter setup untouched and makes sure a
    system-wide `python3` kernel without mechcopy is never picked.
    """
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mechcopy (test)", "language": "python",
        "env": {"MPLBACKEND": "module://matplotlib_inline.backend_inline"},
    }))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(root)] + ([old] if old else []))
    yield KERNEL
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


def test_there_are_notebooks():
    names = [p.name for p in NOTEBOOKS]
    assert "01_quickstart.ipynb" in names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_name):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=kernel_name, timeout=600, allow_errors=False,
                            resources={"metadata": {"path": str(path.parent)}})
    t0 = time.time()
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    html = [o["data"]["text/html"] for o in outputs if o.get("output_type") in ("display_data", "execute_result")
            and "text/html" in o.get("data", {})]
    # circuitsvis views, where a notebook shows any, are the offline kind (no CDN import), and the page
    # holds circuitsvis' script once: the first view defines it, the others only render.
    views = [snippet for snippet in html if "CircuitsVis" in snippet]
    assert all("unpkg.com" not in v for v in views)
    assert [v.count("var CircuitsVis=") for v in views] == [1] * bool(views) + [0] * (len(views) - 1)
    size = len(nbformat.writes(nb).encode())
    if views:
        from mechcopy.viz import circuitsvis_library

        assert size < len(circuitsvis_library()) + 1e6, f"{path.name}: executed, {size / 1e6:.1f} MB"
    print(f"{path.name}: {time.time() - t0:.1f} s, {len(views)} views, {size / 1e6:.2f} MB executed")
    out = os.environ.get("MECHCOPY_NOTEBOOK_OUT")  # keep the executed copies to look at
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, Path(out) / path.name)
