"""Algorithms and data types shared by the app, training, benchmarks and the node.

Nothing in ``core`` knows about MONAI Deploy or Holoscan: operators in ``operators/`` are thin
adapters around these functions, so everything here is testable with plain numpy arrays.
"""
