// Native CPU kernels of the SHADE penalty: one pass forward, one pass backward.
//
// y arrives as (A, C, B). Two layouts get their own loops:
//   B < kShortRun  lanes: each of the A rows of C * B elements vectorised across them, element
//                  (c, b) a lane of unit c with its own partial sums, added B at a time at the
//                  end. B == 1 is units innermost ((N, C), channels-last); a short B is NCHW at a
//                  small image (4x4, 2x2), whose runs would be shorter than a vector;
//   otherwise      every unit a run of B samples (NCHW): vectorised along the run, the runs
//                  walked in memory order, or unit by unit for a batch of at most kFewSamples.
// Work is cut into chunks whose size depends only on the shape, and the per-chunk partial sums are
// added in a fixed order, so the results are bitwise the same from run to run and whatever the
// number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <optional>
#include <type_traits>
#include <vector>

#include "vec_exp.h"

namespace shade_ops {

// The device-generic composite of shade_ops.cpp, for buffers this file's loop does not take.
void update_state(at::Tensor& p, at::Tensor& mu, const at::Tensor& sums, double decay);

namespace {

using at::vec::Vectorized;

constexpr int64_t kGrain = 16384;    // elements of y in one work item
// Calls on at most this many elements stay on the calling thread: waking a second one costs about what the
// work saves, and on a machine whose other core is busy that thread may not run for
// milliseconds (docs/benchmarks.md, "Per-call cost").
constexpr int64_t kSerial = 65536;
constexpr int64_t kMaxChunks = 64;   // bound on the partial sums kept per unit
constexpr int64_t kTile = 1024;      // elements in one backward row of lanes (see the top)
// Runs shorter than a float vector take the lanes loops: along such a run the per-run work (five
// sums reduced across a vector's lanes, a scalar tail with its scalar exp) cost up to 100x
// relu(y)'s time (B = 4: 2x2 images). Longer runs keep the run loops: with C * B lanes, their
// partial sums, read and written at every vector, leave L1 (B = 16: a DenseNet step's forwards
// took 25% longer through the lanes, B = 64: 1.2-2x; docs/benchmarks.md, "Per-call cost").
constexpr int64_t kShortRun = Vectorized<float>::size();
// Batches of at most this many samples walk each unit's runs in turn (see forward_impl).
constexpr int64_t kFewSamples = 16;
constexpr int kSums = 4;             // sum s, sum s*y, sum q*y, sum of the penalty terms

// ---- element-wise math, written once for scalars and vectors ------------------------------

// Software prefetch this many elements (a page) ahead in the vector loops. With y out of cache, as
// in training, the hardware prefetcher alone leaves these loops waiting on memory: their
// arithmetic per cache line leaves fewer loads in flight than a plain ReLU's, and it stops at page
// ends. (A prefetch past the end of y is harmless: it never faults.)
constexpr int64_t kPrefetch = 1024;
template <typename T>
inline void prefetch(const T* p) {
  __builtin_prefetch(p, 0, 3);
}

// v where y > 0, else 0 (relu'(0) = 0)
template <typename T>
inline T where_positive(T y, T v) {
  return y > T(0) ? v : T(0);
}
template <typename T>
inline Vectorized<T> where_positive(const Vectorized<T>& y, const Vectorized<T>& v) {
  return v & (y > Vectorized<T>(T(0)));  // the comparison gives all-ones lanes
}
template <typename T>
inline T fma_(T a, T b, T c) {
  return a * b + c;
}
template <typename T>
inline Vectorized<T> fma_(const Vectorized<T>& a, const Vectorized<T>& b, const Vectorized<T>& c) {
  return at::vec::fmadd(a, b, c);
}

// Per unit, the penalty term of SPEC section 2, s (y - mu1)^2 + q (y - mu0)^2, is computed as it
// reads: two non-negative terms, whose sum never cancels however far apart mu0 and mu1 are (the
// expanded (y - mu1)^2 + q (a y + b) subtracted terms of size (mu1 - mu0)^2: at mu1 - mu0 = 1e4 it
// came out negative). Each probability multiplies its distance before the distance squares it,
// (s d1) d1, as in the reference: where a square overflows and its probability is 0 (s at
// y = -1e30, q at y = 1e30) the term is 0, not 0 * inf = NaN, so an overflowing penalty is +inf.
// (The same operations as s (d1 d1): a multiplication and a fused multiply-add.)
template <typename V>
struct ForwardCoef {
  V mu0, mu1;
};

// The sums of one unit: s, s y, q y, and the penalty in its two terms, so that each element costs
// one fused multiply-add per sum.
template <typename V>
struct Accumulators {
  V s{0}, sy{0}, qy{0}, pen1{0}, pen0{0};

  // Adds y's terms; returns relu(y).
  inline V add(const V& y, const ForwardCoef<V>& k) {
    const auto p = relu_and_probs(y);
    s += p.s;
    sy = fma_(p.s, y, sy);
    qy = fma_(p.q, y, qy);
    const V d1 = y - k.mu1, d0 = y - k.mu0;
    pen1 = fma_(p.s * d1, d1, pen1);
    pen0 = fma_(p.q * d0, d0, pen0);
    return p.r;
  }
};

// The gradient of SPEC section 3, with s'(y) = q where y > 0 (0 elsewhere), d1 = y - mu1 and
// d0 = y - mu0, is
//   w (s'(y) (d1^2 - d0^2) + 2 (s d1 + q d0)),   d1^2 - d0^2 = 2 (mu0 - mu1) (y - h),
// h = (mu0 + mu1) / 2 the unit's midpoint: the difference of squares as a product, which does not
// cancel, and whose factor y - h is one rounding from the exact value. (d1 + d0 in its place
// carried two roundings of size eps |mu|, which the product with mu0 - mu1 turned into an error
// in proportion to |mu|: 5e-3 of the largest gradient at mu = (-1e5, 1e5).) Per unit, h and
// 2 w (mu0 - mu1) are computed in double and rounded once. s d1 + q d0 is a convex combination
// of the distances (s + q = 1), within a few roundings of s |d1| + q |d0| for every y: d0 itself
// where y <= 0, d1 plus a small q d0 where y is large.
//
// The common loop's grouping, q a + s (2 w d1) with a = 2 w d0 + [y > 0] 2 w (mu0 - mu1) (y - h),
// would be 0 * inf = NaN where q is 0 and a overflows; that takes y and |mu| near the square root
// of the largest float (scaled by w). Where that can happen (y above kSquareSafe / sqrt(|w|), or
// some |mu| as large), guarded_gradient() forms each product so that a probability of 0 times a
// finite distance is 0: (q 2 w (mu0 - mu1)) (y - h) and 2 w (s d1 + q d0). The gradient is then
// finite wherever the exact one is (as long as the distances y - mu, y - h are floats: |y| = 1e30
// with |mu| = 1e20 is).
template <typename T>
constexpr T kSquareSafe = T(0.25) * T(std::is_same_v<T, double> ? 1.3e154 : 1.8e19);

// w folded in: w_gap = 2 w (mu0 - mu1), two_w = 2 w.
template <typename V>
struct BackwardCoef {
  V mu0, mu1, mid, w_gap, two_w;
};
// Grouped as q a + (s (2 w d1) + extra), a as above: a needs y alone, so that only two operations
// wait for the exp (the loop is bound by its chain of dependent operations more than by their
// number). extra: ReLU's gradient, or 0.
template <typename V>
inline V gradient(const V& y, const ReluProbs<V>& p, const BackwardCoef<V>& k, const V& extra) {
  const V d1 = y - k.mu1, d0 = y - k.mu0;
  const V a = fma_(k.two_w, d0, where_positive(y, k.w_gap * (y - k.mid)));
  return fma_(p.q, a, fma_(p.s, k.two_w * d1, extra));
}
template <typename V>
inline V guarded_gradient(const V& y, const ReluProbs<V>& p, const BackwardCoef<V>& k,
                          const V& extra) {
  const V d1 = y - k.mu1, d0 = y - k.mu0;
  const V squares = where_positive(y, (p.q * k.w_gap) * (y - k.mid));
  return squares + fma_(k.two_w, p.s * d1 + p.q * d0, extra);
}

// Whether y (any lane) is above `safe`. Below it, a negative y needs no guarded_gradient: there
// the difference of squares is dropped by a mask, and q = 1.
template <typename T>
inline bool any_huge(T y, T safe) {
  return y > safe;
}
template <typename T>
inline bool any_huge(const Vectorized<T>& y, const Vectorized<T>& safe) {
  return (y > safe).zero_mask() != (1 << Vectorized<T>::size()) - 1;
}
#if defined(CPU_CAPABILITY_AVX512) && !defined(_MSC_VER)
template <>
inline bool any_huge(const Vectorized<float>& y, const Vectorized<float>& safe) {
  return _mm512_cmp_ps_mask(y, safe, _CMP_GT_OQ) != 0;
}
#elif defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
template <>
inline bool any_huge(const Vectorized<float>& y, const Vectorized<float>& safe) {
  return _mm256_movemask_ps(_mm256_cmp_ps(y, safe, _CMP_GT_OQ)) != 0;
}
#endif

// ---- float16 / bfloat16: converted in registers, a vector at a time ---------------------

// The loops read and write y's own type and compute in acc_t: every vector is converted as it is
// loaded and rounded as it is stored. (Converting a tile into a float buffer first, then computing,
// then converting back ran the conversions, and the memory traffic they wait on, apart from the
// arithmetic, where the loop's chain of dependent operations leaves them room: bfloat16 was 1.3x
// float32's time at 1M elements.) bfloat16 to float is exact, the 16 bits shifted up; float to
// bfloat16 rounds to nearest even, NaN to NaN (0xffff in a vector, as at::vec::convert's vector
// path, 0x7fc0 in a scalar tail, as c10's).
template <typename acc_t, typename scalar_t>
inline Vectorized<acc_t> load_vec(const scalar_t* p) {
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vec::loadu(p);
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512) && !defined(_MSC_VER)
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    // F16C (which the AVX2 build requires): exact, as every float16 is a float
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
  } else {
    acc_t buf[Vec::size()];
    at::vec::convert(p, buf, Vec::size());
    return Vec::loadu(buf);
  }
}

template <typename acc_t, typename scalar_t>
inline void store_vec(const Vectorized<acc_t>& v, scalar_t* p) {
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v.store(p);
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512) && !defined(_MSC_VER)
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    // round to nearest even: add 0x7fff plus the lowest kept bit, keep the high 16 bits
    const __m256 f = v;
    const __m256i x = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    __m256i t = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)), x), 16);
    t = _mm256_blendv_epi8(_mm256_set1_epi32(0xffff), t,
                           _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_ORD_Q)));
    // 8 x 32 bits -> 8 x 16 bits (all values fit: no saturation)
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
#endif
  } else {
    acc_t buf[Vec::size()];
    v.store(buf);
    at::vec::convert(buf, p, Vec::size());
  }
}

// ---- shape of the work -----------------------------------------------------------------

// Rows per chunk: about kGrain elements, and never more than kMaxChunks chunks in all.
inline int64_t rows_per_chunk(int64_t rows, int64_t row_len) {
  const int64_t by_grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, row_len));
  const int64_t by_cap = (rows + kMaxChunks - 1) / kMaxChunks;
  return std::max(by_grain, by_cap);
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

struct Shape {
  int64_t A, C, B;
};

// y is (A, C, B), or (A, C, ...) whose trailing dims merge into B (as a contiguous copy of it lies
// in memory: the kernels read y.contiguous()).
inline Shape check_inputs(const at::Tensor& y, const at::Tensor& mu) {
  TORCH_CHECK(y.dim() >= 2, "shade_ops: y must be (A, C, B) or (A, C, ...), got ", y.dim(),
              " dims");
  TORCH_CHECK(at::isFloatingType(y.scalar_type()), "shade_ops: y must be floating point");
  TORCH_CHECK(mu.dim() == 2 && mu.size(0) == 2 && mu.size(1) == y.size(1),
              "shade_ops: mu must have shape (2, C) with C = ", y.size(1));
  TORCH_CHECK(y.device() == mu.device(), "shade_ops: y and mu must be on one device");
  return {y.size(0), y.size(1), c10::multiply_integers(y.sizes().slice(2))};
}

// t in dtype `type`, contiguous: t itself when it already is (Tensor::to dispatches even then).
inline at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType type) {
  if (t.scalar_type() == type && t.is_contiguous()) return t;
  return t.to(type).contiguous();
}

// A scratch buffer, uninitialised (std::vector would zero it first) and aligned to a cache line:
// the loops load and store whole vectors of it, and at new[]'s 16 bytes every 64-byte vector
// straddled two lines (the units-innermost forward was 20% slower than from at::empty's memory).
constexpr std::align_val_t kLine{64};
struct AlignedDelete {
  void operator()(void* p) const { ::operator delete[](p, kLine); }
};
template <typename T>
using Buffer = std::unique_ptr<T[], AlignedDelete>;
template <typename T>
Buffer<T> aligned_buffer(int64_t n) {
  static_assert(std::is_trivially_destructible_v<T>);
  return Buffer<T>(static_cast<T*>(::operator new[](std::max<int64_t>(n, 1) * sizeof(T), kLine)));
}

inline bool is_mean(c10::string_view reduction) {
  TORCH_CHECK(reduction == "mean" || reduction == "sum",
              "shade_ops: reduction must be 'mean' or 'sum', got '", reduction, "'");
  return reduction == "mean";
}

// ---- forward ---------------------------------------------------------------------------

// Partial sums over `rows` units-innermost rows of a (rows, C) block, added into
// partial (kSums, C), row after row: a stride-C walk down a column would touch a new page at every
// step once C is large, while these partials stay in L1.
template <typename scalar_t, typename acc_t, typename out_t>
void forward_rows(const scalar_t* y, int64_t rows, int64_t C, const acc_t* mu, out_t* out,
                  acc_t* partial) {
  using Vec = Vectorized<acc_t>;
  const acc_t *mu0 = mu, *mu1 = mu + C;
  acc_t *ps = partial, *psy = partial + C, *pqy = partial + 2 * C, *ppen = partial + 3 * C;
  for (int64_t r = 0; r < rows; ++r, y += C) {
    int64_t c = 0;
    for (; c + Vec::size() <= C; c += Vec::size()) {
      prefetch(y + c + kPrefetch);
      Accumulators<Vec> acc{Vec::loadu(ps + c), Vec::loadu(psy + c), Vec::loadu(pqy + c),
                            Vec::loadu(ppen + c), Vec(0)};
      const Vec relu = acc.add(load_vec<acc_t>(y + c),
                               ForwardCoef<Vec>{Vec::loadu(mu0 + c), Vec::loadu(mu1 + c)});
      acc.s.store(ps + c);
      acc.sy.store(psy + c);
      acc.qy.store(pqy + c);
      (acc.pen1 + acc.pen0).store(ppen + c);
      if (out != nullptr) store_vec(relu, out + r * C + c);
    }
    for (; c < C; ++c) {
      Accumulators<acc_t> acc{ps[c], psy[c], pqy[c], ppen[c], 0};
      const acc_t relu = acc.add(static_cast<acc_t>(y[c]), ForwardCoef<acc_t>{mu0[c], mu1[c]});
      ps[c] = acc.s, psy[c] = acc.sy, pqy[c] = acc.qy, ppen[c] = acc.pen1 + acc.pen0;
      if (out != nullptr) out[r * C + c] = static_cast<out_t>(relu);
    }
  }
}

// Running sums along the runs of one unit: vector lanes, then a scalar tail.
template <typename acc_t>
struct RunSums {
  using Vec = Vectorized<acc_t>;
  Accumulators<Vec> lanes;
  Accumulators<acc_t> tail;

  template <typename scalar_t, typename out_t>
  void add(const scalar_t* y, int64_t n, const ForwardCoef<acc_t>& k, out_t* out) {
    if (out != nullptr) {
      add_impl<true>(y, n, k, out);
    } else {
      add_impl<false>(y, n, k, out);
    }
  }

  // Local copies in the loop: a store to `out` could alias a member, and the compiler would keep
  // the sums in memory.
  template <bool kOut, typename scalar_t, typename out_t>
  void add_impl(const scalar_t* y, int64_t n, const ForwardCoef<acc_t>& k, out_t* out) {
    const ForwardCoef<Vec> kv{Vec(k.mu0), Vec(k.mu1)};
    Accumulators<Vec> acc = lanes;
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      prefetch(y + i + kPrefetch);
      const Vec relu = acc.add(load_vec<acc_t>(y + i), kv);
      if constexpr (kOut) store_vec(relu, out + i);
    }
    lanes = acc;
    for (; i < n; ++i) {
      const acc_t relu = tail.add(static_cast<acc_t>(y[i]), k);
      if constexpr (kOut) out[i] = static_cast<out_t>(relu);
    }
  }

  static acc_t total(const Vec& v, acc_t tail) {
    return at::vec::vec_reduce_all<acc_t>([](const Vec& x, const Vec& y) { return x + y; }, v) +
           tail;
  }
  // The four sums, `stride` apart.
  void store(acc_t* partial, int64_t stride) const {
    partial[0] = total(lanes.s, tail.s);
    partial[stride] = total(lanes.sy, tail.sy);
    partial[2 * stride] = total(lanes.qy, tail.qy);
    partial[3 * stride] = total(lanes.pen1 + lanes.pen0, tail.pen1 + tail.pen0);
  }
};

// Returns (penalty, sums) and, when relu_out is given, writes relu(y) into it.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& y_in, const at::Tensor& mu_in,
                                                bool mean, at::Tensor* relu_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto [A, C, B] = check_inputs(y_in, mu_in);
  const at::Tensor y = y_in.contiguous();
  const at::TensorOptions acc_options = y.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor mu = contiguous_as(mu_in, acc_options.dtype().toScalarType());
  const acc_t* mup = mu.const_data_ptr<acc_t>();  // (2, C): mu0, then mu1
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  scalar_t* op = relu_out != nullptr ? relu_out->mutable_data_ptr<scalar_t>() : nullptr;

  // Rows in memory order: (A rows of U lanes) with lanes, else (A * C rows of B samples, row r
  // being unit r % C). Chunk k takes rows [k R, (k + 1) R) and leaves its sums in partial, a
  // (chunks, kSums, C) buffer. Walking memory in order keeps the hardware prefetcher streaming; a
  // walk down one unit would jump C * B elements after every B.
  // With few samples (runs of a batch of at most kFewSamples), each unit's A runs are walked in
  // turn instead: A streams, the unit's sums in registers from its first run to its last and
  // stored once, into partial's single chunk (in memory order, a unit's sums were reloaded and
  // stored at every run, from a chunk's array of C units that did not fit L1, and reduced across
  // lanes every few runs: 1.5x the time a sample at B = 64).
  const int64_t numel = A * C * B;
  const bool lanes = B < kShortRun;
  const bool few = !lanes && A <= kFewSamples;
  const int64_t U = lanes ? C * B : C;  // partial sums per chunk and sum: lanes, or units
  const int64_t rows = lanes ? A : A * C;
  const int64_t R = rows_per_chunk(rows, lanes ? U : B);
  const int64_t chunks = numel > 0 ? (few ? 1 : ceil_div(rows, R)) : 0;
  const Buffer<acc_t> partial = aligned_buffer<acc_t>(chunks * kSums * U);
  acc_t* pp = partial.get();
  const int64_t chunk_grain = numel <= kSerial ? std::max<int64_t>(1, chunks) : 1;
  // mu per lane: unit c's B times over
  Buffer<acc_t> lane_mu;
  if (lanes && B > 1) {
    lane_mu = aligned_buffer<acc_t>(2 * U);
    for (int64_t z = 0; z < 2; ++z) {
      for (int64_t c = 0; c < C; ++c) {
        std::fill_n(lane_mu.get() + z * U + c * B, B, mup[z * C + c]);
      }
    }
    mup = lane_mu.get();
  }

  // The run loops' step: the run of B samples at `offset` into a unit's sums, relu(y) written
  // where asked; float16 / bfloat16 through the float buffer `obuf` (kTile elements), as in the
  // lanes loop.
  auto add_run = [&](RunSums<acc_t>& sums, int64_t offset, const ForwardCoef<acc_t>& unit,
                     acc_t* obuf) {
    if (std::is_same_v<scalar_t, acc_t> || op == nullptr) {
      sums.add(yp + offset, B, unit, op != nullptr ? op + offset : nullptr);
    } else {
      for (int64_t i = 0; i < B; i += kTile) {
        const int64_t n = std::min(kTile, B - i);
        sums.add(yp + offset + i, n, unit, obuf);
        at::vec::convert(obuf, op + offset + i, n);
      }
    }
  };

  if (numel > 0 && lanes) {
    at::parallel_for(0, chunks, chunk_grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> obuf;
      for (int64_t k = begin; k < end; ++k) {
        const int64_t a0 = k * R, n_rows = std::min(R, A - a0);
        acc_t* chunk_partial = pp + k * kSums * U;
        std::fill(chunk_partial, chunk_partial + kSums * U, acc_t(0));
        if (std::is_same_v<scalar_t, acc_t> || op == nullptr) {
          forward_rows<scalar_t, acc_t, scalar_t>(yp + a0 * U, n_rows, U, mup,
                                                  op != nullptr ? op + a0 * U : nullptr,
                                                  chunk_partial);
        } else {
          // relu(y) of float16 / bfloat16 written as floats a few rows (about kTile elements) at
          // a time, then rounded 16 at a time: rounded in the loop, 8 at a time, it was slower
          const int64_t tile_rows = std::max<int64_t>(1, std::min(n_rows, kTile / U));
          obuf.resize(tile_rows * U);
          for (int64_t t = 0; t < n_rows; t += tile_rows) {
            const int64_t m_rows = std::min(tile_rows, n_rows - t);
            forward_rows<scalar_t, acc_t, acc_t>(yp + (a0 + t) * U, m_rows, U, mup, obuf.data(),
                                                 chunk_partial);
            at::vec::convert(obuf.data(), op + (a0 + t) * U, m_rows * U);
          }
        }
      }
    });
  } else if (numel > 0 && few) {
    // groups of G units, about kGrain elements each
    const int64_t G = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, A * B));
    const int64_t groups = ceil_div(C, G);
    at::parallel_for(0, groups, numel <= kSerial ? groups : 1, [&](int64_t begin, int64_t end) {
      acc_t obuf[std::is_same_v<scalar_t, acc_t> ? 1 : kTile];
      for (int64_t c = begin * G; c < std::min(C, end * G); ++c) {
        RunSums<acc_t> sums;
        const ForwardCoef<acc_t> unit{mup[c], mup[C + c]};
        for (int64_t a = 0; a < A; ++a) add_run(sums, (a * C + c) * B, unit, obuf);
        sums.store(pp + c, C);
      }
    });
  } else if (numel > 0) {
    at::parallel_for(0, chunks, chunk_grain, [&](int64_t begin, int64_t end) {
      std::vector<RunSums<acc_t>> units;
      acc_t obuf[std::is_same_v<scalar_t, acc_t> ? 1 : kTile];
      for (int64_t k = begin; k < end; ++k) {
        // the chunk's units: slot i holds unit (r0 + i) % C, whose rows are r0 + i + j C
        const int64_t r0 = k * R, r1 = std::min(rows, r0 + R), n_units = std::min(r1 - r0, C);
        units.assign(n_units, RunSums<acc_t>());
        // row r's unit c = r % C and slot (r - r0) % C, counted rather than divided (two
        // divisions a row cost as much as the arithmetic of a 64-element row)
        int64_t c = r0 % C, slot = 0;
        for (int64_t r = r0; r < r1; ++r, c = c + 1 == C ? 0 : c + 1,
                     slot = slot + 1 == C ? 0 : slot + 1) {
          add_run(units[slot], r * B, ForwardCoef<acc_t>{mup[c], mup[C + c]}, obuf);
        }
        acc_t* chunk_partial = pp + k * kSums * C;
        if (n_units < C) std::fill(chunk_partial, chunk_partial + kSums * C, acc_t(0));
        for (int64_t i = 0; i < n_units; ++i) units[i].store(chunk_partial + (r0 + i) % C, C);
      }
    });
  }

  // Fixed-order reduction of the chunk partials (and of each unit's lanes), then the penalty.
  at::Tensor sums = at::empty({kSums, C}, acc_options);  // row 3 holds the penalty terms here
  acc_t* sp = sums.mutable_data_ptr<acc_t>();
  std::fill(sp, sp + kSums * C, acc_t(0));
  const int64_t per_unit = lanes ? B : 1;  // lanes of one unit
  at::parallel_for(0, C, chunks * kSums * U <= kSerial ? C : 256, [&](int64_t c0, int64_t c1) {
    for (int64_t k = 0; k < chunks; ++k) {
      for (int j = 0; j < kSums; ++j) {
        const acc_t* row = pp + (k * kSums + j) * U;
        for (int64_t c = c0; c < c1; ++c) {
          acc_t total = 0;
          for (int64_t b = 0; b < per_unit; ++b) total += row[c * per_unit + b];
          sp[j * C + c] += total;
        }
      }
    }
  });
  const acc_t count = static_cast<acc_t>(A * B);
  acc_t penalty = 0;
  for (int64_t c = 0; c < C && A * B > 0; ++c) {
    penalty += mean ? sp[3 * C + c] / count : sp[3 * C + c];
    sp[3 * C + c] = count;
  }
  at::Tensor value = at::empty({}, acc_options);
  *value.mutable_data_ptr<acc_t>() = penalty;
  return {value, sums};
}

// ---- backward --------------------------------------------------------------------------

// The gradient of n elements; kPerUnit: element i is unit i (mu0, mu1, mid, w_gap are arrays),
// else all elements share one unit (they point to one value each). go: grad of relu(y), or null.
// huge_mu: some |mu| is above `safe` (or not finite), so every element takes guarded_gradient;
// else the vector loop leaves for a loop of guarded_gradient at the first y above `safe`, so that
// the common loop holds no more than it needs.
template <typename scalar_t, typename acc_t, bool kPerUnit, bool kGradOut>
void gradient_run(const scalar_t* y, const scalar_t* go, acc_t* g, int64_t n, acc_t w,
                  const acc_t* mu0, int64_t stride, acc_t safe, bool huge_mu) {
  using Vec = Vectorized<acc_t>;
  if (n <= 0) return;
  const acc_t *mu1 = mu0 + stride, *mid = mu1 + stride, *w_gap = mid + stride;
  // one unit's coefficients held in registers (read through the pointers, the compiler would
  // reload them after every store to g)
  const BackwardCoef<Vec> unit{Vec(*mu0), Vec(*mu1), Vec(*mid), Vec(*w_gap), Vec(2 * w)};
  auto coef_at = [&](int64_t i) {
    return kPerUnit ? BackwardCoef<Vec>{Vec::loadu(mu0 + i), Vec::loadu(mu1 + i),
                                        Vec::loadu(mid + i), Vec::loadu(w_gap + i), unit.two_w}
                    : unit;
  };
  auto relu_grad = [&](const Vec& v, int64_t i) {
    return kGradOut ? where_positive(v, load_vec<acc_t>(go + i)) : Vec(0);
  };
  int64_t i = 0;
  if (!huge_mu) {
    const Vec safe_v(safe);
    for (; i + Vec::size() <= n; i += Vec::size()) {
      prefetch(y + i + kPrefetch);
      if constexpr (kGradOut) prefetch(go + i + kPrefetch);
      const Vec v = load_vec<acc_t>(y + i);
      if (any_huge(v, safe_v)) break;
      gradient(v, relu_and_probs(v), coef_at(i), relu_grad(v, i)).store(g + i);
    }
  }
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec v = load_vec<acc_t>(y + i);
    guarded_gradient(v, relu_and_probs(v), coef_at(i), relu_grad(v, i)).store(g + i);
  }
  for (; i < n; ++i) {
    const int64_t j = kPerUnit ? i : 0;
    const BackwardCoef<acc_t> k{mu0[j], mu1[j], mid[j], w_gap[j], 2 * w};
    const acc_t yi = static_cast<acc_t>(y[i]);
    const acc_t relu = kGradOut ? where_positive(yi, static_cast<acc_t>(go[i])) : acc_t(0);
    g[i] = huge_mu || any_huge(yi, safe) ? guarded_gradient(yi, relu_and_probs(yi), k, relu)
                                         : gradient(yi, relu_and_probs(yi), k, relu);
  }
}

template <typename scalar_t>
at::Tensor backward_impl(const at::Tensor& grad_penalty, const at::Tensor& y_in,
                         const at::Tensor& mu_in, bool mean,
                         const std::optional<at::Tensor>& grad_out_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto [A, C, B] = check_inputs(y_in, mu_in);
  const at::Tensor y = y_in.contiguous();
  const at::TensorOptions acc_options = y.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor mu = contiguous_as(mu_in, acc_options.dtype().toScalarType());
  // a CPU scalar (no device synchronisation), read directly where it is one of acc_t
  acc_t w = grad_penalty.numel() == 1 && grad_penalty.device().is_cpu() &&
                    grad_penalty.scalar_type() == acc_options.dtype().toScalarType() &&
                    !grad_penalty._is_zerotensor() && !grad_penalty.is_neg()
                ? *grad_penalty.const_data_ptr<acc_t>()
                : grad_penalty.item<acc_t>();
  if (mean && A * B > 0) w /= static_cast<acc_t>(A * B);

  // Rows of length L: with lanes (B < kShortRun), a block of `per_row` rows of U = C * B
  // elements (several short rows taken as one, so that a narrow layer, C = 16, does not pay the
  // per-row overhead every 16 elements); else the run of one unit.
  const bool lanes = B < kShortRun;
  const int64_t U = C * B;
  const int64_t per_row =
      lanes ? std::max<int64_t>(1, std::min(A, kTile / std::max<int64_t>(1, U))) : 1;
  const int64_t L = lanes ? per_row * U : B;
  const int64_t numel = A * C * B;
  const int64_t rows = lanes ? ceil_div(A, per_row) : A * C;

  // (mu0, mu1, h, 2 w (mu0 - mu1)) per element of a row with lanes (element j of unit
  // (j % U) / B), else per unit: rows of a (4, P) buffer. h and the gap in double, rounded once.
  const acc_t* mup = mu.const_data_ptr<acc_t>();
  const int64_t P = lanes ? L : C;
  const Buffer<acc_t> coef = aligned_buffer<acc_t>(4 * P);
  // the common loop's bound on y and |mu| (see gradient()): its products stay finite below it
  const acc_t safe = kSquareSafe<acc_t> / std::sqrt(std::max(acc_t(1), std::abs(w)));
  bool huge_mu = false;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t mu0 = mup[c], mu1 = mup[C + c];
    const acc_t mid = static_cast<acc_t>(0.5 * (static_cast<double>(mu0) + mu1));
    const acc_t w_gap = static_cast<acc_t>(2.0 * w * (static_cast<double>(mu0) - mu1));
    const int64_t width = lanes ? B : 1, stride = lanes ? U : C;  // unit c's lanes in a row
    for (int64_t b = 0; b < width; ++b) {
      for (int64_t j = c * width + b; j < P; j += stride) {
        coef[j] = mu0;
        coef[P + j] = mu1;
        coef[2 * P + j] = mid;
        coef[3 * P + j] = w_gap;
      }
    }
    huge_mu |= !(std::abs(mu0) <= safe && std::abs(mu1) <= safe);
  }

  at::Tensor grad_out;
  if (grad_out_in.has_value()) {
    TORCH_CHECK(grad_out_in->sizes() == y.sizes(), "shade_ops: grad_out must have y's shape");
    grad_out = contiguous_as(*grad_out_in, y.scalar_type());
  }
  const scalar_t* gop = grad_out.defined() ? grad_out.const_data_ptr<scalar_t>() : nullptr;
  at::Tensor grad = at::empty(y.sizes(), y.options());
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  scalar_t* gp = grad.mutable_data_ptr<scalar_t>();

  const int64_t grain =
      numel <= kSerial ? rows : std::max<int64_t>(1, kGrain / std::max<int64_t>(1, L));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    int64_t unit = lanes ? 0 : begin % C;  // row r's unit r % C, counted rather than divided
    for (int64_t r = begin; r < end; ++r, unit = lanes || unit + 1 < C ? unit + 1 : 0) {
      const int64_t offset = r * L, length = std::min(L, numel - offset);
      // float16 / bfloat16: y (and grad_out) converted as they are loaded, the gradient written
      // kTile floats at a time into a buffer that stays in L1 and rounded from there, 16 at a time
      // (rounded in the gradient's loop, 8 at a time, it spilled that loop's registers: slower)
      constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
      const int64_t step = kSame ? std::max<int64_t>(length, 1) : kTile;
      acc_t gbuf[kSame ? 1 : kTile];
      for (int64_t i = 0; i < length; i += step) {
        const int64_t n = std::min(step, length - i);
        const scalar_t* y = yp + offset + i;
        const scalar_t* go = gop != nullptr ? gop + offset + i : nullptr;
        acc_t* g;
        if constexpr (kSame) {
          g = gp + offset + i;
        } else {
          g = gbuf;
        }
        const int64_t c = lanes ? i : unit;  // the (first) lane or unit
        const acc_t* mu0 = coef.get() + c;    // then mu1, h, w_gap, P apart
        if (lanes && go != nullptr) {
          gradient_run<scalar_t, acc_t, true, true>(y, go, g, n, w, mu0, P, safe, huge_mu);
        } else if (lanes) {
          gradient_run<scalar_t, acc_t, true, false>(y, go, g, n, w, mu0, P, safe, huge_mu);
        } else if (go != nullptr) {
          gradient_run<scalar_t, acc_t, false, true>(y, go, g, n, w, mu0, P, safe, huge_mu);
        } else {
          gradient_run<scalar_t, acc_t, false, false>(y, go, g, n, w, mu0, P, safe, huge_mu);
        }
        if constexpr (!kSame) at::vec::convert(gbuf, gp + offset + i, n);
      }
    }
  });
  return grad;
}

// ---- the state update -----------------------------------------------------------------

// update_state for contiguous CPU buffers: one loop over the units, in double, with the guards of
// SPEC section 4 (a composite of ATen ops costs tens of microseconds a layer in op overhead).
void update_state_cpu(at::Tensor& p, at::Tensor& mu, const at::Tensor& sums, double decay) {
  if (!p.is_contiguous() || !mu.is_contiguous() || p.scalar_type() != mu.scalar_type()) {
    update_state(p, mu, sums, decay);
    return;
  }
  TORCH_CHECK(p.dim() == 2 && p.size(0) == 2 && mu.sizes() == p.sizes(),
              "update_state: p and mu must have shape (2, C)");
  const int64_t C = p.size(1);
  TORCH_CHECK(sums.dim() == 2 && sums.size(0) == 4 && sums.size(1) == C,
              "update_state: sums must have shape (4, C)");
  // the sums in their own dtype (float32, or float64 for float64 y), read as doubles
  const bool sums_double = sums.scalar_type() == at::kDouble;
  const at::Tensor s = contiguous_as(sums, sums_double ? at::kDouble : at::kFloat);
  const double* sd = sums_double ? s.const_data_ptr<double>() : nullptr;
  const float* sf = sums_double ? nullptr : s.const_data_ptr<float>();
  auto sum = [&](int64_t i) { return sd != nullptr ? sd[i] : static_cast<double>(sf[i]); };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "update_state", [&] {
    scalar_t* pp = p.mutable_data_ptr<scalar_t>();
    scalar_t* mp = mu.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      const double count = sum(3 * C + c), s1 = sum(c);
      const double b[2] = {1 - s1 / count, s1 / count};
      const double m[2] = {sum(2 * C + c) / count, sum(C + c) / count};
      if (!(std::isfinite(b[0]) && std::isfinite(b[1]) && std::isfinite(m[0]) &&
            std::isfinite(m[1]))) {
        continue;  // a non-finite batch (or an empty one) leaves the unit as it was
      }
      for (int z = 0; z < 2; ++z) {
        const double new_p = decay * static_cast<double>(pp[z * C + c]) + (1 - decay) * b[z];
        if (new_p != 0) {  // where p_z is 0, mu_z keeps its value
          mp[z * C + c] = static_cast<scalar_t>(
              decay * static_cast<double>(mp[z * C + c]) + (1 - decay) * m[z] / new_p);
        }
        pp[z * C + c] = static_cast<scalar_t>(new_p);
      }
    }
  });
}

// ---- op entry points -------------------------------------------------------------------

// A contiguous copy of mu, the one the backward reads (the update that follows writes into mu):
// a memcpy, where clone() would go through the dispatcher and a TensorIterator.
at::Tensor copy_of(const at::Tensor& mu) {
  if (!mu.is_contiguous()) return mu.clone(at::MemoryFormat::Contiguous);
  at::Tensor copy = at::empty(mu.sizes(), mu.options());
  std::memcpy(copy.mutable_data_ptr(), mu.const_data_ptr(), mu.nbytes());
  return copy;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> penalty_forward(const at::Tensor& y,
                                                               const at::Tensor& mu,
                                                               c10::string_view reduction) {
  const bool mean = is_mean(reduction);
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "penalty_forward",
                                  [&] { result = forward_impl<scalar_t>(y, mu, mean, nullptr); });
  return {std::get<0>(result), std::get<1>(result), copy_of(mu)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> relu_penalty_forward(
    const at::Tensor& y, const at::Tensor& mu, c10::string_view reduction) {
  const bool mean = is_mean(reduction);
  auto out = at::empty(y.sizes(), y.options());
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "relu_penalty_forward",
                                  [&] { result = forward_impl<scalar_t>(y, mu, mean, &out); });
  return {std::get<0>(result), std::get<1>(result), out, copy_of(mu)};
}

at::Tensor penalty_backward(const at::Tensor& grad_penalty, const at::Tensor& y,
                            const at::Tensor& mu, c10::string_view reduction,
                            const std::optional<at::Tensor>& grad_out) {
  const bool mean = is_mean(reduction);
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "penalty_backward", [&] {
    result = backward_impl<scalar_t>(grad_penalty, y, mu, mean, grad_out);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(shade_ops, CPU, m) {
  m.impl("penalty_forward", &penalty_forward);
  m.impl("relu_penalty_forward", &relu_penalty_forward);
  m.impl("penalty_backward", &penalty_backward);
  m.impl("update_state", &update_state_cpu);
}

}  // namespace shade_ops
