"""Numba kernels only: plain arrays in, plain arrays out, inputs already validated.

Kernels compile lazily for the argument types they meet (read-only, memory-mapped arrays
included) and cache the machine code on disk (``cache=True``), so only the first call in a
fresh environment pays for compilation.
"""
