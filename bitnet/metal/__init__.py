"""Metal backend: bitnet's MSL shaders dispatched through metalcompute on Apple GPUs.

Modules
-------
``quantize.metal``, ``ternary_matmul.metal``
    The shaders (plain MSL, shipped as package data).
``shaders``
    Reads them, and the dispatch geometry they declare.
``bridge``
    The backend behind ``bn.matmul(..., device="metal")``: availability, compiled kernels,
    weight uploads, dispatch (imports metalcompute only when Metal actually runs).
``blocks``
    ``MetalBlocks``, the arena backend whose blocks are whole metalcompute buffers.
``emulation``
    A CPU emulation of MSL (g++ and fibers) that runs the same shaders where there is no Mac.
"""
