"""notebooks/rank_report.ipynb runs top to bottom on a synthetic sweep (path given through RANK_REPORT_SWEEP)."""
from pathlib import Path

import pytest

from src.ranking.synthetic import write_synthetic_sweep

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "rank_report.ipynb"


@pytest.mark.slow
def test_notebook_executes_on_a_synthetic_sweep(tmp_path, monkeypatch):
    import nbclient
    import nbformat

    sweep = write_synthetic_sweep(tmp_path / "multirun" / "nb", recipes=("rf/cosmap", "eps/linear", "v/cos"),
                                  datasets=("digits",), n_samples=16, n_reference=16, dim=3, failed=("v/cos",))
    monkeypatch.setenv("RANK_REPORT_SWEEP", str(sweep))
    monkeypatch.setenv("RANK_REPORT_BOOTSTRAP", "20")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # fronts (all, one dataset), average ranks, separability matrix, metrics vs steps
    text = "".join(str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    assert "PARTIAL SWEEP" in text and "| recipe | all (n=12)" in text
