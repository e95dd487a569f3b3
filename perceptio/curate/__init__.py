"""Curation: dataset readers, the synthetic world, and the Ray pipeline that writes shards."""
