"""Flax NNX model definitions."""
