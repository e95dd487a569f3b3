"""Depth teacher (Depth Anything V2 or ground truth), depth cache, and the depth VQ-VAE tokenizer."""
