"""notebooks/kaggle.ipynb runs headless, top to bottom, on the demo, so it cannot rot."""

import pytest

from tests.conftest import REPO
from tests.test_pipeline_e2e import copy_small_repo, stage_env

pytestmark = pytest.mark.slow


def test_the_kaggle_notebook_runs_on_the_demo(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    copy_small_repo(tmp_path)
    for name in ("PATH", "OMP_NUM_THREADS"):
        monkeypatch.setenv(name, stage_env()[name])

    notebook = nbformat.read(REPO / "notebooks" / "kaggle.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "$ dvc config --local cache.type hardlink,symlink" in outputs and "$ dvc repro" in outputs
    assert "lora" in outputs and "fid" in outputs, "dvc metrics show printed the results"
    assert any(o.get("data", {}).get("image/png") for cell in notebook.cells for o in cell.get("outputs", [])), \
        "the sample grid is shown"
    assert "hardlink,symlink" in (tmp_path / ".dvc" / "config.local").read_text()
    assert (tmp_path / "models" / "lora" / "pytorch_lora_weights.safetensors").is_file()
