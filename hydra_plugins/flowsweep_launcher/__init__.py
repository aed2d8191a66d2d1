"""flowsweep's Hydra plugins (Hydra only loads launchers and sweepers from the `hydra_plugins` namespace package).

The logic lives in src/launch/submitit.py and src/launch/sweeper.py; conf/hydra/launcher/slurm.yaml and
conf/hydra/sweeper/tagging.yaml select the classes below.
"""

from src.launch.submitit import CollectingSubmititLauncher
from src.launch.sweeper import TaggingSweeper as _TaggingSweeper


class SlurmLauncher(CollectingSubmititLauncher):
    """hydra-submitit-launcher's SLURM launcher that waits for every job and records failures for the summary."""

    _EXECUTOR = "slurm"


class TaggingSweeper(_TaggingSweeper):
    """Hydra's basic sweeper whose jobs carry their swept values in `run_tag` (src/launch/sweeper.py)."""
