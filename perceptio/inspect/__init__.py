"""Inspection of shards: summaries, validation and pictures of samples."""
