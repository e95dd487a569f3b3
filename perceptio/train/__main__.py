"""``python -m perceptio.train`` (and ``torchrun -m perceptio.train``): the ``perceptio-train`` command."""

from perceptio.train.cli import main

main()
