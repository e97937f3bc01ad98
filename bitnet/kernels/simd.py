"""x86 SIMD building blocks for Numba kernels, written as ``@intrinsic`` LLVM IR.

Plain Numba loops over ``uint8 * int8`` products never become the byte multiply-add
instructions (``vpdpbusd``, ``vpmaddubsw``) that make ternary matmul fast, so the matmul
kernels spell them out with the small vocabulary below. Vectors are real LLVM vector
values (``<64 x i8>``, ``<16 x i32>``, ...) that Numba carries in registers like any
scalar; each operation is one or two LLVM instructions.

Every operation takes an *ISA marker* first (``AVX512VNNI``, ``AVXVNNI`` or ``AVX2``, module
constants used as compile-time globals). Its Numba type fixes the vector width and which
dot-product instruction ``dot_acc`` emits, so one generic kernel compiles to each
instruction set. The markers must only be used on CPUs that have the features
(``bitnet.kernels.cpu_features`` decides).

Vocabulary: ``byte_vector_size(isa)`` bytes per vector; ``load_bytes`` / ``splat_bytes`` /
``splat_four_bytes`` / ``and_bytes`` / ``shift_right_bytes`` on byte vectors; ``zero_acc`` /
``splat_acc`` / ``dot_acc`` / ``offset_sums`` / ``signed_dot`` / ``add_acc`` /
``shift_right_acc`` / ``sum_acc`` / ``lane_totals`` / ``lane`` on int32
accumulator vectors; ``zero_floats`` / ``splat_floats`` / ``load_floats`` / ``widen_words`` /
``block_scales`` / ``scaled_add_floats`` / ``dequantize`` / ``add_floats`` / ``mul_floats`` /
``add_products`` / ``sum_floats`` (and ``lane_totals`` / ``lane``) on float32 vectors of the same
lane count; ``store_vector`` for all three, ``store_fours`` for a 4 x 4 block of floats;
``load_four_floats`` / ``widen_four_words`` / ``store_four_floats`` for a register block's row
of 4 vectors; ``prefetch``; and the scalars
``widen_word`` (a bf16 or f16 word, as a ``WordFormat`` marker says), its inverse
``narrow_to_f16`` and ``float32_from_bits``.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.imputils import lower_constant
from numba.extending import NativeValue, intrinsic, models, register_model, typeof_impl, unbox


class IsaMarker:
    """A Python-side token naming an instruction set; Numba types it as :class:`IsaType`."""

    def __init__(self, name: str, vector_bytes: int):
        self.name = name
        self.vector_bytes = vector_bytes

    def __repr__(self) -> str:
        return f"IsaMarker({self.name})"


class IsaType(types.Type):
    def __init__(self, isa: str, vector_bytes: int):
        self.isa = isa
        self.vector_bytes = vector_bytes
        super().__init__(name=f"Isa({isa})")


AVX512VNNI = IsaMarker("avx512vnni", 64)
AMX = IsaMarker("amx", 64)  # AVX-512 VNNI vectors, plus AMX tiles where a kernel has a tile loop
AVXVNNI = IsaMarker("avxvnni", 32)
AVX2 = IsaMarker("avx2", 32)
PORTABLE = IsaMarker("portable", 0)  # no vectors: kernels take their plain-Numba branch for it
MARKERS = {marker.name: marker for marker in (AMX, AVX512VNNI, AVXVNNI, AVX2, PORTABLE)}
"""The marker of each kernel path named in ``bitnet.kernels.cpu_features.PATHS``."""

register_model(IsaType)(models.OpaqueModel)


@typeof_impl.register(IsaMarker)
def _typeof_marker(marker, context):
    return IsaType(marker.name, marker.vector_bytes)


@lower_constant(IsaType)
def _lower_marker(context, builder, ty, pyval):
    return context.get_constant_null(ty)


@unbox(IsaType)
def _unbox_marker(typ, obj, c):
    """A marker carries no run-time data: only its type matters."""
    return NativeValue(c.context.get_constant_null(typ))


class VectorType(types.Type):
    """An LLVM integer vector ``<lanes x i{bits}>`` held as one Numba value."""

    def __init__(self, bits: int, lanes: int):
        self.bits = bits
        self.lanes = lanes
        super().__init__(name=f"i{bits}x{lanes}")

    @property
    def llvm_type(self) -> ir.VectorType:
        return ir.VectorType(ir.IntType(self.bits), self.lanes)


@register_model(VectorType)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, fe_type.llvm_type)


def _bytes_type(isa: IsaType) -> VectorType:
    return VectorType(8, isa.vector_bytes)


def _acc_type(isa: IsaType) -> VectorType:
    return VectorType(32, isa.vector_bytes // 4)


def _splat(builder, vector_type: ir.VectorType, scalar):
    """A vector with ``scalar`` in every lane (LLVM folds it to a constant when it can)."""
    one = builder.insert_element(ir.Constant(vector_type, ir.Undefined), scalar, ir.Constant(ir.IntType(32), 0))
    zeros = ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count), [0] * vector_type.count)
    return builder.shuffle_vector(one, ir.Constant(vector_type, ir.Undefined), zeros)


def _call(builder, name: str, return_type, args):
    fnty = ir.FunctionType(return_type, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


def _c_array(array, dtype_ok) -> bool:
    """Whether ``array`` is a C-contiguous Numba array type whose dtype passes ``dtype_ok``: the
    vector loads and stores address flat elements, which a strided array would get wrong, so
    they do not type for one (a compile error, not a wrong answer)."""
    return isinstance(array, types.Array) and array.layout == "C" and dtype_ok(array.dtype)


def _element_pointer(context, builder, array_type, array, index_type, index, value_type):
    """Pointer to flat element ``index`` of a C-contiguous array (any shape), typed as ``value_type*``."""
    data = context.make_array(array_type)(context, builder, array).data
    offset = context.cast(builder, index, index_type, types.intp)
    return builder.bitcast(builder.gep(data, [offset]), value_type.as_pointer())


@intrinsic
def byte_vector_size(typingctx, isa):
    """Bytes per vector register for ``isa`` (64 for AVX-512, 32 for AVX2/AVX-VNNI)."""

    def codegen(context, builder, sig, args):
        return context.get_constant(types.intp, isa.vector_bytes)

    return types.intp(isa), codegen


def _named_intrinsic(function, name: str, doc: str):
    """``function`` as an ``@intrinsic`` called ``name`` (so typing errors name it) with docstring ``doc``."""
    function.__name__ = function.__qualname__ = name
    function.__doc__ = doc
    return intrinsic(function)


def _vector_load(name: str, vector_of, dtype_ok, doc: str):
    """An intrinsic ``name(isa, array, index)`` loading the vector ``vector_of(isa)`` from flat ``index``
    on of a C-contiguous ``array`` whose dtype passes ``dtype_ok``."""

    def load(typingctx, isa, array, index):
        if not _c_array(array, dtype_ok):
            return None
        vec = vector_of(isa)

        def codegen(context, builder, sig, args):
            pointer = _element_pointer(context, builder, sig.args[1], args[1], sig.args[2], args[2], vec.llvm_type)
            return builder.load(pointer, align=1)

        return vec(isa, array, index), codegen

    return _named_intrinsic(load, name, doc)


load_bytes = _vector_load("load_bytes", _bytes_type, lambda dtype: dtype.bitwidth == 8,
                          "The ``byte_vector_size(isa)`` bytes of a C-contiguous 1-byte array from flat ``index`` on.")


def _splat_ints(name: str, vector_of, doc: str):
    """An intrinsic ``name(isa, value)`` giving the vector ``vector_of(isa)`` with the low bits of
    ``value`` in every lane."""

    def splat(typingctx, isa, value):
        vec = vector_of(isa)

        def codegen(context, builder, sig, args):
            return _splat(builder, vec.llvm_type, builder.trunc(args[1], ir.IntType(vec.bits)))

        return vec(isa, value), codegen

    return _named_intrinsic(splat, name, doc)


splat_bytes = _splat_ints("splat_bytes", _bytes_type, "A byte vector with the low 8 bits of ``value`` in every lane.")


@intrinsic
def splat_four_bytes(typingctx, isa, array, index):
    """A byte vector repeating the 4 bytes of a C-contiguous 1-byte ``array`` from flat ``index`` on
    in every 4-byte lane (a broadcast load that ``vpdpbusd`` folds into its memory operand)."""
    if not _c_array(array, lambda dtype: dtype.bitwidth == 8):
        return None
    vec = _bytes_type(isa)

    def codegen(context, builder, sig, args):
        word = ir.IntType(32)
        pointer = _element_pointer(context, builder, sig.args[1], args[1], sig.args[2], args[2], word)
        words = _splat(builder, ir.VectorType(word, vec.lanes // 4), builder.load(pointer, align=1))
        return builder.bitcast(words, vec.llvm_type)

    return vec(isa, array, index), codegen


@intrinsic
def and_bytes(typingctx, a, b):
    """Lane-wise ``a & b`` of two byte vectors."""

    def codegen(context, builder, sig, args):
        return builder.and_(args[0], args[1])

    return a(a, b), codegen


@intrinsic
def shift_right_bytes(typingctx, a, count):
    """Every byte shifted right by ``count`` bits, as 16-bit lanes (one ``vpsrlw``): mask afterwards."""

    def codegen(context, builder, sig, args):
        words = ir.VectorType(ir.IntType(16), a.lanes // 2)
        amount = _splat(builder, words, builder.trunc(args[1], ir.IntType(16)))
        shifted = builder.lshr(builder.bitcast(args[0], words), amount)
        return builder.bitcast(shifted, a.llvm_type)

    return a(a, count), codegen


@intrinsic
def zero_acc(typingctx, isa):
    """An int32 accumulator vector of zeros."""
    vec = _acc_type(isa)

    def codegen(context, builder, sig, args):
        return ir.Constant(vec.llvm_type, [0] * vec.lanes)

    return vec(isa), codegen


splat_acc = _splat_ints("splat_acc", _acc_type,
                        "An int32 accumulator vector with the low 32 bits of ``value`` in every lane.")


_VNNI = ("amx", "avx512vnni", "avxvnni")  # the markers whose dot product is ``vpdpbusd``


def _dot(builder, isa_name: str, acc, unsigned_bytes, signed_bytes):
    """``acc`` plus the sums of 4 adjacent ``u8 x s8`` byte products, in each int32 lane."""
    i32 = acc.type
    if isa_name in _VNNI:
        width = 256 if isa_name == "avxvnni" else 512
        ops = [acc, builder.bitcast(unsigned_bytes, i32), builder.bitcast(signed_bytes, i32)]
        return _call(builder, f"llvm.x86.avx512.vpdpbusd.{width}", i32, ops)
    words = ir.VectorType(ir.IntType(16), 16)
    pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", words, [unsigned_bytes, signed_bytes])
    ones = ir.Constant(words, [1] * 16)
    return builder.add(acc, _call(builder, "llvm.x86.avx2.pmadd.wd", i32, [pairs, ones]))


@intrinsic
def dot_acc(typingctx, isa, acc, codes, activations):
    """``acc`` plus, in each int32 lane, the sum of 4 adjacent products ``u8 codes * s8 activations``.

    AVX-512 VNNI / AVX-VNNI: one ``vpdpbusd`` (no saturation). AVX2: ``vpmaddubsw`` (pairs,
    saturating to int16) then ``vpmaddwd`` by ones (pairs of int16 into int32) and an add;
    pairs of ``code <= 128`` times ``-128 <= activation <= 127`` stay within int16, so the
    saturation never triggers for the codes the kernels feed it.
    """

    def codegen(context, builder, sig, args):
        return _dot(builder, isa.isa, args[1], args[2], args[3])

    return acc(isa, acc, codes, activations), codegen


@intrinsic
def offset_sums(typingctx, isa, b):
    """What ``signed_dot`` starts each int32 lane from for the bytes ``b``: ``-128`` times the sum
    of the lane's 4 bytes with VNNI (one ``vpdpbusd`` and a negation), zeros elsewhere."""
    vec = _acc_type(isa)

    def codegen(context, builder, sig, args):
        zeros = ir.Constant(vec.llvm_type, [0] * vec.lanes)
        if isa.isa not in _VNNI:
            return zeros
        offset = ir.Constant(args[1].type, [0x80] * b.lanes)
        return builder.sub(zeros, _dot(builder, isa.isa, zeros, offset, args[1]))

    return vec(isa, b), codegen


@intrinsic
def signed_dot(typingctx, isa, a, b, offset):
    """In each int32 lane, the sum of 4 adjacent products ``s8 a * s8 b`` (``b != -128``).

    The byte multiply-adds take one unsigned operand. With VNNI it is ``a + 128`` (``a ^
    0x80``): ``vpdpbusd`` starting from ``offset = offset_sums(isa, b)``, which is ``-128 *
    sum(b)`` in each lane. AVX2's ``vpmaddubsw`` would saturate on those larger products, so
    there the sign of ``a`` moves onto ``b`` instead: ``a * b = |a| * (b if a >= 0 else -b)``,
    with ``|a| <= 128`` as ``dot_acc`` requires (``offset`` is zeros there).
    """

    def codegen(context, builder, sig, args):
        _, a_v, b_v, offset_v = args
        if isa.isa in _VNNI:
            shifted = builder.xor(a_v, ir.Constant(a_v.type, [0x80] * a.lanes))
            return _dot(builder, isa.isa, offset_v, shifted, b_v)
        magnitude = _call(builder, f"llvm.abs.v{a.lanes}i8", a_v.type, [a_v, ir.Constant(ir.IntType(1), 0)])
        negative = builder.icmp_signed("<", a_v, ir.Constant(a_v.type, [0] * a.lanes))
        signed = builder.select(negative, builder.neg(b_v), b_v)
        return _dot(builder, isa.isa, offset_v, magnitude, signed)

    return offset(isa, a, b, offset), codegen


@intrinsic
def add_acc(typingctx, a, b):
    """Lane-wise int32 ``a + b``."""

    def codegen(context, builder, sig, args):
        return builder.add(args[0], args[1])

    return a(a, b), codegen


@intrinsic
def shift_right_acc(typingctx, a, count):
    """Lane-wise arithmetic ``a >> count`` (exact division of lanes known to be multiples of 2**count)."""

    def codegen(context, builder, sig, args):
        return builder.ashr(args[0], _splat(builder, a.llvm_type, builder.trunc(args[1], ir.IntType(32))))

    return a(a, count), codegen


class FloatVectorType(types.Type):
    """An LLVM ``<lanes x float>`` held as one Numba value."""

    def __init__(self, lanes: int):
        self.lanes = lanes
        super().__init__(name=f"f32x{lanes}")

    @property
    def llvm_type(self) -> ir.VectorType:
        return ir.VectorType(ir.FloatType(), self.lanes)


register_model(FloatVectorType)(_VectorModel)


@intrinsic
def lane_totals(typingctx, accs):
    """The lane sums of 16 accumulators as one 16-lane vector (lane ``i``: ``sum(accs[i])``):
    int32 accumulators give int32 totals, float32 ones float32.

    A tree of pairwise shuffles and adds (``log2(lanes)`` levels, ~45 vector operations for
    AVX-512) instead of 16 separate reductions (~9 each). Summed in int32, as ``sum_acc``;
    float lanes in the tree's fixed order.
    """
    if not (isinstance(accs, types.UniTuple) and accs.count == 16
            and isinstance(accs.dtype, (VectorType, FloatVectorType))):
        return None
    lanes = accs.dtype.lanes
    floats = isinstance(accs.dtype, FloatVectorType)
    out = FloatVectorType(16) if floats else VectorType(32, 16)

    def codegen(context, builder, sig, args):
        add = builder.fadd if floats else builder.add
        vectors = cgutils.unpack_tuple(builder, args[0])
        width = lanes  # lanes of each accumulator's partial sums within a vector
        while width > 1:
            groups = lanes // width  # accumulators per vector
            half = width // 2
            first = [g * width + x for g in range(groups) for x in range(half)]
            low = ir.Constant(ir.VectorType(ir.IntType(32), lanes), first + [lanes + i for i in first])
            high = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [i + half for i in first]
                               + [lanes + i + half for i in first])
            vectors = [add(builder.shuffle_vector(a, b, low), builder.shuffle_vector(a, b, high))
                       for a, b in zip(vectors[::2], vectors[1::2], strict=True)]
            width = half
        while len(vectors) > 1:  # AVX2: two 8-lane vectors of totals, in order
            count = 2 * vectors[0].type.count
            joined = ir.Constant(ir.VectorType(ir.IntType(32), count), list(range(count)))
            vectors = [builder.shuffle_vector(a, b, joined) for a, b in zip(vectors[::2], vectors[1::2], strict=True)]
        return vectors[0]

    return out(accs), codegen


@intrinsic
def lane(typingctx, vector, index):
    """Lane ``index`` of a vector: an int32 lane as an int64, a float32 lane as a float32."""
    floats = isinstance(vector, FloatVectorType)

    def codegen(context, builder, sig, args):
        value = builder.extract_element(args[0], builder.trunc(args[1], ir.IntType(32)))
        return value if floats else builder.sext(value, ir.IntType(64))

    return (types.float32 if floats else types.int64)(vector, index), codegen


@intrinsic
def sum_acc(typingctx, a):
    """The sum of the int32 lanes of ``a`` as an int64.

    Summed in int32 (a few shuffles and adds): the kernels keep their lanes small enough
    (see ``FOLD_BLOCKS`` in ``bitnet.kernels.ternary_simd``) that the total cannot overflow.
    """

    def codegen(context, builder, sig, args):
        total = _call(builder, f"llvm.vector.reduce.add.v{a.lanes}i32", ir.IntType(32), [args[0]])
        return builder.sext(total, ir.IntType(64))

    return types.int64(a), codegen


@intrinsic
def zero_floats(typingctx, isa):
    """A float32 vector of zeros with as many lanes as an int32 accumulator of ``isa``."""
    vec = FloatVectorType(isa.vector_bytes // 4)

    def codegen(context, builder, sig, args):
        return ir.Constant(vec.llvm_type, [0.0] * vec.lanes)

    return vec(isa), codegen


class WordFormat:
    """A Python-side token naming how a table element holds a float: ``BF16_WORDS`` or
    ``F16_WORDS`` (raw 16-bit words), or ``F32_VALUES`` (float32, read as it is).

    numpy has no bfloat16 and Numba no float16 on the CPU, so both kinds of 16-bit table reach
    a kernel as uint16 arrays; this marker, typed like an ISA marker, tells ``widen_word``
    which one it reads, and one generic kernel compiles to each format, float32 included.
    """

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"WordFormat({self.name})"


class WordFormatType(types.Type):
    def __init__(self, word_format: str):
        self.word_format = word_format
        super().__init__(name=f"WordFormat({word_format})")


BF16_WORDS = WordFormat("bf16")
F16_WORDS = WordFormat("f16")  # IEEE binary16
F32_VALUES = WordFormat("f32")  # a float32 table: "widening" is the identity
register_model(WordFormatType)(models.OpaqueModel)
lower_constant(WordFormatType)(_lower_marker)
unbox(WordFormatType)(_unbox_marker)


@typeof_impl.register(WordFormat)
def _typeof_word_format(marker, context):
    return WordFormatType(marker.name)


@intrinsic
def widen_word(typingctx, word_format, word):
    """One float held in a raw uint16 ``word`` as a float32, exactly; ``word_format`` says bf16 or f16
    (or f32: ``word`` is then a float32, returned as it is).

    f16 is LLVM's ``fpext half to float``, which a vectorized loop turns into one
    ``vcvtph2ps`` per 16 values (F16C / AVX-512F) instead of a call per value. Where Numba
    compiles for an x86 CPU without F16C (``NUMBA_CPU_NAME=generic``), LLVM would lower it to
    ``__extendhfsf2``, which Numba cannot link, so the bits are moved with integer operations
    (``_f16_bits_widen``) that vectorize on any x86.
    """
    if not isinstance(word_format, WordFormatType) or word != _element_type(word_format):
        return None

    def codegen(context, builder, sig, args):
        return _widen(builder, word_format.word_format, args[1])

    return types.float32(word_format, word), codegen


def _converts_half() -> bool:
    """Whether the CPU Numba compiles for widens half floats in one instruction (x86 F16C; aarch64 always)."""
    import llvmlite.binding as llvm

    from .cpu_features import _compile_target_features  # imported here: cpu_features imports this module

    return not llvm.get_process_triple().startswith(("x86", "i686")) or "f16c" in _compile_target_features()


def _element_type(word_format: WordFormatType) -> types.Type:
    """The Numba type of a table element in ``word_format``: uint16 words, or float32."""
    return types.float32 if word_format.word_format == "f32" else types.uint16


def _widen(builder, word_format: str, words):
    """Raw uint16 words (one, or a vector of them) as float32 values, exactly (float32 ones as they are)."""
    if word_format == "f32":
        return words
    if word_format == "f16":
        if _converts_half():
            return builder.fpext(builder.bitcast(words, _like(words, ir.HalfType())), _like(words, ir.FloatType()))
        return _f16_bits_widen(builder, words)
    wide = builder.zext(words, _like(words, ir.IntType(32)))  # a bf16 word is the top half of a float32
    return builder.bitcast(builder.shl(wide, _constant(wide.type, 16)), _like(words, ir.FloatType()))


def _like(value, element):
    """``element``, or a vector of it with as many lanes as ``value`` has."""
    return ir.VectorType(element, value.type.count) if isinstance(value.type, ir.VectorType) else element


def _constant(kind, value):
    """``value`` as a constant of ``kind``, in every lane if ``kind`` is a vector type."""
    return ir.Constant(kind, [value] * kind.count) if isinstance(kind, ir.VectorType) else ir.Constant(kind, value)


def _f16_bits_widen(builder, word):
    """An IEEE f16 word (or a vector of them) as float32, by moving its fields (as ggml's and
    Giesen's ``half_to_float``).

    Sign, exponent and mantissa shift into float32 places and the exponent is rebased;
    Inf/NaN get the all-ones exponent; a subnormal (or zero) is rebuilt as a normal float
    ``2**-14 * (1 + m / 1024)`` from which ``2**-14`` is subtracted, exactly.
    """
    i32, f32 = _like(word, ir.IntType(32)), _like(word, ir.FloatType())

    def const(value):
        return _constant(i32, value)

    wide = builder.zext(word, i32)
    bits = builder.shl(builder.and_(wide, const(0x7FFF)), const(13))
    exponent = builder.and_(bits, const(0x7C00 << 13))
    rebased = builder.add(bits, const((127 - 15) << 23))
    special = builder.add(rebased, const((128 - 16) << 23))
    small = builder.fsub(builder.bitcast(builder.add(rebased, const(1 << 23)), f32), _constant(f32, 2.0**-14))
    value = builder.select(builder.icmp_unsigned("==", exponent, const(0x7C00 << 13)), special, rebased)
    value = builder.select(builder.icmp_unsigned("==", exponent, const(0)), builder.bitcast(small, i32), value)
    sign = builder.shl(builder.and_(wide, const(0x8000)), const(16))
    return builder.bitcast(builder.or_(value, sign), f32)


@intrinsic
def widen_words(typingctx, isa, word_format, array, index):
    """A float32 vector (the lanes of an int32 accumulator of ``isa``) of the elements of a
    C-contiguous ``array`` (uint16 words, or float32 for ``F32_VALUES``) from flat ``index``
    on, widened exactly as ``widen_word`` does."""
    if not (isinstance(word_format, WordFormatType)
            and _c_array(array, lambda dtype: dtype == _element_type(word_format))):
        return None
    vec = FloatVectorType(isa.vector_bytes // 4)

    def codegen(context, builder, sig, args):
        words = ir.VectorType(context.get_value_type(array.dtype), vec.lanes)
        pointer = _element_pointer(context, builder, sig.args[2], args[2], sig.args[3], args[3], words)
        return _widen(builder, word_format.word_format, builder.load(pointer, align=2))

    return vec(isa, word_format, array, index), codegen


load_floats = _vector_load("load_floats", lambda isa: FloatVectorType(isa.vector_bytes // 4),
                           lambda dtype: dtype == types.float32,
                           "A float32 vector (the lanes of an int32 accumulator of ``isa``) of a C-contiguous "
                           "float32 ``array`` from flat ``index`` on.")


@intrinsic
def store_vector(typingctx, array, index, vector):
    """Store a vector into a C-contiguous ``array`` of its element type from flat ``index`` on: a
    byte or int32 vector into integers of that size, a float32 vector into float32."""
    if isinstance(vector, FloatVectorType):
        fits = _c_array(array, lambda dtype: dtype == types.float32)
    else:
        fits = isinstance(vector, VectorType) and _c_array(
            array, lambda dtype: isinstance(dtype, types.Integer) and dtype.bitwidth == vector.bits)
    if not fits:
        return None

    def codegen(context, builder, sig, args):
        pointer = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1], vector.llvm_type)
        builder.store(args[2], pointer, align=1)
        return context.get_dummy_value()

    return types.none(array, index, vector), codegen


@intrinsic
def splat_floats(typingctx, isa, value):
    """A float32 vector (the lanes of an int32 accumulator of ``isa``) with ``value`` in every lane."""
    vec = FloatVectorType(isa.vector_bytes // 4)

    def codegen(context, builder, sig, args):
        return _splat(builder, vec.llvm_type, context.cast(builder, args[1], sig.args[1], types.float32))

    return vec(isa, value), codegen


def _lane_by_lane(name: str, instruction: str, doc: str):
    """An intrinsic ``name(a, b)`` applying the LLVM float ``instruction`` ("fadd", "fmul") to two
    float32 vectors of the same lanes, lane by lane."""

    def operation(typingctx, a, b):
        if not (isinstance(a, FloatVectorType) and a == b):
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, instruction)(args[0], args[1])

        return a(a, b), codegen

    return _named_intrinsic(operation, name, doc)


add_floats = _lane_by_lane("add_floats", "fadd", "``a + b`` lane by lane (float32 vectors).")
mul_floats = _lane_by_lane("mul_floats", "fmul", "``a * b`` lane by lane (float32 vectors).")


@intrinsic
def store_fours(typingctx, array, index, stride, vector):
    """Store each 4 consecutive lanes of a float32 vector into a C-contiguous float32 ``array``: lanes
    ``4 q .. 4 q + 3`` from flat ``index + q stride`` on (a 4 x 4 block into 4 rows of a matrix,
    one 128-bit store each)."""
    if not (isinstance(vector, FloatVectorType) and _c_array(array, lambda dtype: dtype == types.float32)):
        return None

    def codegen(context, builder, sig, args):
        four = ir.VectorType(ir.FloatType(), 4)
        start = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1], ir.FloatType())
        step = context.cast(builder, args[2], sig.args[2], types.intp)
        for q in range(vector.lanes // 4):
            lanes = ir.Constant(ir.VectorType(ir.IntType(32), 4), list(range(4 * q, 4 * q + 4)))
            part = builder.shuffle_vector(args[3], ir.Constant(args[3].type, ir.Undefined), lanes)
            offset = builder.mul(step, ir.Constant(step.type, q))
            builder.store(part, builder.bitcast(builder.gep(start, [offset]), four.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(array, index, stride, vector), codegen


@intrinsic
def add_products(typingctx, total, a, b):
    """``total + a * b`` lane by lane, fused (one rounding: ``llvm.fma``)."""

    def codegen(context, builder, sig, args):
        total_v, a_v, b_v = args
        return _call(builder, f"llvm.fma.v{total.lanes}f32", total_v.type, [a_v, b_v, total_v])

    return total(total, a, b), codegen


@njit(cache=True, inline="always")
def load_four_floats(isa, array, index):
    """The 4 consecutive float32 vectors of a C-contiguous ``array`` from flat ``index`` on (a register block's row)."""
    step = byte_vector_size(isa) // 4
    return (load_floats(isa, array, index), load_floats(isa, array, index + step),
            load_floats(isa, array, index + 2 * step), load_floats(isa, array, index + 3 * step))


@njit(cache=True, inline="always")
def widen_four_words(isa, word_format, array, index):
    """``widen_words`` of the 4 consecutive vectors of ``array`` from flat ``index`` on."""
    step = byte_vector_size(isa) // 4
    return (widen_words(isa, word_format, array, index), widen_words(isa, word_format, array, index + step),
            widen_words(isa, word_format, array, index + 2 * step),
            widen_words(isa, word_format, array, index + 3 * step))


@njit(cache=True, inline="always")
def store_four_floats(isa, array, index, a, b, c, d):
    """Store 4 float32 vectors consecutively into a C-contiguous ``array`` from flat ``index`` on."""
    step = byte_vector_size(isa) // 4
    store_vector(array, index, a)
    store_vector(array, index + step, b)
    store_vector(array, index + 2 * step, c)
    store_vector(array, index + 3 * step, d)


@intrinsic
def narrow_to_f16(typingctx, value):
    """The float32 ``value`` as the raw uint16 word of the nearest IEEE f16 (ties to even), as numpy rounds.

    LLVM's ``fptrunc float to half`` (one ``vcvtps2ph`` per 16 values) where the CPU has
    F16C; elsewhere the integer route of :func:`_f16_bits_narrow`, for the reason given at
    :func:`widen_word`. Past f16's range it gives Inf; NaN stays NaN.
    """
    if value != types.float32:
        return None

    def codegen(context, builder, sig, args):
        if _converts_half():
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
        return _f16_bits_narrow(builder, args[0])

    return types.uint16(value), codegen


def _f16_bits_narrow(builder, value):
    """A float32 as the nearest f16 word, by integer operations (Giesen's ``float_to_half_fast3_rtne``).

    Magnitudes from f16's overflow threshold up become Inf (or a quiet NaN for NaN); those
    below the smallest normal f16 are rounded by a float add that lines their mantissa up
    with f16's subnormal grid; the rest drop 13 mantissa bits, rounding to nearest even.
    """
    i32, f32 = ir.IntType(32), ir.FloatType()

    def const(v):
        return ir.Constant(i32, v)

    bits = builder.bitcast(value, i32)
    sign = builder.and_(bits, const(0x80000000))
    magnitude = builder.xor(bits, sign)
    special = builder.select(builder.icmp_unsigned(">", magnitude, const(0x7F800000)), const(0x7E00), const(0x7C00))
    subnormal_magic = ((127 - 15) + (23 - 10) + 1) << 23
    aligned = builder.fadd(builder.bitcast(magnitude, f32), builder.bitcast(const(subnormal_magic), f32))
    subnormal = builder.sub(builder.bitcast(aligned, i32), const(subnormal_magic))
    odd = builder.and_(builder.lshr(magnitude, const(13)), const(1))
    normal = builder.lshr(builder.add(builder.add(magnitude, const(((15 - 127) << 23) + 0xFFF)), odd), const(13))
    finite = builder.select(builder.icmp_unsigned("<", magnitude, const(113 << 23)), subnormal, normal)
    word = builder.select(builder.icmp_unsigned(">=", magnitude, const((127 + 16) << 23)), special, finite)
    return builder.trunc(builder.or_(word, builder.lshr(sign, const(16))), ir.IntType(16))


@intrinsic
def float32_from_bits(typingctx, word):
    """The float32 whose bits are the uint32 ``word`` (a register move; ``np.array(..).view`` allocates)."""
    if not (isinstance(word, types.Integer) and word.bitwidth == 32 and not word.signed):
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(word), codegen


@intrinsic
def block_scales(typingctx, isa, scales, index):
    """A float32 vector (the lanes of an int32 accumulator of ``isa``) of ``scales[index:]``, one
    value for every 8 lanes: the scale of each 32-byte block of a byte vector, for its lanes."""
    if not _c_array(scales, lambda dtype: dtype == types.float32):
        return None
    vec = FloatVectorType(isa.vector_bytes // 4)
    blocks = isa.vector_bytes // 32

    def codegen(context, builder, sig, args):
        values = ir.VectorType(ir.FloatType(), blocks)
        pointer = _element_pointer(context, builder, sig.args[1], args[1], sig.args[2], args[2], values)
        loaded = builder.load(pointer, align=4)
        spread = ir.Constant(ir.VectorType(ir.IntType(32), vec.lanes), [lane // 8 for lane in range(vec.lanes)])
        return builder.shuffle_vector(loaded, ir.Constant(values, ir.Undefined), spread)

    return vec(isa, scales, index), codegen


@intrinsic
def scaled_add_floats(typingctx, total, acc, scales):
    """``total + float(acc) * scales`` lane by lane."""

    def codegen(context, builder, sig, args):
        total_v, acc_v, scales_v = args
        return builder.fadd(total_v, builder.fmul(builder.sitofp(acc_v, total_v.type), scales_v))

    return total(total, acc, scales), codegen


@intrinsic
def dequantize(typingctx, acc, divisors, factors):
    """``float(acc) / divisors * factors`` lane by lane: ``emit``'s output step, in the same float32 operations."""

    def codegen(context, builder, sig, args):
        acc_v, divisors_v, factors_v = args
        return builder.fmul(builder.fdiv(builder.sitofp(acc_v, divisors_v.type), divisors_v), factors_v)

    return divisors(acc, divisors, factors), codegen


@intrinsic
def sum_floats(typingctx, total):
    """The sum of the lanes of a float32 vector, by a fixed tree of adds (the same on every call)."""

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType(), args[0].type])
        fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.vector.reduce.fadd.v{total.lanes}f32")
        return builder.call(fn, [ir.Constant(ir.FloatType(), -0.0), args[0]], fastmath=("reassoc",))

    return types.float32(total), codegen


@intrinsic
def prefetch(typingctx, array, index):
    """Hint the CPU to pull the cache line holding flat element ``index`` of ``array`` into L2.

    Portable LLVM (``llvm.prefetch``, locality 2): ``prefetcht1`` on x86, ``prfm pldl2keep``
    on aarch64. Never faults, so it may point past the end of the array. Into L2, not L1: an
    L1 prefetch holds one of the core's few L1 miss buffers until its line arrives, which
    capped the lines in flight; streaming from DRAM, the int8 head went from 14.5 to 8.2-9.0
    ms (2 threads) and the projections' GEMV from 19-21 to 15.7 ms (NOTES.md).
    """

    def codegen(context, builder, sig, args):
        pointer = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1], ir.IntType(8))
        i32 = ir.IntType(32)
        read, into_l2, data_cache = (ir.Constant(i32, v) for v in (0, 2, 1))
        fnty = ir.FunctionType(ir.VoidType(), [pointer.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [pointer, read, into_l2, data_cache])
        return context.get_dummy_value()

    return types.none(array, index), codegen
