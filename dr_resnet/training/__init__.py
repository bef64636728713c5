"""The one training path: components, the loops, runtime, distributed, checkpoints, tracking, evaluation."""
