"""notebooks/kaggle.ipynb runs headless, top to bottom, on the demo, so it cannot rot.

It runs in a copy of the suite's reproduced repo with one plots param changed, so its `dvc repro`
reruns plots and report under the notebook's hardlink cache (test_pipeline_e2e runs the whole DAG)."""

import pytest
import yaml

from tests.conftest import REPO, copy_reproduced, stage_env

pytestmark = pytest.mark.slow


def test_the_kaggle_notebook_runs_on_the_demo(reproduced, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    copy_reproduced(reproduced, tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["plots"]["seed"] += 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for name in ("PATH", "OMP_NUM_THREADS"):
        monkeypatch.setenv(name, stage_env()[name])

    notebook = nbformat.read(REPO / "notebooks" / "kaggle.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "$ dvc config --local cache.type hardlink,symlink" in outputs and "$ dvc repro" in outputs
    assert "Running stage 'plots'" in outputs and "Running stage 'report'" in outputs, "the repro ran"
    assert "lora" in outputs and "fid" in outputs, "dvc metrics show printed the results"
    assert any(o.get("data", {}).get("image/png") for cell in notebook.cells for o in cell.get("outputs", [])), \
        "the sample grid is shown"
    assert "hardlink,symlink" in (tmp_path / ".dvc" / "config.local").read_text()
    assert (tmp_path / "models" / "lora" / "pytorch_lora_weights.safetensors").is_file()
