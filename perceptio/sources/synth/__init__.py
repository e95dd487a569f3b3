"""The synthetic world: procedural 3-D scenes written in the official RefCOCO/+/g, COCO and ADE20k
formats, with exact depth and instance ground truth that no public dataset has.

Modules: ``scene`` (sampling), ``render`` (numpy ray caster), ``polygons`` (masks to COCO
polygons), ``expressions`` (referring expressions that pick out one object), ``layout`` (paths,
ids and splits), ``writers`` (file formats) and ``world`` (:func:`generate_world`).
"""

from perceptio.sources.synth.world import WorldSummary, generate_world

__all__ = ["WorldSummary", "generate_world"]
