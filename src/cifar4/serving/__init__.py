"""Putting a trained run to work: reading images safely and predicting (predict.py)."""
