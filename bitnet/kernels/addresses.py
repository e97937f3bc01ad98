"""Arrays named by their address: how a kernel takes many arrays of one type in one argument.

A table of int64 addresses (kept alive by whoever built it) stands for a list of arrays that
Numba could only take as a tuple, whose every element it would type again at each call. The
kernels read an entry back as an array with :func:`array_at`, of the dtype of a ``template``
array (empty, of the right type) and a shape they know.
"""

from __future__ import annotations

from numba import carray, njit, types
from numba.extending import intrinsic


@intrinsic
def _pointer(typingctx, address, template):
    """``address`` (an int64) as a pointer to ``template``'s dtype."""
    signature = types.CPointer(template.dtype)(address, template)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


@njit(cache=True, nogil=True, inline="always")
def array_at(address, shape, template):
    """The C-contiguous array of ``shape`` (a tuple) and ``template``'s dtype at ``address``."""
    return carray(_pointer(address, template), shape)
