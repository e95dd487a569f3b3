"""Dataset readers as the datasets are distributed, below every stage.

``refer`` (RefCOCO/+/g), ``ade20k`` (ADEChallengeData2016), ``masks`` (COCO polygons and RLE),
``safe_pickle`` (the REFER Python 2 pickles), ``problems`` (what a reader reports about bad input),
and ``synth/`` (the synthetic world, written in those same layouts). The tokenizer stage and curation
both read data through these modules; nothing here imports a stage.
"""
