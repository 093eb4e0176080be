"""Sparse training methods (MST), installed on a built model through `training.hooks`."""
