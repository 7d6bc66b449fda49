// Bandwidth probes: the fused AdamW step's memory traffic and work split, with an addition
// per element instead of the optimizer's arithmetic: what this machine can move in the same
// pattern, the bound the step is compared with. Not part of the library: the benchmark
// (benchmarks/step_time_contenders.py) compiles this file at run time with the kernel's
// flags, into its own extension, and registers its two targets. It includes the kernel's
// source, so that the probes bind operands and share work exactly as the step does.

#include "fused_adamw.cc"

namespace {

// The probe's loop on a leaf with quantized moments: the step's traffic (the params and
// both moments' codes and scales read and written, g read), each array streamed through
// in the chunk's share of it, with an addition or an increment per element instead of the
// optimizer's arithmetic: the most this machine moves in that pattern.
template <class Codes>
struct ProbeStep {
  static ADAMW_JAX_INLINE void Run(const Leaf& leaf, const float*, int64_t lo, int64_t hi) {
    const float* __restrict g = leaf.g;
    float* __restrict p = leaf.p;
    for (int64_t i = lo; i < hi; ++i) p[i] += g[i];
    // Locals, as the stores through char pointers below could otherwise alias `leaf`.
    const int64_t size = leaf.size, rows = size / leaf.row;
    const int64_t bytes = Codes::Offset(rows, 0, leaf.row);
    const int64_t scales = rows * ((leaf.row + leaf.block - 1) / leaf.block);
    const int64_t byte_lo = lo * bytes / size, byte_hi = hi * bytes / size;
    uint8_t* __restrict m = static_cast<uint8_t*>(leaf.m);
    uint8_t* __restrict v = static_cast<uint8_t*>(leaf.v);
    for (int64_t i = byte_lo; i < byte_hi; ++i) m[i] += 1;
    for (int64_t i = byte_lo; i < byte_hi; ++i) v[i] += 1;
    float* __restrict m_scales = leaf.m_scales;
    float* __restrict v_scales = leaf.v_scales;
    const int64_t scale_lo = lo * scales / size, scale_hi = hi * scales / size;
    for (int64_t i = scale_lo; i < scale_hi; ++i) m_scales[i] += 1.0f;
    for (int64_t i = scale_lo; i < scale_hi; ++i) v_scales[i] += 1.0f;
  }
};

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
  const size_t num_leaves = args.size() / 4;
  const std::vector<uint8_t> kinds(2 * num_leaves, kFloat32);
  std::vector<Leaf> leaves;
  ffi::Error e = BindLeaves(args, rets, kinds.data(), num_leaves, false, 1, &leaves);
  if (e.failure()) return e;
  for (Leaf& leaf : leaves) leaf.run = HostHasFma() ? &ProbeLeafFma : &ProbeLeafPlain;
  auto work = std::make_shared<Work>();
  AddLeaves(leaves, work.get());
  RunAll(pool, work);
  return ffi::Error::Success();
}

// The probe of a step with quantized moments: the step's operands (kinds and block size
// too) and its block-by-block traffic, each block's scales incremented, codes and params
// as in ProbeStep; leaves whose moments are float32 (those under min_quantize_size) as in
// the float probe.
ffi::Error BlockProbeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> kinds,
                          ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t block_size) {
  const size_t num_leaves = kinds.element_count() / 2;
  std::vector<Leaf> leaves;
  ffi::Error e = BindLeaves(args, rets, kinds.typed_data(), num_leaves, false, block_size,
                            &leaves);
  if (e.failure()) return e;
  const bool fma = HostHasFma();
  for (Leaf& leaf : leaves) {
    if (leaf.m_kind == kInt4) {
      leaf.run = fma ? &RunStepFma<ProbeStep<Int4Codes>> : &RunStepPlain<ProbeStep<Int4Codes>>;
    } else if (leaf.m_kind == kInt8) {
      leaf.run = fma ? &RunStepFma<ProbeStep<Int8Codes>> : &RunStepPlain<ProbeStep<Int8Codes>>;
    } else if (leaf.m_kind == kFloat32 && leaf.v_kind == kFloat32) {
      leaf.run = fma ? &ProbeLeafFma : &ProbeLeafPlain;
    } else {
      return Operands::Invalid("block_probe: float32, int8 or int4 moments only");
    }
  }
  auto work = std::make_shared<Work>();
  AddLeaves(leaves, work.get());
  RunAll(pool, work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamwJaxStreamProbe, StreamProbeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()   // p, g, m, v per leaf
                                  .RemainingRets());  // p, m, v per leaf

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamwJaxBlockProbe, BlockProbeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()  // per-leaf moment kinds
                                  .RemainingArgs()   // as the step's
                                  .RemainingRets()
                                  .Attr<int64_t>("block_size"));
