"""The example notebooks in ``examples/`` run top to bottom, and are committed without outputs.

Each notebook is executed in a fresh ``python3`` kernel of this interpreter with
``BITNET_EXAMPLES_QUICK=1`` (the notebooks shrink their sizes) and ``MPLBACKEND=Agg`` (no
windows); a cell that raises fails its test, naming the cell. Needs the ``test`` extra's
``nbclient``, ``nbformat``, ``ipykernel`` and ``matplotlib``.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
CELL_TIMEOUT_S = 240  # a cell of a quick run takes seconds; the training cell about half a minute
QUICK_ENV = {"BITNET_EXAMPLES_QUICK": "1", "MPLBACKEND": "Agg", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}

# what each notebook imports beyond numpy and bitnet (the hf, gguf and train extras; all in the test extra)
REQUIRES = {
    "01_quantization_and_formats": ["safetensors", "tokenizers"],
    "02_speed": [],
    "03_running_a_model": ["safetensors", "tokenizers", "ml_dtypes"],
    "04_training": ["torch", "transformers", "tokenizers", "safetensors", "gguf"],
    "05_interop": ["safetensors", "tokenizers", "gguf"],
}

nbformat = pytest.importorskip("nbformat")


def test_there_are_notebooks():
    assert [p.stem for p in NOTEBOOKS] == sorted(REQUIRES), NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_without_outputs(path):
    """Outputs are made by running, not committed: no outputs, no execution counts, no timing metadata."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [], (
            f"{path.name} cell {index} holds outputs: clear them (jupyter nbconvert --clear-output --inplace)"
        )
        assert cell.execution_count is None, f"{path.name} cell {index} has an execution count: clear outputs"
        assert "execution" not in cell.metadata, f"{path.name} cell {index} holds execution timing metadata"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_reads_quick_switch(path):
    """The first code cell defines QUICK from BITNET_EXAMPLES_QUICK, which CI relies on to keep runs short."""
    notebook = nbformat.read(path, as_version=4)
    first = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert 'QUICK = os.environ.get("BITNET_EXAMPLES_QUICK") == "1"' in first.source, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_runs_top_to_bottom(path, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    missing = [m for m in REQUIRES.get(path.stem, []) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{path.name} needs {', '.join(missing)} (pip install -e \".[test]\")")
    for name, value in QUICK_ENV.items():
        monkeypatch.setenv(name, value)  # the kernel process inherits the environment
    notebook = nbformat.read(path, as_version=4)
    # "python3": jupyter_client runs a python kernel with sys.executable, so the kernel is this venv's python
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, startup_timeout=120, kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the working directory: stray files land there
    )
    began = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{path.name}: a cell raised\n{error}", pytrace=False)
    except nbclient.exceptions.CellTimeoutError as error:
        pytest.fail(f"{path.name}: a cell ran past {CELL_TIMEOUT_S} s\n{error}", pytrace=False)
    errors = [out for cell in notebook.cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, errors
    print(f"{path.name}: {time.perf_counter() - began:.1f} s")
