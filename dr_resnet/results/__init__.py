"""Torch-free results: run folders, metrics, statistics, predictions, arms and the report."""
