"""Numba kernels only: plain arrays in, plain arrays out, inputs already validated.

Kernels compile lazily for the argument types they meet (read-only, memory-mapped arrays
included) and cache the machine code on disk (``cache=True``), so only the first call in a
fresh environment pays for compilation.
"""

import numba

# Start Numba's thread pool now (~5 ms), before any kernel runs. A serial kernel that calls a
# threaded one links its code; compiled while that callee came from the on-disk cache, Numba does
# not record that it needs the pool, and loaded from the cache in turn it called into a pool
# nobody had started: a segfault (numba#8578; tests/test_model_decode.py reproduces it).
numba.get_num_threads()
