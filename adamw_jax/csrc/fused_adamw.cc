// One-pass AdamW step over every leaf of a parameter tree, as an XLA FFI custom call.
//
// Per element it reads p, g, m, v (and v_max with AMSGrad) once and writes p, m, v (and
// v_max) once: the 28 bytes per float32 parameter that bound an AdamW step from below.
// The outputs are aliased to the inputs by the caller (adamw_jax/fused.py), so with
// donated buffers the step runs in place. Work is split into chunks over the concatenated
// leaves and shared between the calling thread and XLA's intra-op thread pool.
//
// A second target, a bandwidth probe with the same memory traffic, measures what the
// machine can move in the same pattern, the bound the step is compared with. The library
// does not use it: the benchmark (benchmarks/step_time_contenders.py) registers it.
//
// The arithmetic follows adamw_jax.adamw's XLA path operation by operation (same order,
// same float32 roundings), so both paths give the same numbers up to a few ulps.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Layout of the float32 `hyper` buffer, computed by the caller for the current step: the
// fields of _KernelHyper in adamw_jax/fused.py, stacked in this order. Change both together.
enum Hyper : int {
  kB1 = 0,         // beta1
  kOneMinusB1,     // 1 - beta1
  kB2,             // beta2
  kOneMinusB2,     // 1 - beta2
  kInvC1,          // 1 / (1 - beta1^t)
  kInvC2,          // 1 / (1 - beta2^t)
  kEps,            // eps
  kEpsRoot,        // eps_root
  kLr,             // lr_t
  kWd,             // decay factor (weight_decay, or weight_decay / peak lr)
  kNesterovM,      // beta1 / (1 - beta1^(t+1))
  kNesterovG,      // (1 - beta1) / (1 - beta1^t)
  kRoundingSalt,   // the step count t as uint32 bits (not a float value): stochastic rounding's salt
  kNumHyper,
};

// How the decay enters the step on a decayed leaf (the `coupling` attribute; fused.py's
// _KERNEL_COUPLING maps the Python couplings to it).
enum Decay : int { kNoDecay = 0, kLrCoupled = 1, kIndependent = 2 };

inline float Bf16ToF32(uint16_t x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to nearest even, as XLA converts float32 to bfloat16; NaN stays a quiet NaN.
inline uint16_t F32ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (bits >> 16) | 0x40u;
  return static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// Stochastic rounding of a second moment (>= 0) to bfloat16, as the XLA path does
// (adamw_jax/_numerics.py, round_to_bfloat16_stochastically): 16 bits of a multiplicative hash of
// the value's bits, salted with the step count (`salt_mix` = t * 0x85EBCA6B), are added below
// the kept bits; NaN stays a quiet NaN.
inline uint16_t F32ToBf16Stochastic(float f, uint32_t salt_mix) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint32_t noise = ((bits ^ salt_mix) * 0x9E3779B1u) >> 16;
  const uint32_t rounded = (bits + noise) >> 16;
  const uint32_t quiet_nan = (bits >> 16) | 0x40u;
  return static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

inline float Load(const float* x, int64_t i) { return x[i]; }
inline float Load(const uint16_t* x, int64_t i) { return Bf16ToF32(x[i]); }
inline void Store(float* x, int64_t i, float value) { x[i] = value; }
inline void Store(uint16_t* x, int64_t i, float value) { x[i] = F32ToBf16(value); }
inline void StoreSecond(float* x, int64_t i, float value, uint32_t) { x[i] = value; }
inline void StoreSecond(uint16_t* x, int64_t i, float value, uint32_t salt_mix) {
  x[i] = F32ToBf16Stochastic(value, salt_mix);
}

// jnp.maximum: NaN if either operand is NaN.
inline float MaxNan(float a, float b) {
  const float larger = a > b ? a : b;
  return a != a ? a : (b != b ? b : larger);
}

// One leaf, updated in place: the outputs are aliased to the inputs (see Bind below).
struct Leaf {
  int64_t size = 0;
  int64_t offset = 0;  // of its first element in the concatenation of all leaves
  const float* g = nullptr;
  float* p = nullptr;
  void* m = nullptr;
  void* v = nullptr;
  void* v_max = nullptr;
  void (*run)(const Leaf&, const float*, int64_t, int64_t) = nullptr;  // its loop
};

// a * b + c, fused into one rounding when kFma (as LLVM contracts XLA's code on CPUs with
// FMA), else rounded twice.
template <bool kFma>
inline float Mad(float a, float b, float c) {
  if constexpr (kFma) {
    return __builtin_fmaf(a, b, c);
  } else {
    return a * b + c;
  }
}

template <typename MT, typename VT, bool kAmsgrad, bool kNesterov, int kDecay, bool kFma>
inline __attribute__((always_inline)) void LeafBody(const Leaf& leaf, const float* h,
                                                    int64_t lo, int64_t hi) {
  const float b1 = h[kB1], one_minus_b1 = h[kOneMinusB1];
  const float b2 = h[kB2], one_minus_b2 = h[kOneMinusB2];
  const float inv_c1 = h[kInvC1], inv_c2 = h[kInvC2], eps = h[kEps], eps_root = h[kEpsRoot];
  const float lr = h[kLr], wd = h[kWd];
  const float nesterov_m = h[kNesterovM], nesterov_g = h[kNesterovG];
  uint32_t salt;
  std::memcpy(&salt, &h[kRoundingSalt], sizeof(salt));
  const uint32_t salt_mix = salt * 0x85EBCA6Bu;
  // Distinct arrays (a leaf's outputs are its inputs), so the loop vectorizes.
  const float* __restrict g_in = leaf.g;
  float* __restrict p_io = leaf.p;
  MT* __restrict m_io = static_cast<MT*>(leaf.m);
  VT* __restrict v_io = static_cast<VT*>(leaf.v);
  VT* __restrict v_max_io = static_cast<VT*>(leaf.v_max);
  for (int64_t i = lo; i < hi; ++i) {
    const float g = g_in[i];
    // Which product LLVM fuses into XLA's b*x + (1-b)*y depends on whether x is a
    // converted bfloat16: follow it.
    const float m = std::is_same_v<MT, float>
                        ? Mad<kFma>(b1, Load(m_io, i), one_minus_b1 * g)
                        : Mad<kFma>(one_minus_b1, g, b1 * Load(m_io, i));
    const float v = std::is_same_v<VT, float>
                        ? Mad<kFma>(b2, Load(v_io, i), one_minus_b2 * (g * g))
                        : Mad<kFma>(one_minus_b2, g * g, b2 * Load(v_io, i));
    float v_hat = v * inv_c2;  // XLA divides by a scalar this way too
    if constexpr (kAmsgrad) {
      v_hat = MaxNan(Load(v_max_io, i), v_hat);
      Store(v_max_io, i, v_hat);  // a running maximum: rounded to nearest
    }
    float m_hat;
    if constexpr (kNesterov) {
      m_hat = Mad<kFma>(nesterov_m, m, nesterov_g * g);
    } else {
      m_hat = m * inv_c1;
    }
    // A zero denominator (eps = 0, no gradient yet) gives a zero direction, not 0/0.
    const float denom = std::sqrt(v_hat + eps_root) + eps;
    const float quotient = m_hat / denom;
    const float u = denom == 0.0f ? 0.0f : quotient;
    const float p = p_io[i];
    if constexpr (kDecay == kNoDecay) {
      p_io[i] = Mad<kFma>(-lr, u, p);
    } else if constexpr (kDecay == kLrCoupled) {
      p_io[i] = Mad<kFma>(-lr, Mad<kFma>(wd, p, u), p);
    } else {
      p_io[i] = p - Mad<kFma>(wd, p, lr * u);
    }
    Store(m_io, i, m);
    StoreSecond(v_io, i, v, salt_mix);
  }
}

template <typename MT, typename VT, bool kAmsgrad, bool kNesterov, int kDecay>
void RunLeafPlain(const Leaf& leaf, const float* h, int64_t lo, int64_t hi) {
  LeafBody<MT, VT, kAmsgrad, kNesterov, kDecay, false>(leaf, h, lo, hi);
}

#if defined(__x86_64__)
// Compiled for AVX2 + FMA and chosen at run time only on CPUs that have them, so the
// distributed binary stays portable.
#define ADAMW_JAX_FMA_TARGET __attribute__((target("avx2,fma")))
inline bool HostHasFma() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
#define ADAMW_JAX_FMA_TARGET
inline bool HostHasFma() { return true; }
#endif

template <typename MT, typename VT, bool kAmsgrad, bool kNesterov, int kDecay>
ADAMW_JAX_FMA_TARGET void RunLeafFma(const Leaf& leaf, const float* h, int64_t lo, int64_t hi) {
  LeafBody<MT, VT, kAmsgrad, kNesterov, kDecay, true>(leaf, h, lo, hi);
}

using LeafFn = void (*)(const Leaf&, const float*, int64_t, int64_t);

template <typename MT, typename VT, bool kAmsgrad, bool kNesterov, int kDecay>
LeafFn PickFma(bool fma) {
  return fma ? &RunLeafFma<MT, VT, kAmsgrad, kNesterov, kDecay>
             : &RunLeafPlain<MT, VT, kAmsgrad, kNesterov, kDecay>;
}

template <typename MT, typename VT, bool kAmsgrad, bool kNesterov>
LeafFn PickDecay(int decay, bool fma) {
  if (decay == kLrCoupled) return PickFma<MT, VT, kAmsgrad, kNesterov, kLrCoupled>(fma);
  if (decay == kIndependent) return PickFma<MT, VT, kAmsgrad, kNesterov, kIndependent>(fma);
  return PickFma<MT, VT, kAmsgrad, kNesterov, kNoDecay>(fma);
}

template <typename MT, typename VT>
LeafFn PickFlags(bool amsgrad, bool nesterov, int decay, bool fma) {
  if (amsgrad) {
    return nesterov ? PickDecay<MT, VT, true, true>(decay, fma)
                    : PickDecay<MT, VT, true, false>(decay, fma);
  }
  return nesterov ? PickDecay<MT, VT, false, true>(decay, fma)
                  : PickDecay<MT, VT, false, false>(decay, fma);
}

LeafFn PickKernel(bool m_bf16, bool v_bf16, bool amsgrad, bool nesterov, int decay) {
  static const bool fma = HostHasFma();
  if (m_bf16) {
    return v_bf16 ? PickFlags<uint16_t, uint16_t>(amsgrad, nesterov, decay, fma)
                  : PickFlags<uint16_t, float>(amsgrad, nesterov, decay, fma);
  }
  return v_bf16 ? PickFlags<float, uint16_t>(amsgrad, nesterov, decay, fma)
                : PickFlags<float, float>(amsgrad, nesterov, decay, fma);
}

// The work of one call: leaves, split into chunks of the concatenated element range.
struct Work {
  std::vector<Leaf> leaves;
  float hyper[kNumHyper];
  int64_t total = 0;
  int64_t chunk = 0;
  int64_t num_chunks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mutex;
  std::condition_variable finished;

  void RunChunk(int64_t k) {
    const int64_t lo = k * chunk, hi = std::min(total, lo + chunk);
    // The last leaf starting at or before lo.
    auto it = std::upper_bound(leaves.begin(), leaves.end(), lo,
                               [](int64_t x, const Leaf& l) { return x < l.offset; });
    for (--it; it != leaves.end() && it->offset < hi; ++it) {
      const int64_t a = std::max(lo, it->offset) - it->offset;
      const int64_t b = std::min(hi, it->offset + it->size) - it->offset;
      if (b > a) it->run(*it, hyper, a, b);
    }
  }

  // Claims chunks until none is left; returns once they are all done if `wait`.
  void Drain(bool wait) {
    for (int64_t k = next.fetch_add(1); k < num_chunks; k = next.fetch_add(1)) {
      RunChunk(k);
      if (done.fetch_add(1) + 1 == num_chunks) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
    if (wait) {
      std::unique_lock<std::mutex> lock(mutex);
      finished.wait(lock, [this] { return done.load() == num_chunks; });
    }
  }
};

constexpr int64_t kChunk = int64_t{1} << 15;   // elements per unit of work
constexpr int64_t kSerialBelow = int64_t{1} << 16;  // smaller trees run on one thread

// The output buffer, holding the input's values: XLA normally hands the same buffer (the
// outputs are aliased to the inputs); otherwise the input is copied over first.
void* InPlace(const ffi::AnyBuffer& in, ffi::AnyBuffer& out) {
  if (out.untyped_data() != in.untyped_data()) {
    std::memcpy(out.untyped_data(), in.untyped_data(), in.size_bytes());
  }
  return out.untyped_data();
}

// Runs every chunk of `work`, on this thread and on up to all of XLA's intra-op threads.
void RunAll(ffi::ThreadPool& pool, const std::shared_ptr<Work>& work) {
  if (work->leaves.empty()) return;
  work->chunk = kChunk;
  work->num_chunks = (work->total + kChunk - 1) / kChunk;
  const int64_t threads = pool.num_threads();
  if (work->total < kSerialBelow || threads <= 1) {
    for (int64_t k = 0; k < work->num_chunks; ++k) work->RunChunk(k);
    return;
  }
  // A helper that starts after the work is gone finds no chunk and returns; it holds its
  // own reference to `work`, so nothing it touches is freed under it.
  const int64_t helpers = std::min(threads, work->num_chunks) - 1;
  for (int64_t k = 0; k < helpers; ++k) {
    pool.Schedule([work] { work->Drain(/*wait=*/false); });
  }
  work->Drain(/*wait=*/true);
}

ffi::Error FusedAdamwImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> hyper,
                          ffi::Buffer<ffi::U8> decays, ffi::RemainingArgs args,
                          ffi::RemainingRets rets, int64_t amsgrad, int64_t nesterov,
                          int64_t coupling) {
  const size_t per_leaf_in = amsgrad ? 5 : 4, per_leaf_out = amsgrad ? 4 : 3;
  if (hyper.element_count() != kNumHyper) {
    return ffi::Error::InvalidArgument("fused_adamw: hyper must hold 13 float32 values");
  }
  if (args.size() % per_leaf_in != 0) {
    return ffi::Error::InvalidArgument("fused_adamw: wrong number of leaf inputs");
  }
  const size_t num_leaves = args.size() / per_leaf_in;
  if (rets.size() != num_leaves * per_leaf_out || decays.element_count() != num_leaves) {
    return ffi::Error::InvalidArgument("fused_adamw: inputs and outputs do not match");
  }
  auto work = std::make_shared<Work>();
  std::memcpy(work->hyper, hyper.typed_data(), sizeof(work->hyper));
  work->leaves.reserve(num_leaves);
  const uint8_t* decay_flags = decays.typed_data();
  for (size_t j = 0; j < num_leaves; ++j) {
    std::vector<ffi::AnyBuffer> in, out;
    for (size_t k = 0; k < per_leaf_in; ++k) {
      auto buf = args.get<ffi::AnyBuffer>(j * per_leaf_in + k);
      if (buf.has_error()) return buf.error();
      in.push_back(*buf);
    }
    for (size_t k = 0; k < per_leaf_out; ++k) {
      auto buf = rets.get<ffi::AnyBuffer>(j * per_leaf_out + k);
      if (buf.has_error()) return buf.error();
      out.push_back(**buf);
    }
    const int64_t n = static_cast<int64_t>(in[0].element_count());
    for (size_t k = 0; k < per_leaf_in; ++k) {
      if (static_cast<int64_t>(in[k].element_count()) != n) {
        return ffi::Error::InvalidArgument("fused_adamw: a leaf's buffers differ in size");
      }
    }
    auto is = [](const ffi::AnyBuffer& b, ffi::DataType t) { return b.element_type() == t; };
    auto is_moment = [&](const ffi::AnyBuffer& b) {
      return is(b, ffi::DataType::F32) || is(b, ffi::DataType::BF16);
    };
    if (!is(in[0], ffi::DataType::F32) || !is(in[1], ffi::DataType::F32) ||
        !is_moment(in[2]) || !is_moment(in[3]) ||
        (amsgrad && in[4].element_type() != in[3].element_type())) {
      return ffi::Error::InvalidArgument(
          "fused_adamw: params and grads must be float32, moments float32 or bfloat16");
    }
    Leaf leaf;
    leaf.size = n;
    leaf.offset = work->total;
    leaf.g = static_cast<const float*>(in[1].untyped_data());
    leaf.p = static_cast<float*>(InPlace(in[0], out[0]));
    leaf.m = InPlace(in[2], out[1]);
    leaf.v = InPlace(in[3], out[2]);
    if (amsgrad) leaf.v_max = InPlace(in[4], out[3]);
    const int decay = decay_flags[j] ? static_cast<int>(coupling) : kNoDecay;
    leaf.run = PickKernel(is(in[2], ffi::DataType::BF16), is(in[3], ffi::DataType::BF16),
                          amsgrad != 0, nesterov != 0, decay);
    work->total += n;
    if (n > 0) work->leaves.push_back(leaf);
  }
  RunAll(pool, work);
  return ffi::Error::Success();
}

// The bandwidth probe's loop: the same memory traffic as the step (read p, g, m, v; write
// p, m, v), with one addition per output instead of the optimizer's arithmetic.
inline __attribute__((always_inline)) void ProbeBody(const Leaf& leaf, int64_t lo, int64_t hi) {
  const float* __restrict g = leaf.g;
  float* __restrict p = leaf.p;
  float* __restrict m = static_cast<float*>(leaf.m);
  float* __restrict v = static_cast<float*>(leaf.v);
  for (int64_t i = lo; i < hi; ++i) {
    p[i] += g[i];
    m[i] += g[i];
    v[i] += g[i];
  }
}

void ProbeLeafPlain(const Leaf& leaf, const float*, int64_t lo, int64_t hi) {
  ProbeBody(leaf, lo, hi);
}

// The same instruction set as the step's loop, so that neither has an edge in issue width.
ADAMW_JAX_FMA_TARGET void ProbeLeafFma(const Leaf& leaf, const float*, int64_t lo, int64_t hi) {
  ProbeBody(leaf, lo, hi);
}

ffi::Error StreamProbeImpl(ffi::ThreadPool pool, ffi::RemainingArgs args,
                           ffi::RemainingRets rets) {
  if (args.size() % 4 != 0 || rets.size() != args.size() / 4 * 3) {
    return ffi::Error::InvalidArgument("stream_probe: takes (p, g, m, v) per leaf");
  }
  auto work = std::make_shared<Work>();
  for (size_t j = 0; j < args.size() / 4; ++j) {
    std::vector<ffi::AnyBuffer> in, out;
    for (size_t k = 0; k < 4; ++k) {
      auto buf = args.get<ffi::AnyBuffer>(j * 4 + k);
      if (buf.has_error()) return buf.error();
      in.push_back(*buf);
    }
    for (size_t k = 0; k < 3; ++k) {
      auto buf = rets.get<ffi::AnyBuffer>(j * 3 + k);
      if (buf.has_error()) return buf.error();
      out.push_back(**buf);
    }
    for (const auto& b : in) {
      if (b.element_type() != ffi::DataType::F32 || b.element_count() != in[0].element_count()) {
        return ffi::Error::InvalidArgument("stream_probe: float32 leaves of one size");
      }
    }
    Leaf leaf;
    leaf.size = static_cast<int64_t>(in[0].element_count());
    leaf.offset = work->total;
    leaf.g = static_cast<const float*>(in[1].untyped_data());
    leaf.p = static_cast<float*>(InPlace(in[0], out[0]));
    leaf.m = InPlace(in[2], out[1]);
    leaf.v = InPlace(in[3], out[2]);
    leaf.run = HostHasFma() ? &ProbeLeafFma : &ProbeLeafPlain;
    work->total += leaf.size;
    if (leaf.size > 0) work->leaves.push_back(leaf);
  }
  RunAll(pool, work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamwJaxFusedAdamw, FusedAdamwImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // hyper
                                  .Arg<ffi::Buffer<ffi::U8>>()   // per-leaf decay flags
                                  .RemainingArgs()               // p, g, m, v[, v_max] per leaf
                                  .RemainingRets()               // p, m, v[, v_max] per leaf
                                  .Attr<int64_t>("amsgrad")
                                  .Attr<int64_t>("nesterov")
                                  .Attr<int64_t>("coupling"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamwJaxStreamProbe, StreamProbeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()   // p, g, m, v per leaf
                                  .RemainingRets());  // p, m, v per leaf
