"""MONAI Deploy operators: thin adapters, one step each, around the algorithms in ``core``."""
