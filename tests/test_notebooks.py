"""The notebooks in notebooks/ run from top to bottom without an error, and are stored without
outputs, so that the repository never holds generated output.

Each notebook runs in a fresh ``python3`` kernel of the interpreter running the tests, with the
working directory set to notebooks/ so that the helper module ``explore_history`` imports (it
makes ``tests.support`` importable itself). Clear outputs before committing, e.g. with
``jupyter nbconvert --clear-output --inplace notebooks/*.ipynb`` or your editor's "clear all".
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
IDS = [path.name for path in NOTEBOOKS]

CELL_TIMEOUT_S = 60
"""Per cell; each notebook as a whole runs in a few seconds."""


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOKS_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    nbformat.validate(notebook)
    dirty = [
        number
        for number, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]
    assert not dirty, (
        f"{path.name}: code cells {dirty} hold outputs or execution counts; clear them before "
        "committing (jupyter nbconvert --clear-output --inplace)"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on the first failing cell
