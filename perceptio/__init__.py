"""perceptio: perception-token training data and training for vision-language models.

After "Perceptio: Perception Enhanced Vision Language Models via Spatial Token Generation"
(arXiv 2603.18795). Subpackages: ``curate`` (datasets -> shards), ``tokenize`` (depth teacher and
depth VQ-VAE), ``train`` (joint text + segmentation + depth objective), ``evaluate`` (benchmarks)
and ``inspect`` (look into shards).
"""

__version__ = "0.1.0"
