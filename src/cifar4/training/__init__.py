"""Training and evaluation: the fit loop and its callbacks (train.py, callbacks.py), evaluation
and test-time augmentation (evaluate.py), frozen-backbone features (features.py), one
experiment end to end (pipeline.py) and re-evaluating a finished run (evaluate_run.py)."""
