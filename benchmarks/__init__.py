"""kvmlib's benchmarks: every case measured for kvmlib and for a C program on raw ioctls, side by side.

Run them from the repository root with ``python -m benchmarks`` (``--help`` for the options).
"""
