// msl_emu.h: just enough of the Metal Shading Language to compile bitnet's .metal shaders as
// C++20 with g++ and run them on the CPU the way metalcompute runs them on an Apple GPU.
//
// The shaders are not edited for this: they `#include <metal_stdlib>`, and the emulation's
// include directory holds a `metal_stdlib` that includes this file. What it maps:
//
// * Types: uint/uchar/ushort/..., the 4-wide vectors the shaders use (char4, uchar4, int4,
//   uint4, float4) with MSL's element-wise arithmetic and conversions, as_type<T>.
// * Address spaces: compiler.py rewrites every `device T*` and `constant T*` of the source into
//   msl_emu::pointer<space, T>, a type of its own per address space, so that a buffer pointer
//   that lost its qualifier, or a `device` pointer passed where a `constant` or a plain
//   (`thread`) one is declared, fails to compile as it does with Apple's compiler; a `constant`
//   pointer only reads. The pointers carry the bounds of the buffer they come from and check
//   every read and write against them: an access outside is recorded (the dispatch reports it)
//   and goes to a scratch value instead. The address of an element (`&out[i]`) is a plain
//   pointer here: `device T* p = &out[i]` does not compile (write `out + i`), and accesses
//   through such an address are not checked (device.py's guard bytes still catch writes past a
//   buffer). `device` anywhere else than `device T*` does not compile. `thread` and
//   program-scope `constant` variables are plain memory. A `threadgroup` variable becomes
//   `static thread_local`: all the lanes of a threadgroup run as fibers on one OS thread, so
//   they share it, exactly like threadgroup memory is shared by a threadgroup. (So threadgroup
//   variables may only be declared in a kernel's body, as MSL requires.) Unlike the GPU's, this
//   memory is not garbage when a threadgroup starts: it holds what the previous threadgroup
//   left, so a kernel must be checked to write it before it reads it.
// * fastMath: only `precise::divide` is provided; compiler.py rejects a float `/` written in the
//   shader (see there), since Apple compiles with fastMath, under which `/` is approximate.
// * Attributes: `[[buffer(i)]]`, `[[thread_position_in_grid]]`, ... are left to g++, which
//   ignores them (-Wno-attributes); the generated driver (compiler.py) reads them from the
//   source and passes buffer i and each thread's ids in their place.
// * Built-ins: threadgroup_barrier, the simd_* SIMD-group functions, the math functions used.
//
// Execution (msl_emu::dispatch): threadgroups run one after another; inside one, every
// thread is a fiber (ucontext) with its own stack, and a scheduler runs each fiber until it
// waits at a barrier, a SIMD-group function, or returns. A threadgroup_barrier lets the
// fibers go on once every thread of the threadgroup waits at it; a SIMD-group function once
// every thread of that SIMD group (32 lanes) that has not returned waits at it, and then each
// lane sees all the lanes' values. So barriers and SIMD reductions behave as on the GPU, and
// the emulator reports, instead of hanging, what would be undefined or a hang there: a
// barrier some threads of the threadgroup returned before, or threads of one SIMD group or
// threadgroup waiting at different barriers. The order fibers run in between two barriers can
// be forward or reverse lane order, so a data race between two barriers shows up as a
// difference between the two orders.
#pragma once

#include <ucontext.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace metal {

typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;

// ---- 4-wide vectors ---------------------------------------------------------------------

template <class T>
struct vec4 {
    T x, y, z, w;

    vec4() = default;
    explicit constexpr vec4(T splat) : x(splat), y(splat), z(splat), w(splat) {}
    constexpr vec4(T x_, T y_, T z_, T w_) : x(x_), y(y_), z(z_), w(w_) {}
    template <class U>  // MSL's explicit conversion between vector types: element by element
    explicit constexpr vec4(const vec4<U>& v) : x(T(v.x)), y(T(v.y)), z(T(v.z)), w(T(v.w)) {}
};

template <class T, class F>
constexpr vec4<T> elementwise(const vec4<T>& a, const vec4<T>& b, F f)
{
    return vec4<T>(T(f(a.x, b.x)), T(f(a.y, b.y)), T(f(a.z, b.z)), T(f(a.w, b.w)));
}

#define MSL_EMU_VECTOR_OPERATOR(op)                                                              \
    template <class T>                                                                           \
    constexpr vec4<T> operator op(const vec4<T>& a, const vec4<T>& b)                            \
    {                                                                                            \
        return elementwise(a, b, [](T u, T v) { return u op v; });                              \
    }                                                                                            \
    template <class T, class S, class = std::enable_if_t<std::is_arithmetic_v<S>>>               \
    constexpr vec4<T> operator op(const vec4<T>& a, S s)                                         \
    {                                                                                            \
        return a op vec4<T>(T(s));                                                               \
    }                                                                                            \
    template <class T, class S, class = std::enable_if_t<std::is_arithmetic_v<S>>>               \
    constexpr vec4<T> operator op(S s, const vec4<T>& a)                                         \
    {                                                                                            \
        return vec4<T>(T(s)) op a;                                                               \
    }

MSL_EMU_VECTOR_OPERATOR(+)
MSL_EMU_VECTOR_OPERATOR(-)
MSL_EMU_VECTOR_OPERATOR(*)
#undef MSL_EMU_VECTOR_OPERATOR

typedef vec4<char> char4;
typedef vec4<uchar> uchar4;
typedef vec4<short> short4;
typedef vec4<ushort> ushort4;
typedef vec4<int> int4;
typedef vec4<uint> uint4;
typedef vec4<float> float4;

static_assert(sizeof(char4) == 4 && sizeof(int4) == 16, "vectors must be packed like MSL's");

// ---- reinterpretation and math ----------------------------------------------------------

template <class To, class From>
inline To as_type(const From& value)
{
    static_assert(sizeof(To) == sizeof(From), "as_type needs types of the same size");
    To result;
    std::memcpy(&result, &value, sizeof(To));
    return result;
}

template <class T>
inline T max(T a, T b) { return a < b ? b : a; }
template <class T>
inline T min(T a, T b) { return b < a ? b : a; }
template <class T>
inline T clamp(T v, T lo, T hi) { return min(max(v, lo), hi); }
inline float rint(float v) { return __builtin_rintf(v); }  // the current rounding mode: half to even

namespace precise {
inline float divide(float a, float b) { return a / b; }  // IEEE division, correctly rounded
}  // namespace precise

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

void threadgroup_barrier(mem_flags flags);

}  // namespace metal

// ---- address spaces ----------------------------------------------------------------------

namespace msl_emu {

enum class space { device_memory, constant_memory };

// Records an access to element `index` of buffer `buffer`, which holds `count` elements of
// `element_bytes` bytes, as the dispatch's error (defined with the scheduler below).
void out_of_bounds(std::size_t buffer, std::ptrdiff_t index, std::size_t count, std::size_t element_bytes);

// `device T*` or `constant T*`: a pointer into one bound buffer that checks every access.
// There is no conversion to or from a plain pointer or a pointer of the other address space,
// so a qualifier missing or wrong anywhere a pointer goes is a compile error.
template <space S, class T>
class pointer {
public:
    using reference = std::conditional_t<S == space::constant_memory, const T&, T&>;  // constant memory is read-only

    pointer(T* base, std::size_t count, std::size_t buffer, std::ptrdiff_t index = 0)
        : base_(base), count_(count), buffer_(buffer), index_(index) {}

    template <class U, class = std::enable_if_t<std::is_same_v<const U, T>>>
    pointer(const pointer<S, U>& other)  // adding const, as T* converts to const T*
        : base_(other.base_), count_(other.count_), buffer_(other.buffer_), index_(other.index_) {}

    reference operator[](std::ptrdiff_t i) const { return at(index_ + i); }
    reference operator*() const { return at(index_); }
    pointer operator+(std::ptrdiff_t n) const { return pointer(base_, count_, buffer_, index_ + n); }
    pointer operator-(std::ptrdiff_t n) const { return pointer(base_, count_, buffer_, index_ - n); }
    pointer& operator+=(std::ptrdiff_t n) { index_ += n; return *this; }

private:
    template <space, class>
    friend class pointer;

    reference at(std::ptrdiff_t i) const
    {
        if (i >= 0 && std::size_t(i) < count_) {
            return base_[i];
        }
        out_of_bounds(buffer_, i, count_, sizeof(T));
        // The kernel goes on (unwinding a fiber is not an option) on a zeroed stand-in.
        alignas(T) static thread_local unsigned char scratch[sizeof(T)];
        std::memset(scratch, 0, sizeof(T));
        return *reinterpret_cast<T*>(scratch);
    }

    T* base_;
    std::size_t count_;
    std::size_t buffer_;
    std::ptrdiff_t index_;
};

template <space S, class T>
pointer<S, T> operator+(std::ptrdiff_t n, const pointer<S, T>& p) { return p + n; }

// What compiler.py writes for `device T*` and `constant T*` (names the keyword macros leave alone).
template <class T>
using device_pointer = pointer<space::device_memory, T>;
template <class T>
using constant_pointer = pointer<space::constant_memory, T>;

// Buffer `index` of a dispatch, as the driver passes it to a kernel parameter: it becomes the
// `device` or `constant` pointer the parameter declares, and nothing else.
struct buffer_binding {
    void* data;
    std::size_t bytes;
    std::size_t index;

    template <space S, class T>
    operator pointer<S, T>() const
    {
        using element = std::remove_const_t<T>;
        return pointer<S, T>(static_cast<element*>(data), bytes / sizeof(T), index);
    }
};

}  // namespace msl_emu

// ---- the fiber scheduler -----------------------------------------------------------------

namespace msl_emu {

using metal::uint;

constexpr uint SIMD_WIDTH = 32;
constexpr uint MAX_THREADGROUP_WIDTH = 1024;
constexpr std::size_t FIBER_STACK_BYTES = 128 * 1024;

// Everything a kernel can ask about its position with an attribute, for one thread.
struct ThreadIds {
    uint thread_position_in_grid;
    uint threads_per_grid;
    uint threadgroup_position_in_grid;
    uint threadgroups_per_grid;
    uint thread_position_in_threadgroup;
    uint thread_index_in_threadgroup;
    uint threads_per_threadgroup;
    uint thread_index_in_simdgroup;
    uint threads_per_simdgroup;
    uint simdgroup_index_in_threadgroup;
    uint simdgroups_per_threadgroup;
};

enum class LaneState { runnable, at_barrier, at_simd_function, returned };

struct Lane {
    ucontext_t context;
    LaneState state;
    ThreadIds ids;
    std::uint64_t simd_value;  // what this lane contributes to the SIMD-group function it waits at
};

// The values of one SIMD group's lanes at the SIMD-group function they last met at.
struct SimdExchange {
    std::uint64_t values[SIMD_WIDTH];
    bool active[SIMD_WIDTH];
};

using KernelCall = std::function<void(const ThreadIds&)>;

class Threadgroup {
public:
    Threadgroup(const KernelCall& kernel, uint width, bool reverse_order)
        : kernel_(kernel), width_(width), reverse_(reverse_order), lanes_(width), exchanges_(width / SIMD_WIDTH)
    {
        static thread_local std::vector<std::unique_ptr<char[]>> stacks;
        while (stacks.size() < width) {
            stacks.emplace_back(new char[FIBER_STACK_BYTES]);
        }
        stacks_ = stacks.data();
    }

    // Runs threadgroup `group` of a grid of `groups`; returns an empty string or what went wrong.
    std::string run(uint group, uint groups)
    {
        for (uint i = 0; i < width_; ++i) {
            start_lane(i, group, groups);
        }
        for (;;) {
            for (uint step = 0; step < width_; ++step) {
                const uint i = reverse_ ? width_ - 1 - step : step;
                if (lanes_[i].state == LaneState::runnable) {
                    running_ = i;
                    swapcontext(&scheduler_, &lanes_[i].context);
                }
            }
            if (release_simd_groups()) {
                continue;
            }
            const uint alive = count(LaneState::at_barrier) + count(LaneState::at_simd_function);
            if (alive == 0) {
                return fault_;
            }
            if (count(LaneState::at_barrier) == alive) {
                if (alive < width_) {
                    return "threadgroup_barrier reached by " + std::to_string(alive) + " of the " +
                           std::to_string(width_) + " threads of threadgroup " + std::to_string(group) +
                           "; the others returned before it (undefined on the GPU)";
                }
                for (Lane& lane : lanes_) {
                    lane.state = LaneState::runnable;
                }
                continue;
            }
            return "threads of threadgroup " + std::to_string(group) +
                   " wait at different barriers or SIMD-group functions and can never all meet (a hang on the GPU)";
        }
    }

    // Called from inside a fiber: park the running lane in `state` until the scheduler releases it.
    void wait(LaneState state)
    {
        Lane& lane = lanes_[running_];
        lane.state = state;
        swapcontext(&lane.context, &scheduler_);
    }

    Lane& running_lane() { return lanes_[running_]; }
    const SimdExchange& exchange_of_running_lane() const { return exchanges_[running_ / SIMD_WIDTH]; }

    // Called from inside a fiber: record `what` the running lane did wrong (the first thing only).
    void fault(const std::string& what)
    {
        if (fault_.empty()) {
            fault_ = "thread " + std::to_string(running_lane().ids.thread_position_in_grid) + " " + what;
        }
    }

    static Threadgroup*& current()
    {
        static thread_local Threadgroup* threadgroup = nullptr;
        return threadgroup;
    }

private:
    void start_lane(uint i, uint group, uint groups)
    {
        Lane& lane = lanes_[i];
        lane.state = LaneState::runnable;
        lane.ids = ThreadIds{
            group * width_ + i, groups * width_, group, groups, i, i, width_,
            i % SIMD_WIDTH, SIMD_WIDTH, i / SIMD_WIDTH, width_ / SIMD_WIDTH,
        };
        getcontext(&lane.context);
        lane.context.uc_stack.ss_sp = stacks_[i].get();
        lane.context.uc_stack.ss_size = FIBER_STACK_BYTES;
        lane.context.uc_link = &scheduler_;
        makecontext(&lane.context, &Threadgroup::lane_main, 0);
    }

    static void lane_main()
    {
        Threadgroup& self = *current();
        Lane& lane = self.lanes_[self.running_];
        self.kernel_(lane.ids);
        lane.state = LaneState::returned;
    }  // uc_link resumes the scheduler

    // Lets every SIMD group whose live lanes all wait at a SIMD-group function go on.
    bool release_simd_groups()
    {
        bool released = false;
        for (uint g = 0; g < exchanges_.size(); ++g) {
            uint waiting = 0;
            uint alive = 0;
            for (uint l = 0; l < SIMD_WIDTH; ++l) {
                const Lane& lane = lanes_[g * SIMD_WIDTH + l];
                alive += lane.state != LaneState::returned;
                waiting += lane.state == LaneState::at_simd_function;
            }
            if (waiting == 0 || waiting != alive) {
                continue;
            }
            for (uint l = 0; l < SIMD_WIDTH; ++l) {
                Lane& lane = lanes_[g * SIMD_WIDTH + l];
                exchanges_[g].active[l] = lane.state == LaneState::at_simd_function;
                exchanges_[g].values[l] = lane.simd_value;
                if (lane.state == LaneState::at_simd_function) {
                    lane.state = LaneState::runnable;
                }
            }
            released = true;
        }
        return released;
    }

    uint count(LaneState state) const
    {
        uint n = 0;
        for (const Lane& lane : lanes_) {
            n += lane.state == state;
        }
        return n;
    }

    const KernelCall& kernel_;
    uint width_;
    bool reverse_;
    std::vector<Lane> lanes_;
    std::vector<SimdExchange> exchanges_;
    std::unique_ptr<char[]>* stacks_;
    ucontext_t scheduler_;
    uint running_ = 0;
    std::string fault_;
};

inline void out_of_bounds(std::size_t buffer, std::ptrdiff_t index, std::size_t count, std::size_t element_bytes)
{
    Threadgroup::current()->fault("accessed element " + std::to_string(index) + " of buffer " +
                                  std::to_string(buffer) + ", which holds " + std::to_string(count) +
                                  " elements of " + std::to_string(element_bytes) + " bytes");
}

// Runs `kernel` over a 1-D grid as metalcompute does: ceil(count / width) threadgroups of
// `width` threads each, the threads past `count` included. Returns "" or the first error.
inline std::string dispatch(const KernelCall& kernel, std::uint64_t count, uint width, bool reverse_order)
{
    if (width == 0 || width % SIMD_WIDTH != 0 || width > MAX_THREADGROUP_WIDTH) {
        return "threadgroup width " + std::to_string(width) + " is not a multiple of 32 between 32 and 1024";
    }
    const std::uint64_t groups = (count + width - 1) / width;
    if (groups * width > UINT32_MAX) {
        return "grid of " + std::to_string(count) + " threads is larger than a uint can index";
    }
    Threadgroup threadgroup(kernel, width, reverse_order);
    Threadgroup* const outer = Threadgroup::current();
    Threadgroup::current() = &threadgroup;
    std::string error;
    for (uint g = 0; g < groups && error.empty(); ++g) {
        error = threadgroup.run(g, uint(groups));
    }
    Threadgroup::current() = outer;
    return error;
}

// One lane's side of a SIMD-group function: publish `value`, wait for the SIMD group.
template <class T>
inline const SimdExchange& exchange(T value)
{
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(std::uint64_t),
                  "the emulated SIMD-group functions take scalars");
    Threadgroup& threadgroup = *Threadgroup::current();
    threadgroup.running_lane().simd_value = 0;
    std::memcpy(&threadgroup.running_lane().simd_value, &value, sizeof(T));
    threadgroup.wait(LaneState::at_simd_function);
    return threadgroup.exchange_of_running_lane();
}

template <class T>
inline T value_of(const SimdExchange& exchange, uint lane)
{
    T value;
    std::memcpy(&value, &exchange.values[lane], sizeof(T));
    return value;
}

template <class T, class Combine>
inline T reduce(T value, Combine combine)
{
    const SimdExchange& exchange = msl_emu::exchange(value);
    bool first = true;
    T result{};
    for (uint l = 0; l < SIMD_WIDTH; ++l) {
        if (exchange.active[l]) {
            result = first ? value_of<T>(exchange, l) : combine(result, value_of<T>(exchange, l));
            first = false;
        }
    }
    return result;
}

// The value of lane `source` (the caller's own value if that lane is not active).
template <class T>
inline T read_lane(T value, uint source)
{
    const SimdExchange& exchange = msl_emu::exchange(value);
    return source < SIMD_WIDTH && exchange.active[source] ? value_of<T>(exchange, source) : value;
}

inline uint running_simd_lane() { return Threadgroup::current()->running_lane().ids.thread_index_in_simdgroup; }

}  // namespace msl_emu

namespace metal {

inline void threadgroup_barrier(mem_flags)
{
    msl_emu::Threadgroup::current()->wait(msl_emu::LaneState::at_barrier);
}

template <class T>
inline T simd_sum(T v) { return msl_emu::reduce(v, [](T a, T b) { return T(a + b); }); }
template <class T>
inline T simd_max(T v) { return msl_emu::reduce(v, [](T a, T b) { return max(a, b); }); }
template <class T>
inline T simd_min(T v) { return msl_emu::reduce(v, [](T a, T b) { return min(a, b); }); }
template <class T>
inline T simd_shuffle(T v, ushort lane) { return msl_emu::read_lane(v, lane); }
template <class T>
inline T simd_broadcast(T v, ushort lane) { return msl_emu::read_lane(v, lane); }
template <class T>
inline T simd_shuffle_xor(T v, ushort mask) { return msl_emu::read_lane(v, msl_emu::running_simd_lane() ^ mask); }
template <class T>
inline T simd_shuffle_down(T v, ushort delta)
{
    // Lanes whose source would be past the last lane keep their own value, as in MSL.
    return msl_emu::read_lane(v, msl_emu::running_simd_lane() + delta);
}
template <class T>
inline T simd_shuffle_up(T v, ushort delta)
{
    const uint lane = msl_emu::running_simd_lane();
    return msl_emu::read_lane(v, lane >= delta ? lane - delta : msl_emu::SIMD_WIDTH);
}

}  // namespace metal

// ---- the MSL keywords --------------------------------------------------------------------

// `device` is left to compiler.py's rewriting of `device T*`; anywhere else it must not compile.
#define kernel
#define device msl_emu_supports_device_only_in_pointer_declarations
#define constant
#define thread
#define threadgroup static thread_local
