"""Sweeps: a grid of (model × quantization × evaluation) cells from a config file, each stored in the
results store the moment it finishes; reruns skip finished cells, killed runs resume.

``grid`` parses configs and makes cells and their keys; ``validate`` checks names before any work;
``runner`` is the loop; ``backend`` does the model work through ``qwenquant.api`` and ``qwenquant.eval``.
"""

from qwenquant.sweep.grid import Cell, SweepConfig, load_config, parse_config
from qwenquant.sweep.runner import Backend, SweepSummary, run_sweep
from qwenquant.sweep.validate import validate

__all__ = ["Backend", "Cell", "SweepConfig", "SweepSummary", "load_config", "parse_config", "run_sweep", "validate"]
