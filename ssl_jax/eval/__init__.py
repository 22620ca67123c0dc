"""Evaluation of learned representations: kNN, linear probe, pictures."""
