"""flowsweep's Hydra launcher plugin (Hydra only loads launchers from the `hydra_plugins` namespace package).

The logic lives in src/launch/submitit.py; conf/hydra/launcher/slurm.yaml selects the class below.
"""

from src.launch.submitit import CollectingSubmititLauncher


class SlurmLauncher(CollectingSubmititLauncher):
    """hydra-submitit-launcher's SLURM launcher that waits for every job and records failures for the summary."""

    _EXECUTOR = "slurm"
