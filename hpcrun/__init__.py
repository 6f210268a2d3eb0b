"""hpcrun: a rootless container runner for HPC clusters."""

__version__ = "0.1.0"
