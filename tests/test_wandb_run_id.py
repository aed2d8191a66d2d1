"""The W&B run id of a run directory: kept across its attempts, new for a directory recreated at the same path."""
import shutil

from src.training.job import _wandb_id


def test_a_resume_keeps_the_id_and_a_recreated_directory_gets_a_new_one(tmp_path):
    run_dir = tmp_path / "digits" / "rf"
    run_dir.mkdir(parents=True)
    first = _wandb_id(run_dir)
    (run_dir / "wandb" / f"offline-run-20260101_000000-{first}").mkdir(parents=True)  # what W&B left
    (run_dir / "wandb" / "latest-run").mkdir()
    assert _wandb_id(run_dir) == first  # a resume continues the W&B run
    shutil.rmtree(run_dir)  # make clean, or a failed run removed by hand, then the same command again
    run_dir.mkdir(parents=True)
    assert _wandb_id(run_dir) != first  # a new training: not appended to the deleted directory's W&B run
