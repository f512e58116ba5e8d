"""Pallas kernels behind `quantjax.ops.qdot` (see `dispatch.py`)."""
