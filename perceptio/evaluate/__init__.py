"""Evaluation: referring segmentation, HardBLINK relative depth, depth-token reconstruction."""
