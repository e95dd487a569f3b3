"""Curation: the Ray pipeline that turns a dataset (read through perceptio.sources) into shards."""
