// Per-token int8 activation quantization (BitNet b1.58), bit-exact with bn.quantize_activations.
//
// One SIMD group quantizes one row of x (one token):
//   a = 127 / max(max|x_row|, 1e-5)        (float32, correctly rounded)
//   q = clamp(rint(x * a), -128, 127)       (round half to even)
// A row holding NaN or Inf gets a = NaN and q = 0.
//
// q rows are written with a stride of `row_stride` bytes (k rounded up to 256) and the
// padding is zero, so the ternary matmul kernels can read whole 256-wide blocks.
//
// metalcompute dispatches a 1-D grid whose threadgroup width is the pipeline's maximum (a
// multiple of 32), rounded up past `count`: the bridge asks for n * 32 threads and every
// SIMD group past the last row returns at once (the whole SIMD group together, so the
// SIMD-group reduction below only ever runs with all 32 lanes).
//
// fastMath is on in metalcompute, so nothing here relies on IEEE special values in float
// comparisons: the row's absmax is taken on the bit patterns (|x| bits compare as unsigned
// integers in the same order as the floats), NaN/Inf are recognised by their exponent bits,
// and the one division is precise::divide.

#include <metal_stdlib>
using namespace metal;

constant constexpr uint ABS_MASK = 0x7fffffffu;
constant constexpr uint EXPONENT_ALL_ONES = 0x7f800000u;  // |x| bits at or above this: Inf or NaN
constant constexpr uint QUIET_NAN = 0x7fc00000u;

// shape[0] = n (rows), shape[1] = k (features), shape[2] = row_stride of q in bytes (>= k).
kernel void quantize_activations(
    device const float* x [[buffer(0)]],
    device char* q [[buffer(1)]],
    device float* act_scale [[buffer(2)]],
    constant uint* shape [[buffer(3)]],
    uint group_index [[threadgroup_position_in_grid]],
    uint simdgroup_index [[simdgroup_index_in_threadgroup]],
    uint simdgroup_count [[simdgroups_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_width [[threads_per_simdgroup]])
{
    const uint n = shape[0];
    const uint k = shape[1];
    const uint row_stride = shape[2];
    const uint row = group_index * simdgroup_count + simdgroup_index;
    if (row >= n) {
        return;
    }
    device const float* x_row = x + row * k;
    device char* q_row = q + row * row_stride;

    uint absmax_bits = 0;
    for (uint j = lane; j < k; j += simd_width) {
        absmax_bits = max(absmax_bits, as_type<uint>(x_row[j]) & ABS_MASK);
    }
    absmax_bits = simd_max(absmax_bits);
    const bool finite = absmax_bits < EXPONENT_ALL_ONES;
    const float a = finite ? precise::divide(127.0f, max(as_type<float>(absmax_bits), 1e-5f))
                           : as_type<float>(QUIET_NAN);
    if (lane == 0) {
        act_scale[row] = a;
    }
    for (uint j = lane; j < row_stride; j += simd_width) {
        char level = 0;
        if (finite && j < k) {
            level = char(clamp(rint(x_row[j] * a), -128.0f, 127.0f));
        }
        q_row[j] = level;
    }
}
