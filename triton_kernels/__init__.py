"""Triton kernels of choreo: ``segment_attention`` (fused segment-table attention, forward and backward) and its
reference.

``from triton_kernels import segment_attention`` gives the function; the kernel module itself is
``sys.modules["triton_kernels.segment_attention"]``. Set ``TRITON_INTERPRET=1`` before the first import to run
the kernel on CPU tensors (tests only).
"""

from .segment_attention import (Launch, LaunchConfig, TileTable, default_splits, interpreter_active, is_available,
                                launch_config, prepare_launch, run_launch, segment_attention, tile_table,
                                unsupported)

__all__ = ["segment_attention", "prepare_launch", "run_launch", "Launch", "is_available", "interpreter_active",
           "LaunchConfig", "launch_config", "TileTable", "tile_table", "default_splits", "unsupported"]
