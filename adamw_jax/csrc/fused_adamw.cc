// One-pass AdamW step over every leaf of a parameter tree, as an XLA FFI custom call.
//
// Per element it reads p, g, m, v (and v_max with AMSGrad) once and writes p, m, v (and
// v_max) once: the 28 bytes per float32 parameter that bound an AdamW step from below.
// Moments stored as blockwise int8 or int4 codes with one float32 scale per block
// (adamw_jax/quantize.py) are decoded, updated and re-encoded in the same pass, block by
// block: 16 bytes per parameter with int8 codes, about 14 with int4, plus the scales.
// The outputs are aliased to the inputs by the caller (adamw_jax/fused.py), so with
// donated buffers the step runs in place. Work is split into chunks over the concatenated
// leaves and shared between the calling thread and XLA's intra-op thread pool.
//
// The arithmetic follows adamw_jax.adamw's XLA path operation by operation (same order,
// same float32 roundings, the same products fused where XLA's compiler fuses them), so the
// params agree up to a few ulps and the stored codes and scales bit for bit.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
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
  kC2,             // 1 - beta2^t (AMSGrad's maximum divides by it, as XLA's code does)
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

// How one moment of a leaf is stored: the `kinds` operand holds two per leaf (first moment,
// second moment; AMSGrad's running maximum is stored like the second). fused.py's
// _FLOAT32, _BFLOAT16, _INT8 and _INT4 are the same numbers. A leaf's moments are both
// floating (float32 or bfloat16), both int8 or both int4.
enum Kind : int { kFloat32 = 0, kBfloat16 = 1, kInt8 = 2, kInt4 = 3 };

inline bool IsQuantized(int kind) { return kind == kInt8 || kind == kInt4; }

// One leaf, updated in place: the outputs are aliased to the inputs (see Bind below).
struct Leaf {
  int64_t size = 0;
  int64_t offset = 0;  // of its first element in the concatenation of all leaves
  const float* g = nullptr;
  float* p = nullptr;
  void* m = nullptr;  // the values, or a quantized moment's codes
  void* v = nullptr;
  void* v_max = nullptr;
  // A quantized moment's float32 scales, one per block (null for a floating moment).
  float* m_scales = nullptr;
  float* v_scales = nullptr;
  float* v_max_scales = nullptr;
  int m_kind = kFloat32;
  int v_kind = kFloat32;
  int64_t row = 1;    // elements along the last axis: blocks never cross a row
  int64_t block = 1;  // elements per quantization block along it
  // With quantized moments: the params' update from g and the new float32 moments.
  void (*update)(const float* h, int64_t n, const float* g, float* p, const float* m,
                 const float* v_hat) = nullptr;
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
  const float c2 = h[kC2];
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
    if constexpr (kAmsgrad) {  // but here by 1 - b2^t itself
      v_hat = MaxNan(Load(v_max_io, i), v / c2);
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

// ---------------------------------------------------------------------------------------
// Leaves with quantized moments: blockwise codes, bit for bit as adamw_jax/quantize.py
// encodes them (its module docstring spells the encoding out).
//
// A leaf is cut into blocks of `block` consecutive elements along its last axis (the last
// block of a row may be shorter), each with one float32 scale per quantized moment. A block
// is visited once (QuantizedStep): a pass over its gradient and old codes gives its new
// scales; then a loop per moment decodes, updates and re-encodes it and an update loop
// writes the params from the new float32 moments, all in L1 cache. The second moment (and
// the 4-bit first moment) is rounded stochastically with the hash of adamw_jax/_numerics.py,
// salted with the step count.

#define ADAMW_JAX_INLINE inline __attribute__((always_inline))

inline uint32_t BitsOf(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

inline float FloatOf(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// The multiplier of the hash whose top bits drive stochastic rounding
// (adamw_jax._numerics.HASH_MULTIPLIER), and the one that spreads the salt (SALT_MULTIPLIER).
constexpr uint32_t kHashMultiplier = 0x9E3779B1u;
constexpr uint32_t kSaltMultiplier = 0x85EBCA6Bu;

// A code book as a small floating-point format (quantize.CodeFormat): kE exponent and kM
// mantissa bits, exponent bias 2**kE - 1 (top binade [1, 2)); with kSubnormals, exponent
// field 0 holds the subnormals and an exact 0. Codes are magnitudes 0 <= k <= kMaxCode.
template <int kE, int kM, bool kSubnormals>
struct Book {
  static constexpr int kBias = (1 << kE) - 1;
  static constexpr int32_t kMaxCode = (1 << (kE + kM)) - 1;
  static constexpr int kShift = 23 - kM;  // float32 mantissa bits below a code's
  static constexpr uint32_t kRebase = static_cast<uint32_t>(127 - kBias) << 23;
  static constexpr float kTop = 2.0f - 1.0f / (1 << kM);  // the largest value
  // XLA turns the division by kTop into a product with its rounded reciprocal.
  static constexpr float kInverseTop = 1.0f / kTop;
  static constexpr float kSmallestNormal = 1.0f / (1 << (kBias - 1));  // 2**(1 - bias)
  static constexpr float kSmallest = 1.0f / (1 << kBias);              // 2**-bias
  static constexpr float kSubnormalScale =
      static_cast<float>(uint64_t{1} << (kBias - 1 + kM + kShift));

  // The value of code k >= 0 (clamped to the largest code): quantize.decode_magnitudes.
  static inline float Value(int32_t k) {
    k = k < kMaxCode ? k : kMaxCode;
    const float x = FloatOf((static_cast<uint32_t>(k) << kShift) + kRebase);
    if constexpr (kSubnormals) {
      return k < (1 << kM) ? 2.0f * x - kSmallestNormal : x;  // exact
    } else {
      return x;
    }
  }

  // y >= 0 as a fixed-point number: its code above the lowest kShift bits, its fraction of
  // the way to the next code in them (quantize.encode_magnitudes).
  static inline uint32_t Fixed(float y) {
    const uint32_t normal = BitsOf(y) - kRebase;
    if constexpr (kSubnormals) {
      // The product is exact (a power of two), so the sum rounds once, fused or not.
      const uint32_t subnormal = BitsOf(y * kSubnormalScale + 8388608.0f) - (150u << 23);
      return y < kSmallestNormal ? subnormal : normal;
    } else {
      return y < kSmallest ? 0u : normal;
    }
  }

  // The nearest code (ties up).
  static inline int32_t Nearest(float y) {
    const int32_t code =
        static_cast<int32_t>(Fixed(y) + (1u << (kShift - 1))) >> kShift;
    return code < kMaxCode ? code : kMaxCode;
  }

  // One of the two codes around y, the upper with probability equal to y's fraction of the
  // way to it; the random bits are the top bits of a hash of y's bits and the salt.
  static inline int32_t Stochastic(float y, uint32_t salt_mix) {
    const uint32_t noise = ((BitsOf(y) ^ salt_mix) * kHashMultiplier) >> (32 - kShift);
    const int32_t code = static_cast<int32_t>((Fixed(y) + noise) >> kShift);
    return code < kMaxCode ? code : kMaxCode;
  }
};

// The value of a code (without the block's scale), and the code of a value times
// `inverse`, for each stored format: 8-bit codes, one per byte, and 4-bit codes, two per
// byte (element 2j of a row in the low nibble of byte j, a padding 0 past an odd row's end).

// The 8-bit code books (quantize.py): signed 1-3-4 for the first moment (codes -127..127,
// two's complement), unsigned 4-4 for the square root of the second (codes 0..255), both
// with subnormals. The first moment is rounded to nearest, the second stochastically and
// to at least code 1 where positive (quantize's keep_nonzero), so that 1/sqrt(v) stays finite.
struct Int8Codes {
  using FirstBook = Book<3, 4, true>;
  using SecondBook = Book<4, 4, true>;
  // Which product of each moment's average XLA's code fuses (see Average): the old moment's
  // in padded rows, the new term's in rows of whole blocks.
  template <bool kPadded>
  static constexpr bool kFuseStoredFirst = kPadded;
  template <bool kPadded>
  static constexpr bool kFuseStoredSecond = kPadded;
  template <bool kPadded>
  static constexpr bool kFuseStoredMax = kPadded;  // v again, for AMSGrad's maximum

  static ADAMW_JAX_INLINE float First(int32_t k) {
    const float magnitude = FirstBook::Value(k < 0 ? -k : k);
    return FloatOf(BitsOf(magnitude) | (static_cast<uint32_t>(k) & 0x80000000u));
  }

  static ADAMW_JAX_INLINE int32_t EncodeFirst(float m, float inverse, uint32_t) {
    const int32_t code = FirstBook::Nearest(std::fabs(m) * inverse);
    const int32_t sign = static_cast<int32_t>(BitsOf(m)) >> 31;
    return (code ^ sign) - sign;
  }

  static ADAMW_JAX_INLINE float Second(int32_t k) { return SecondBook::Value(k); }

  static ADAMW_JAX_INLINE int32_t EncodeSecond(float root, float inverse, uint32_t salt_mix) {
    const int32_t code = SecondBook::Stochastic(root * inverse, salt_mix);
    const int32_t bits = static_cast<int32_t>(BitsOf(root));
    const int32_t keep = bits < 1 ? bits : 1;
    return code > keep ? code : keep;
  }

  // The offset of element `col` of row `row` in a moment's codes (a row of `length`).
  static int64_t Offset(int64_t row, int64_t col, int64_t length) { return row * length + col; }

  // A moment's codes (the first moment's if kFirst) to int32 and back; the largest code
  // magnitude of n codes.
  template <bool kFirst>
  using Code = std::conditional_t<kFirst, int8_t, uint8_t>;

  template <bool kFirst>
  static ADAMW_JAX_INLINE void Widen(const void* from, int32_t* __restrict wide, int64_t n) {
    const Code<kFirst>* __restrict codes = static_cast<const Code<kFirst>*>(from);
    for (int64_t i = 0; i < n; ++i) wide[i] = codes[i];
  }

  template <bool kFirst>
  static ADAMW_JAX_INLINE void Narrow(const int32_t* __restrict wide, void* to, int64_t n) {
    Code<kFirst>* __restrict codes = static_cast<Code<kFirst>*>(to);
    for (int64_t i = 0; i < n; ++i) codes[i] = static_cast<Code<kFirst>>(wide[i]);
  }

  // (Computed in the codes' own type, so that it vectorizes over whole bytes.)
  template <bool kFirst>
  static ADAMW_JAX_INLINE int32_t Largest(const void* from, int64_t n) {
    const Code<kFirst>* __restrict codes = static_cast<const Code<kFirst>*>(from);
    Code<kFirst> largest = 0, smallest = 0;
    for (int64_t i = 0; i < n; ++i) {
      largest = codes[i] > largest ? codes[i] : largest;
      smallest = codes[i] < smallest ? codes[i] : smallest;
    }
    return std::max<int32_t>(largest, -static_cast<int32_t>(smallest));
  }
};

// The 4-bit code books (quantize.py): signed sign-and-magnitude, the magnitude 2-1 with
// subnormals (0 ... 1.5; bit 3 of the nibble the sign, never set on 0), and unsigned 2-2
// without subnormals (0.125 ... 1.75: no code for 0). Both are rounded stochastically.
struct Int4Codes {
  using FirstBook = Book<2, 1, true>;
  using SecondBook = Book<2, 2, false>;
  // Which product XLA's code fuses (see Average): the old moment's, except in v computed
  // again for AMSGrad's maximum in rows of whole blocks.
  template <bool kPadded>
  static constexpr bool kFuseStoredFirst = true;
  template <bool kPadded>
  static constexpr bool kFuseStoredSecond = true;
  template <bool kPadded>
  static constexpr bool kFuseStoredMax = kPadded;

  static ADAMW_JAX_INLINE float First(int32_t k) {
    const float magnitude = FirstBook::Value(k & 7);
    return FloatOf(BitsOf(magnitude) | (static_cast<uint32_t>(k & 8) << 28));
  }

  static ADAMW_JAX_INLINE int32_t EncodeFirst(float m, float inverse, uint32_t salt_mix) {
    const int32_t code = FirstBook::Stochastic(std::fabs(m) * inverse, salt_mix);
    const int32_t sign = (static_cast<int32_t>(BitsOf(m)) >> 31) & 8;
    return code | (code > 0 ? sign : 0);
  }

  static ADAMW_JAX_INLINE float Second(int32_t k) { return SecondBook::Value(k); }

  static ADAMW_JAX_INLINE int32_t EncodeSecond(float root, float inverse, uint32_t salt_mix) {
    return SecondBook::Stochastic(root * inverse, salt_mix);
  }

  static int64_t Offset(int64_t row, int64_t col, int64_t length) {
    return row * ((length + 1) / 2) + col / 2;  // col is even: blocks are whole bytes
  }

  // The nibbles of n codes to int32 and back (n odd only at a row's end); the largest
  // code magnitude (the first moment's: without the sign bit).
  template <bool kFirst>
  static ADAMW_JAX_INLINE void Widen(const void* from, int32_t* __restrict wide, int64_t n) {
    const uint8_t* __restrict bytes = static_cast<const uint8_t*>(from);
    for (int64_t j = 0; j < (n + 1) / 2; ++j) {
      wide[2 * j] = bytes[j] & 15;
      wide[2 * j + 1] = bytes[j] >> 4;
    }
  }

  template <bool kFirst>
  static ADAMW_JAX_INLINE void Narrow(const int32_t* __restrict wide, void* to, int64_t n) {
    uint8_t* __restrict bytes = static_cast<uint8_t*>(to);
    for (int64_t j = 0; j < n / 2; ++j) {
      bytes[j] = static_cast<uint8_t>(wide[2 * j] | (wide[2 * j + 1] << 4));
    }
    if (n % 2) bytes[n / 2] = static_cast<uint8_t>(wide[n - 1]);  // a padding 0 above it
  }

  template <bool kFirst>
  static ADAMW_JAX_INLINE int32_t Largest(const void* from, int64_t n) {
    const uint8_t* __restrict bytes = static_cast<const uint8_t*>(from);
    const uint8_t mask = kFirst ? 7 : 15;  // a magnitude's bits
    uint8_t top = 0;
    for (int64_t j = 0; j < (n + 1) / 2; ++j) {
      const uint8_t low = bytes[j] & mask, high = (bytes[j] >> 4) & mask;
      const uint8_t larger = low > high ? low : high;
      top = larger > top ? larger : top;
    }
    return top;
  }
};

// A quantized moment's block: the scale its old codes decode with, and the factor its new
// values are multiplied by before encoding (the code book's top over the new largest
// magnitude, or 0 for an all-zero block).
struct Coding {
  float scale = 0.0f;
  float inverse = 0.0f;
};

// The new scale of a block whose largest magnitude is bounded by `absmax`: written over
// *scale (after the old one is read); returns the block's Coding.
template <class B>
ADAMW_JAX_INLINE Coding Rescale(float absmax, float* scale) {
  Coding coding;
  coding.scale = *scale;
  *scale = absmax * B::kInverseTop;
  coding.inverse = absmax > 0.0f ? B::kTop / absmax : 0.0f;
  return coding;
}

// The largest |g| of a block (NaN if it holds one): the XLA path's max(max g, -min g).
// Non-negative floats, NaN included, order as their bit patterns, so an integer maximum.
ADAMW_JAX_INLINE float LargestMagnitude(const float* __restrict g, int64_t n) {
  uint32_t top = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = BitsOf(g[i]) & 0x7fffffffu;
    top = bits > top ? bits : top;
  }
  return top > 0x7f800000u ? std::numeric_limits<float>::quiet_NaN() : FloatOf(top);
}

// b x + (1 - b) y (x the decoded old moment) as XLA's compiled code computes it on CPUs
// with FMA: with b x fused into the sum if kFuseStored, else (1 - b) y. Which one LLVM
// fuses depends on how XLA lays out the fusion (whole blocks per row or padded rows, 8 or
// 4-bit codes, which other values share it); the choices, the Codes' kFuseStored
// constants, were read off XLA's compiled code, and the tests hold the kernel to the XLA
// path bit for bit.
template <bool kFuseStored, bool kFma>
ADAMW_JAX_INLINE float Average(float b, float x, float one_minus_b, float y) {
  return kFuseStored ? Mad<kFma>(b, x, one_minus_b * y) : Mad<kFma>(one_minus_b, y, b * x);
}

// The blocks of a leaf: block q is elements [col, col + n) of row `row` (blocks never
// cross a row; the last of a row may be shorter), its scales at index q.
struct Blocks {
  int64_t length, block, per_row;

  explicit Blocks(const Leaf& leaf)
      : length(leaf.row), block(leaf.block), per_row((leaf.row + leaf.block - 1) / leaf.block) {}

  // The first block that starts at or after element e: each chunk [lo, hi) of a leaf's
  // element range takes the blocks [FirstFrom(lo), FirstFrom(hi)).
  int64_t FirstFrom(int64_t e) const {
    return e / length * per_row + (e % length + block - 1) / block;
  }
  int64_t Row(int64_t q) const { return q / per_row; }
  int64_t Col(int64_t q) const { return q % per_row * block; }
  int64_t Size(int64_t q) const { return std::min(block, length - Col(q)); }
};

constexpr int64_t kSlice = 256;  // elements of a block handled at once (scratch in L1)

// The step on a leaf whose moments are stored as `Codes`, block by block: a pass over the
// block's gradient and old codes gives its new scales, computed as the XLA path does
// (adamw_jax/_moment_storage.py, update_leaf: the step applied to the block's largest |g|
// and largest stored magnitudes); then, slice by slice, all in L1 cache: the codes are
// widened to int32 (so that the loop runs on 32-bit lanes only, which vectorizes without
// running out of registers), a loop per moment decodes, updates and re-encodes it, the
// codes are narrowed back, and the leaf's update loop writes the params.
template <class Codes, bool kPadded, bool kAmsgrad, bool kFma>
struct QuantizedStep {
  using F = typename Codes::FirstBook;
  using S = typename Codes::SecondBook;

  struct BlockCodings {
    Coding m, v, v_max;
  };

  // The blocks that start in [lo, hi). Each block's Codings are computed one block ahead:
  // a chain of scalar operations (a square root, divisions) whose latency the CPU then
  // hides behind the previous block's loops.
  static ADAMW_JAX_INLINE void Run(const Leaf& leaf, const float* h, int64_t lo, int64_t hi) {
    const Blocks blocks(leaf);
    const int64_t end = blocks.FirstFrom(hi);
    int64_t q = blocks.FirstFrom(lo);
    if (q >= end) return;
    BlockCodings next = Prepare(leaf, blocks, h, q);
    for (; q < end; ++q) {
      const BlockCodings codings = next;
      if (q + 2 < end) Prefetch(leaf, blocks, q + 2);
      if (q + 1 < end) next = Prepare(leaf, blocks, h, q + 1);
      Block(leaf, h, blocks.Row(q), blocks.Col(q), blocks.Size(q), codings);
    }
  }

  // Asks for block q's gradient, params and codes ahead of their use: the loops over a
  // block are bound by arithmetic, so its memory traffic overlaps them instead of stalling
  // the first pass over the block, which has little else to do.
  static ADAMW_JAX_INLINE void Prefetch(const Leaf& leaf, const Blocks& blocks, int64_t q) {
    const int64_t row = blocks.Row(q), col = blocks.Col(q), n = blocks.Size(q);
    const int64_t start = row * leaf.row + col, at = Codes::Offset(row, col, leaf.row);
    const int64_t bytes = Codes::Offset(0, n, n);
    const char* g = reinterpret_cast<const char*>(leaf.g + start);
    const char* p = reinterpret_cast<const char*>(leaf.p + start);
    for (int64_t b = 0; b < n * 4; b += 64) {
      __builtin_prefetch(g + b, 0, 3);
      __builtin_prefetch(p + b, 1, 3);
    }
    const char* m = static_cast<const char*>(leaf.m) + at;
    const char* v = static_cast<const char*>(leaf.v) + at;
    const char* v_max = kAmsgrad ? static_cast<const char*>(leaf.v_max) + at : nullptr;
    for (int64_t b = 0; b < bytes; b += 64) {
      __builtin_prefetch(m + b, 1, 3);
      __builtin_prefetch(v + b, 1, 3);
      if constexpr (kAmsgrad) __builtin_prefetch(v_max + b, 1, 3);
    }
  }

  static ADAMW_JAX_INLINE BlockCodings Prepare(const Leaf& leaf, const Blocks& blocks,
                                               const float* h, int64_t q) {
    const int64_t row = blocks.Row(q), col = blocks.Col(q);
    const int64_t at = Codes::Offset(row, col, leaf.row);
    const auto* m = static_cast<const uint8_t*>(leaf.m) + at;
    const auto* v = static_cast<const uint8_t*>(leaf.v) + at;
    const auto* v_max = kAmsgrad ? static_cast<const uint8_t*>(leaf.v_max) + at : nullptr;
    BlockCodings c;
    Codings(leaf, h, leaf.g + row * leaf.row + col, blocks.Size(q), q, m, v, v_max, &c.m, &c.v,
            &c.v_max);
    return c;
  }

  static ADAMW_JAX_INLINE void Block(const Leaf& leaf, const float* h, int64_t row, int64_t col,
                                     int64_t n, const BlockCodings& codings) {
    const int64_t start = row * leaf.row + col, at = Codes::Offset(row, col, leaf.row);
    const float* g = leaf.g + start;
    uint8_t* m = static_cast<uint8_t*>(leaf.m) + at;
    uint8_t* v = static_cast<uint8_t*>(leaf.v) + at;
    uint8_t* v_max = kAmsgrad ? static_cast<uint8_t*>(leaf.v_max) + at : nullptr;
    const Coding m_coding = codings.m, v_coding = codings.v, v_max_coding = codings.v_max;
    alignas(64) int32_t m_wide[kSlice], v_wide[kSlice], max_wide[kAmsgrad ? kSlice : 1];
    alignas(64) float m_new[kSlice], v_hat[kSlice];
    for (int64_t done = 0; done < n; done += kSlice) {
      const int64_t k = std::min(kSlice, n - done);
      const int64_t byte = Codes::Offset(0, done, n);
      Codes::template Widen<true>(m + byte, m_wide, k);
      Codes::template Widen<false>(v + byte, v_wide, k);
      if constexpr (kAmsgrad) Codes::template Widen<false>(v_max + byte, max_wide, k);
      Moments(h, k, g + done, m_wide, v_wide, max_wide, m_coding, v_coding, v_max_coding, m_new,
              v_hat);
      Codes::template Narrow<true>(m_wide, m + byte, k);
      Codes::template Narrow<false>(v_wide, v + byte, k);
      if constexpr (kAmsgrad) Codes::template Narrow<false>(max_wide, v_max + byte, k);
      leaf.update(h, k, g + done, leaf.p + start + done, m_new, v_hat);
    }
  }

  // The block's Codings, its new scales written: the first moment's bound is
  // b1 * (largest stored) + (1 - b1) * (largest |g|); the second's b2 * (largest stored)^2
  // + (1 - b2) * (largest |g|)^2; AMSGrad's maximum's max(its largest stored^2, that bound
  // / (1 - b2^t)) (XLA's code divides there).
  static ADAMW_JAX_INLINE void Codings(const Leaf& leaf, const float* h, const float* g,
                                       int64_t n, int64_t q, const uint8_t* m, const uint8_t* v,
                                       const uint8_t* v_max, Coding* m_coding, Coding* v_coding,
                                       Coding* v_max_coding) {
    const float g_top = LargestMagnitude(g, n);
    const float m_top = F::Value(Codes::template Largest<true>(m, n)) * leaf.m_scales[q];
    const float m_bound = Mad<kFma>(h[kOneMinusB1], g_top, h[kB1] * m_top);
    *m_coding = Rescale<F>(std::fabs(m_bound), leaf.m_scales + q);
    const float v_top = S::Value(Codes::template Largest<false>(v, n)) * leaf.v_scales[q];
    const float v_bound = Mad<kFma>(h[kOneMinusB2], g_top * g_top, h[kB2] * (v_top * v_top));
    *v_coding = Rescale<S>(std::sqrt(v_bound), leaf.v_scales + q);
    if constexpr (kAmsgrad) {
      const float top = S::Value(Codes::template Largest<false>(v_max, n)) * leaf.v_max_scales[q];
      const float bound = MaxNan(top * top, v_bound / h[kC2]);
      *v_max_coding = Rescale<S>(std::sqrt(bound), leaf.v_max_scales + q);
    }
  }

  // m = b1 m + (1 - b1) g and v = b2 v + (1 - b2) g^2 from their codes, re-encoded (v as its
  // square root); m to m_new, v / (1 - b2^t) to v_hat (AMSGrad: its running maximum,
  // stored too; XLA's code divides by 1 - b2^t there).
  static ADAMW_JAX_INLINE void Moments(const float* h, int64_t n, const float* __restrict g,
                                       int32_t* __restrict m_codes, int32_t* __restrict v_codes,
                                       int32_t* __restrict max_codes, Coding mc, Coding vc,
                                       Coding wc, float* __restrict m_new,
                                       float* __restrict v_hat) {
    const float b1 = h[kB1], one_minus_b1 = h[kOneMinusB1];
    const float b2 = h[kB2], one_minus_b2 = h[kOneMinusB2];
    const float inv_c2 = h[kInvC2], c2 = h[kC2];
    const uint32_t salt_mix = BitsOf(h[kRoundingSalt]) * kSaltMultiplier;
    // One loop per moment: together their constants and temporaries outnumber the 16
    // vector registers of AVX2, and the spills cost more than reading g twice from L1.
    for (int64_t i = 0; i < n; ++i) {
      const float gi = g[i];
      const float m_old = Codes::First(m_codes[i]) * mc.scale;
      const float m =
          Average<Codes::template kFuseStoredFirst<kPadded>, kFma>(b1, m_old, one_minus_b1, gi);
      m_codes[i] = Codes::EncodeFirst(m, mc.inverse, salt_mix);
      m_new[i] = m;
    }
    for (int64_t i = 0; i < n; ++i) {
      const float gi = g[i];
      const float root_old = Codes::Second(v_codes[i]) * vc.scale;
      const float v = Average<Codes::template kFuseStoredSecond<kPadded>, kFma>(
          b2, root_old * root_old, one_minus_b2, gi * gi);
      v_codes[i] = Codes::EncodeSecond(std::sqrt(v), vc.inverse, salt_mix);
      if constexpr (kAmsgrad) {
        const float max_root = Codes::Second(max_codes[i]) * wc.scale;
        // XLA computes v again for the maximum, and may fuse the other product there.
        const float v_again = Codes::template kFuseStoredMax<kPadded> ==
                                      Codes::template kFuseStoredSecond<kPadded>
                                  ? v
                                  : Average<Codes::template kFuseStoredMax<kPadded>, kFma>(
                                        b2, root_old * root_old, one_minus_b2, gi * gi);
        const float larger = MaxNan(max_root * max_root, v_again / c2);
        max_codes[i] = Codes::EncodeSecond(std::sqrt(larger), wc.inverse, salt_mix);
        v_hat[i] = larger;
      } else {
        v_hat[i] = v * inv_c2;
      }
    }
  }
};

// The params' update from g and the new m and v_hat, as LeafBody computes it.
template <bool kNesterov, int kDecay, bool kFma>
struct Update {
  static ADAMW_JAX_INLINE void Run(const float* h, int64_t n, const float* __restrict g,
                                   float* __restrict p_io, const float* __restrict m_new,
                                   const float* __restrict v_hat) {
    const float inv_c1 = h[kInvC1], eps = h[kEps], eps_root = h[kEpsRoot];
    const float lr = h[kLr], wd = h[kWd];
    const float nesterov_m = h[kNesterovM], nesterov_g = h[kNesterovG];
    for (int64_t i = 0; i < n; ++i) {
      const float m = m_new[i];
      const float m_hat = kNesterov ? Mad<kFma>(nesterov_m, m, nesterov_g * g[i]) : m * inv_c1;
      const float denom = std::sqrt(v_hat[i] + eps_root) + eps;
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
    }
  }
};

template <class Step>
void RunStepPlain(const Leaf& leaf, const float* h, int64_t lo, int64_t hi) {
  Step::Run(leaf, h, lo, hi);
}

template <class Step>
ADAMW_JAX_FMA_TARGET void RunStepFma(const Leaf& leaf, const float* h, int64_t lo, int64_t hi) {
  Step::Run(leaf, h, lo, hi);
}

using UpdateFn = void (*)(const float*, int64_t, const float*, float*, const float*,
                          const float*);

template <class Loop>
void UpdatePlain(const float* h, int64_t n, const float* g, float* p, const float* m,
                 const float* v_hat) {
  Loop::Run(h, n, g, p, m, v_hat);
}

template <class Loop>
ADAMW_JAX_FMA_TARGET void UpdateFma(const float* h, int64_t n, const float* g, float* p,
                                    const float* m, const float* v_hat) {
  Loop::Run(h, n, g, p, m, v_hat);
}

#if defined(__x86_64__)
// The same loops with AVX-512 (32 vector registers, mask registers, 16 lanes), chosen at
// run time where the CPU has it: the quantized steps are bound by arithmetic, not memory.
#define ADAMW_JAX_AVX512_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
inline bool HostHasAvx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

template <class Step>
ADAMW_JAX_AVX512_TARGET void RunStepAvx512(const Leaf& leaf, const float* h, int64_t lo,
                                           int64_t hi) {
  Step::Run(leaf, h, lo, hi);
}

template <class Loop>
ADAMW_JAX_AVX512_TARGET void UpdateAvx512(const float* h, int64_t n, const float* g, float* p,
                                          const float* m, const float* v_hat) {
  Loop::Run(h, n, g, p, m, v_hat);
}
#endif

// The instruction set the quantized steps run with here.
enum Isa : int { kPlain = 0, kFmaIsa = 1, kAvx512 = 2 };

inline int HostIsa() {
#if defined(__x86_64__)
  if (HostHasAvx512() && HostHasFma()) return kAvx512;
#endif
  return HostHasFma() ? kFmaIsa : kPlain;
}

template <template <bool> class Step>
LeafFn PickStepIsa(int isa) {
#if defined(__x86_64__)
  if (isa == kAvx512) return &RunStepAvx512<Step<true>>;
#endif
  return isa == kFmaIsa ? &RunStepFma<Step<true>> : &RunStepPlain<Step<false>>;
}

template <template <bool> class Loop>
UpdateFn PickUpdateIsa(int isa) {
#if defined(__x86_64__)
  if (isa == kAvx512) return &UpdateAvx512<Loop<true>>;
#endif
  return isa == kFmaIsa ? &UpdateFma<Loop<true>> : &UpdatePlain<Loop<false>>;
}

template <class Codes, bool kPadded, bool kAmsgrad>
struct StepWith {
  template <bool kFma>
  using Type = QuantizedStep<Codes, kPadded, kAmsgrad, kFma>;
};

template <bool kNesterov, int kDecay>
struct UpdateWith {
  template <bool kFma>
  using Type = Update<kNesterov, kDecay, kFma>;
};

template <class Codes>
LeafFn PickQuantizedStep(bool padded, bool amsgrad, int isa) {
  if (padded) {
    return amsgrad ? PickStepIsa<StepWith<Codes, true, true>::template Type>(isa)
                   : PickStepIsa<StepWith<Codes, true, false>::template Type>(isa);
  }
  return amsgrad ? PickStepIsa<StepWith<Codes, false, true>::template Type>(isa)
                 : PickStepIsa<StepWith<Codes, false, false>::template Type>(isa);
}

template <bool kNesterov>
UpdateFn PickUpdate(int decay, int isa) {
  if (decay == kLrCoupled) {
    return PickUpdateIsa<UpdateWith<kNesterov, kLrCoupled>::template Type>(isa);
  }
  if (decay == kIndependent) {
    return PickUpdateIsa<UpdateWith<kNesterov, kIndependent>::template Type>(isa);
  }
  return PickUpdateIsa<UpdateWith<kNesterov, kNoDecay>::template Type>(isa);
}

// Sets the loops of a leaf with quantized moments (both int8 or both int4): rows that end
// in a shorter block are laid out differently by XLA (see Average).
void PickQuantized(bool amsgrad, bool nesterov, int decay, Leaf* leaf) {
  static const int isa = HostIsa();
  const bool padded = leaf->row % leaf->block != 0;
  leaf->run = leaf->m_kind == kInt4 ? PickQuantizedStep<Int4Codes>(padded, amsgrad, isa)
                                    : PickQuantizedStep<Int8Codes>(padded, amsgrad, isa);
  leaf->update = nesterov ? PickUpdate<true>(decay, isa) : PickUpdate<false>(decay, isa);
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

// The output buffer, holding the input's values: XLA normally hands the same buffer (the
// outputs are aliased to the inputs); otherwise the input is copied over first.
void* InPlace(const ffi::AnyBuffer& in, ffi::AnyBuffer& out) {
  if (out.untyped_data() != in.untyped_data()) {
    std::memcpy(out.untyped_data(), in.untyped_data(), in.size_bytes());
  }
  return out.untyped_data();
}

// Reads the call's leaf buffers in order: per leaf the inputs p, g, then each moment's
// (values, or codes and scales); the outputs are the same but g.
class Operands {
 public:
  Operands(ffi::RemainingArgs args, ffi::RemainingRets rets) : args_(args), rets_(rets) {}

  // The next input (g: not updated).
  ffi::ErrorOr<ffi::AnyBuffer> Read() {
    if (in_ >= args_.size()) return Fail("fewer inputs than the kinds describe");
    return args_.get<ffi::AnyBuffer>(in_++);
  }

  // The next input and the output aliased to it; *data is the output, holding the input.
  ffi::ErrorOr<ffi::AnyBuffer> Update(void** data) {
    auto in = Read();
    if (in.has_error()) return in;
    if (out_ >= rets_.size()) return Fail("fewer outputs than the kinds describe");
    auto out = rets_.get<ffi::AnyBuffer>(out_++);
    if (out.has_error()) return ffi::Unexpected<ffi::Error>(out.error());
    ffi::AnyBuffer result = **out;
    if (result.element_type() != in->element_type() ||
        result.element_count() != in->element_count()) {
      return Fail("an output differs from its input");
    }
    *data = InPlace(*in, result);
    return in;
  }

  bool AllUsed() const { return in_ == args_.size() && out_ == rets_.size(); }

  static ffi::Error Invalid(const std::string& what) {
    return ffi::Error::InvalidArgument("fused_adamw: " + what);
  }

  static ffi::Unexpected<ffi::Error> Fail(const std::string& what) {
    return ffi::Unexpected<ffi::Error>(Invalid(what));
  }

 private:
  ffi::RemainingArgs args_;
  ffi::RemainingRets rets_;
  size_t in_ = 0, out_ = 0;
};

// One moment of a leaf of `rows` rows of `length` elements: its values, or its codes
// and one scale per block of each row.
ffi::Error BindMoment(Operands& ops, int kind, bool second, int64_t rows, int64_t length,
                      int64_t block, void** data, float** scales) {
  auto values = ops.Update(data);
  if (values.has_error()) return values.error();
  if (kind < kFloat32 || kind > kInt4) return Operands::Invalid("unknown moment kind");
  const ffi::DataType want[] = {ffi::DataType::F32, ffi::DataType::BF16,
                                second ? ffi::DataType::U8 : ffi::DataType::S8,
                                ffi::DataType::U8};
  const int64_t count = kind == kInt4 ? rows * ((length + 1) / 2) : rows * length;
  if (values->element_type() != want[kind] ||
      static_cast<int64_t>(values->element_count()) != count) {
    return Operands::Invalid(
        "a moment's dtype or size does not match its kind (float32 or bfloat16 values, "
        "int8 codes of the first moment, uint8 codes of the second, one per element; "
        "int4 codes: uint8, two per byte along the last axis)");
  }
  if (!IsQuantized(kind)) return ffi::Error::Success();
  if (kind == kInt4 && block % 2 != 0) {
    return Operands::Invalid("int4 codes need an even block_size");
  }
  void* scale_data = nullptr;
  auto s = ops.Update(&scale_data);
  if (s.has_error()) return s.error();
  const int64_t per_row = (length + block - 1) / block;
  if (s->element_type() != ffi::DataType::F32 ||
      static_cast<int64_t>(s->element_count()) != rows * per_row) {
    return Operands::Invalid("a quantized moment needs one float32 scale per block");
  }
  *scales = static_cast<float*>(scale_data);
  return ffi::Error::Success();
}

// Binds one leaf's buffers: p, g, m, v (and v_max with AMSGrad), stored as the kinds say.
ffi::Error BindLeaf(Operands& ops, int m_kind, int v_kind, bool amsgrad, int64_t block,
                    Leaf* leaf) {
  void* p = nullptr;
  auto params = ops.Update(&p);
  if (params.has_error()) return params.error();
  auto grads = ops.Read();
  if (grads.has_error()) return grads.error();
  const int64_t size = static_cast<int64_t>(params->element_count());
  if (params->element_type() != ffi::DataType::F32 ||
      grads->element_type() != ffi::DataType::F32 ||
      static_cast<int64_t>(grads->element_count()) != size) {
    return Operands::Invalid("params and grads must be float32 arrays of one size");
  }
  const auto dims = params->dimensions();
  leaf->row = dims.size() == 0 ? 1 : dims[dims.size() - 1];
  leaf->block = block;
  const int64_t rows = leaf->row == 0 ? 0 : size / leaf->row;
  leaf->size = size;
  leaf->g = static_cast<const float*>(grads->untyped_data());
  leaf->p = static_cast<float*>(p);
  leaf->m_kind = m_kind;
  leaf->v_kind = v_kind;
  if ((IsQuantized(m_kind) || IsQuantized(v_kind)) && m_kind != v_kind) {
    return Operands::Invalid("a leaf's quantized moments must be both int8 or both int4");
  }
  const int64_t length = leaf->row;
  ffi::Error e = BindMoment(ops, m_kind, false, rows, length, block, &leaf->m, &leaf->m_scales);
  if (e.success()) {
    e = BindMoment(ops, v_kind, true, rows, length, block, &leaf->v, &leaf->v_scales);
  }
  if (e.success() && amsgrad) {
    e = BindMoment(ops, v_kind, true, rows, length, block, &leaf->v_max, &leaf->v_max_scales);
  }
  return e;
}

// Binds every leaf of a call: kinds[2j], kinds[2j + 1] are leaf j's moment kinds.
ffi::Error BindLeaves(ffi::RemainingArgs args, ffi::RemainingRets rets, const uint8_t* kinds,
                      size_t num_leaves, bool amsgrad, int64_t block, std::vector<Leaf>* leaves) {
  if (block < 1) return Operands::Invalid("block_size must be at least 1");
  Operands ops(args, rets);
  leaves->resize(num_leaves);
  for (size_t j = 0; j < num_leaves; ++j) {
    ffi::Error e = BindLeaf(ops, kinds[2 * j], kinds[2 * j + 1], amsgrad, block, &(*leaves)[j]);
    if (e.failure()) return e;
  }
  if (!ops.AllUsed()) return Operands::Invalid("more inputs or outputs than the kinds describe");
  return ffi::Error::Success();
}

// Adds the bound leaves that hold elements to `work`, in order.
void AddLeaves(std::vector<Leaf>& leaves, Work* work) {
  for (Leaf& leaf : leaves) {
    leaf.offset = work->total;
    work->total += leaf.size;
    if (leaf.size > 0) work->leaves.push_back(leaf);
  }
}

ffi::Error FusedAdamwImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> hyper,
                          ffi::Buffer<ffi::U8> decays, ffi::Buffer<ffi::U8> kinds,
                          ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t amsgrad,
                          int64_t nesterov, int64_t coupling, int64_t block_size) {
  if (hyper.element_count() != kNumHyper) {
    return Operands::Invalid("hyper must hold 14 float32 values");
  }
  const size_t num_leaves = decays.element_count();
  if (kinds.element_count() != 2 * num_leaves) {
    return Operands::Invalid("kinds must hold two values per leaf");
  }
  std::vector<Leaf> leaves;
  ffi::Error e = BindLeaves(args, rets, kinds.typed_data(), num_leaves, amsgrad != 0,
                            block_size, &leaves);
  if (e.failure()) return e;
  const uint8_t* decay_flags = decays.typed_data();
  for (size_t j = 0; j < num_leaves; ++j) {
    Leaf& leaf = leaves[j];
    const int decay = decay_flags[j] ? static_cast<int>(coupling) : kNoDecay;
    if (IsQuantized(leaf.m_kind) || IsQuantized(leaf.v_kind)) {
      PickQuantized(amsgrad != 0, nesterov != 0, decay, &leaf);
    } else {
      leaf.run = PickKernel(leaf.m_kind == kBfloat16, leaf.v_kind == kBfloat16, amsgrad != 0,
                            nesterov != 0, decay);
    }
  }
  auto work = std::make_shared<Work>();
  std::memcpy(work->hyper, hyper.typed_data(), sizeof(work->hyper));
  AddLeaves(leaves, work.get());
  RunAll(pool, work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamwJaxFusedAdamw, FusedAdamwImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // hyper
                                  .Arg<ffi::Buffer<ffi::U8>>()   // per-leaf decay flags
                                  .Arg<ffi::Buffer<ffi::U8>>()   // per-leaf moment kinds
                                  .RemainingArgs()   // p, g, m, v[, v_max] per leaf
                                  .RemainingRets()   // p, m, v[, v_max] per leaf
                                  .Attr<int64_t>("amsgrad")
                                  .Attr<int64_t>("nesterov")
                                  .Attr<int64_t>("coupling")
                                  .Attr<int64_t>("block_size"));
