"""A decode step's kernel launches captured once into a CUDA graph, replayed with one host call.

A numba kernel launch costs tens of microseconds of Python, several times the GPU time of
a decode GEMV, and a model's decode step makes dozens of them: launched one by one, the
host is the critical path. ``StepGraph(step)`` runs ``step(stream)`` once to warm up
(compiling kernels, allocating workspaces), captures a second run into a CUDA graph, and
``replay()`` then launches the whole step with one driver call.

``step`` must launch only on the stream it is given (``bn.cuda.linear(..., stream=stream)``),
allocate nothing on the GPU (pass ``out=`` buffers) and read its inputs from fixed device
buffers: write each new token's activations into them before ``replay()``. The simulator
has no graphs; there ``replay`` runs ``step`` again, which computes the same thing.
"""

from __future__ import annotations

import weakref


class StepGraph:
    """``step(stream)`` captured into a CUDA graph.

    Parameters
    ----------
    step : callable taking a numba CUDA stream; see the module docstring for its rules.

    Attributes
    ----------
    stream : the numba stream the graph is replayed on; ``stream.synchronize()`` waits
        for the last replay.
    """

    def __init__(self, step):
        from numba import config, cuda

        self._step = step
        self.stream = cuda.stream()
        step(self.stream)
        self.stream.synchronize()
        self._exec = None
        if config.ENABLE_CUDASIM:
            return
        from numba.cuda.cudadrv.driver import binding, driver

        handle = self.stream.handle
        driver.cuStreamBeginCapture(handle, binding.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        try:
            step(self.stream)
        finally:
            graph = driver.cuStreamEndCapture(handle)
        self._exec = driver.cuGraphInstantiate(graph, 0)
        driver.cuGraphDestroy(graph)  # the executable graph keeps what it needs
        weakref.finalize(self, driver.cuGraphExecDestroy, self._exec)

    def replay(self) -> None:
        """Launch the captured step on ``self.stream`` (asynchronously)."""
        if self._exec is None:
            self._step(self.stream)
            return
        from numba.cuda.cudadrv.driver import driver

        driver.cuGraphLaunch(self._exec, self.stream.handle)

    def synchronize(self) -> None:
        """Wait until the last replay has finished."""
        self.stream.synchronize()
