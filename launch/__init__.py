"""Cluster launchers: submitit sweeps of the four runs (``python -m launch.sweep``)."""
