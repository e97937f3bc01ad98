// Ternary matmul on 2-bit packed weights: y[t, r] = (sum_c q[t, c] * W[r, c]) / a[t] * s[r].
//
// Weights: bitnet's "i2" layout read as 32-bit words. Each row of W (m rows, k columns) is
// padded with zeros to `blocks` blocks of 256 weights = 64 bytes = 16 words. Byte j (0..63)
// of a block holds W[r, 256 b + j + 64 i] + 1 in bits 2i..2i+1, so word w holds, at bits
// 2i of its four bytes, the codes of the 4 consecutive columns 256 b + 64 i + 4 w + (0..3):
// `(word >> 2i) & 0x03030303` is those four codes + 1, one per byte, and lines up with one
// char4 of activations. Decoding happens in registers (GEMV) or once per threadgroup tile
// (GEMM).
//
// Activations: int8 rows from quantize.metal, `blocks * 256` bytes apart, zero-padded.
//
// Output: int32 accumulators (exact, bit-identical to bn.matmul_int) or, with FLAG_SCALED,
// float32 acc / a[t] * s (s one scale, or one per row with FLAG_SCALE_PER_ROW), written as
// the 32-bit pattern of either type into `out`. The division is precise::divide, correctly
// rounded under fastMath too, so the floats are those of the CPU kernels' acc / a * s.
//
// Both kernels bounds-check against the threads metalcompute runs past `count`; they are
// correct for any threadgroup width that is a multiple of the SIMD width (32).

#include <metal_stdlib>
using namespace metal;

constant constexpr uint WORDS_PER_BLOCK = 16;      // 256 weights at 2 bits
constant constexpr uint CHAR4_PER_BLOCK = 64;      // 256 int8 activations
constant constexpr uint CHAR4_PER_SLICE = 16;      // 64 columns: the stride between bit pairs i
constant constexpr uint CODE_MASK = 0x03030303u;   // the low bit pair of each byte

constant constexpr uint FLAG_SCALED = 1u;
constant constexpr uint FLAG_SCALE_PER_ROW = 2u;

// params[0] = n (tokens), params[1] = m (output rows), params[2] = blocks of 256 columns,
// params[3] = flags.
struct MatmulShape {
    uint n;
    uint m;
    uint blocks;
    uint flags;
};

inline MatmulShape read_shape(constant uint* params)
{
    MatmulShape shape;
    shape.n = params[0];
    shape.m = params[1];
    shape.blocks = params[2];
    shape.flags = params[3];
    return shape;
}

// The four ternary codes (-1, 0, +1) of bit pair `pair` in each byte of `word`.
inline int4 decode_codes(uint word, uint pair)
{
    return int4(as_type<uchar4>((word >> (2 * pair)) & CODE_MASK)) - 1;
}

inline int dot4(int4 a, int4 b)
{
    return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}

// The 32-bit pattern stored in `out` for accumulator `acc` of token t, row r.
inline uint epilogue(int acc, uint t, uint r, MatmulShape shape,
                     device const float* act_scale, device const float* weight_scale)
{
    if ((shape.flags & FLAG_SCALED) == 0) {
        return as_type<uint>(acc);
    }
    const float s = weight_scale[(shape.flags & FLAG_SCALE_PER_ROW) ? r : 0];
    return as_type<uint>(precise::divide(float(acc), act_scale[t]) * s);  // fastMath would approximate `/`
}

// ---------------------------------------------------------------------------------------
// GEMV (decode): one SIMD group computes GEMV_ROWS consecutive output rows for one token.
// Lane l walks the words l, l + 32, ... of the rows, loads the matching 16 activations once
// and reuses them for every row of the block; simd_sum adds the 32 lanes' partial sums.
// Dispatch: count = n * ceil(m / GEMV_ROWS) * 32.
// ---------------------------------------------------------------------------------------

constant constexpr uint GEMV_ROWS = 4;

kernel void ternary_gemv(
    device const uint* weights [[buffer(0)]],
    device const char4* q [[buffer(1)]],
    device const float* act_scale [[buffer(2)]],
    device const float* weight_scale [[buffer(3)]],
    device uint* out [[buffer(4)]],
    constant uint* params [[buffer(5)]],
    uint group_index [[threadgroup_position_in_grid]],
    uint simdgroup_index [[simdgroup_index_in_threadgroup]],
    uint simdgroup_count [[simdgroups_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_width [[threads_per_simdgroup]])
{
    const MatmulShape shape = read_shape(params);
    const uint row_blocks = (shape.m + GEMV_ROWS - 1) / GEMV_ROWS;
    const uint work = group_index * simdgroup_count + simdgroup_index;
    const uint t = work / row_blocks;
    if (t >= shape.n) {
        return;  // a whole SIMD group past the end of the grid
    }
    const uint first_row = (work % row_blocks) * GEMV_ROWS;
    const uint row_words = shape.blocks * WORDS_PER_BLOCK;
    device const char4* q_row = q + t * shape.blocks * CHAR4_PER_BLOCK;

    int acc[GEMV_ROWS] = {0, 0, 0, 0};
    for (uint w = lane; w < row_words; w += simd_width) {
        const uint first_char4 = (w / WORDS_PER_BLOCK) * CHAR4_PER_BLOCK + w % WORDS_PER_BLOCK;
        int4 x[4];
        for (uint pair = 0; pair < 4; ++pair) {
            x[pair] = int4(q_row[first_char4 + pair * CHAR4_PER_SLICE]);
        }
        for (uint i = 0; i < GEMV_ROWS; ++i) {
            const uint r = first_row + i;
            if (r < shape.m) {
                const uint word = weights[r * row_words + w];
                for (uint pair = 0; pair < 4; ++pair) {
                    acc[i] += dot4(decode_codes(word, pair), x[pair]);
                }
            }
        }
    }
    for (uint i = 0; i < GEMV_ROWS; ++i) {
        const int total = simd_sum(acc[i]);  // every lane takes part, rows past m included
        const uint r = first_row + i;
        if (lane == 0 && r < shape.m) {
            out[t * shape.m + r] = epilogue(total, t, r, shape, act_scale, weight_scale);
        }
    }
}

// ---------------------------------------------------------------------------------------
// GEMM (prefill): one threadgroup computes a TILE_ROWS x TILE_TOKENS tile of the output.
// For each block of 256 columns the threadgroup decodes the tile's weights once into
// threadgroup memory (as int8 codes) and stages the tokens' activations next to them; every
// decoded weight is then reused by TILE_TOKENS tokens. Thread `tid` owns the outputs
// tid, tid + width, ... of the tile, so any width from 32 to 1024 covers it.
// Dispatch: count = ceil(m / TILE_ROWS) * ceil(n / TILE_TOKENS) * GEMM_GROUP_THREADS; with a
// threadgroup narrower than GEMM_GROUP_THREADS the extra threadgroups return at once.
// ---------------------------------------------------------------------------------------

constant constexpr uint TILE_ROWS = 32;
constant constexpr uint TILE_TOKENS = 32;
constant constexpr uint TILE_OUTPUTS = TILE_ROWS * TILE_TOKENS;
constant constexpr uint GEMM_GROUP_THREADS = 1024;                        // the widest threadgroup
constant constexpr uint MAX_OUTPUTS_PER_THREAD = TILE_OUTPUTS / 32;      // at the narrowest, 32

kernel void ternary_gemm(
    device const uint* weights [[buffer(0)]],
    device const char4* q [[buffer(1)]],
    device const float* act_scale [[buffer(2)]],
    device const float* weight_scale [[buffer(3)]],
    device uint* out [[buffer(4)]],
    constant uint* params [[buffer(5)]],
    uint group_index [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint width [[threads_per_threadgroup]])
{
    threadgroup char4 weight_tile[TILE_ROWS][CHAR4_PER_BLOCK];
    threadgroup char4 token_tile[TILE_TOKENS][CHAR4_PER_BLOCK];

    const MatmulShape shape = read_shape(params);
    const uint row_tiles = (shape.m + TILE_ROWS - 1) / TILE_ROWS;
    const uint token_tiles = (shape.n + TILE_TOKENS - 1) / TILE_TOKENS;
    if (group_index >= row_tiles * token_tiles) {
        return;  // the whole threadgroup leaves together, before any barrier
    }
    const uint first_row = (group_index % row_tiles) * TILE_ROWS;
    const uint first_token = (group_index / row_tiles) * TILE_TOKENS;
    const uint row_words = shape.blocks * WORDS_PER_BLOCK;
    const uint q_stride = shape.blocks * CHAR4_PER_BLOCK;

    int acc[MAX_OUTPUTS_PER_THREAD];
    for (uint j = 0; j < MAX_OUTPUTS_PER_THREAD; ++j) {
        acc[j] = 0;
    }

    for (uint b = 0; b < shape.blocks; ++b) {
        for (uint e = tid; e < TILE_ROWS * WORDS_PER_BLOCK; e += width) {
            const uint i = e / WORDS_PER_BLOCK;
            const uint w = e % WORDS_PER_BLOCK;
            const uint r = first_row + i;
            // Rows past m decode as all-zero codes (bits 01 = code 0).
            const uint word = r < shape.m ? weights[r * row_words + b * WORDS_PER_BLOCK + w] : 0x55555555u;
            for (uint pair = 0; pair < 4; ++pair) {
                weight_tile[i][pair * CHAR4_PER_SLICE + w] = char4(decode_codes(word, pair));
            }
        }
        for (uint e = tid; e < TILE_TOKENS * CHAR4_PER_BLOCK; e += width) {
            const uint i = e / CHAR4_PER_BLOCK;
            const uint c = e % CHAR4_PER_BLOCK;
            const uint t = first_token + i;
            token_tile[i][c] = t < shape.n ? q[t * q_stride + b * CHAR4_PER_BLOCK + c] : char4(0);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);

        for (uint j = 0; j < MAX_OUTPUTS_PER_THREAD; ++j) {
            const uint o = tid + j * width;
            if (o >= TILE_OUTPUTS) {
                break;
            }
            const uint i = o % TILE_ROWS;
            const uint token = o / TILE_ROWS;
            int sum = 0;
            for (uint c = 0; c < CHAR4_PER_BLOCK; ++c) {
                sum += dot4(int4(weight_tile[i][c]), int4(token_tile[token][c]));
            }
            acc[j] += sum;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);  // the tiles are refilled next block
    }

    for (uint j = 0; j < MAX_OUTPUTS_PER_THREAD; ++j) {
        const uint o = tid + j * width;
        if (o >= TILE_OUTPUTS) {
            break;
        }
        const uint r = first_row + o % TILE_ROWS;
        const uint t = first_token + o / TILE_ROWS;
        if (r < shape.m && t < shape.n) {
            out[t * shape.m + r] = epilogue(acc[j], t, r, shape, act_scale, weight_scale);
        }
    }
}
