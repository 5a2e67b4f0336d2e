// relu(y) and the two probabilities s = 1 - exp(-relu(y)) and q = exp(-relu(y)) for the loops,
// inline, so that the vector registers live across them.
//
// ATen's Vectorized<float>::exp() calls Sleef, and around that call every live vector register is
// spilled to the stack: in these kernels that costs more than the exp itself. exp_u20() is inline
// but 20 ulp. Here, for float on AVX2 and AVX-512: Cody-Waite range reduction,
// exp(x) = 1 + x + x^2 P(x) on [-ln2/2, ln2/2] with P of degree 4 fitted for relative error, and
// the scaling by 2^n. Within 1.3 ulp of exp over every float in [-87, 0] (checked exhaustively);
// exp(-r) for r > 87, under 1.7e-38, is returned as 0 (or, on AVX2 up to r = 87.7, as the
// nearby subnormal). The argument is never negated: the reduction folds the sign into its first
// fused multiply-add.
//
// s needs a relative accuracy where r is tiny (s (y - mu1)^2 is most of the penalty there when mu1
// is far), which 1 - q has not: it keeps an absolute one, a 3% error at r = 1e-6. Below ln2/2 the
// reduction leaves x = -r (n = 0), and x + x^2 P(x) is expm1(-r) to a relative accuracy: s is its
// negation there. Above, s = 1 - q (AVX-512) or (1 - 2^n) - 2^n expm1(x) (AVX2, one operation
// fewer). Within 1 ulp on AVX2 (checked exhaustively, `make exp-ulp`). Elsewhere (scalars,
// double, builds without AVX2) s is a Taylor polynomial of -expm1(-r) below 1/4 and 1 - q above.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace shade_ops {

template <typename T>
struct ReluProbs {
  T r;  // relu(y); NaN stays NaN
  T s;  // p(Z=1 | y) = 1 - exp(-r), to a relative accuracy (any value where y is NaN)
  T q;  // p(Z=0 | y) = exp(-r), to a relative accuracy (any value where y is NaN: the NaN reaches
        // the sums through y)
};

namespace detail {
// a b + c, for scalars and vectors
template <typename V>
inline V mul_add(const V& a, const V& b, const V& c) {
  if constexpr (std::is_arithmetic_v<V>) {
    return a * b + c;
  } else {
    return at::vec::fmadd(a, b, c);
  }
}

// Below it, s is the polynomial of minus_expm1_small; above, 1 - q (within 2.5 ulp there).
constexpr double kSmall = 0.25;

// -expm1(-r) = r - r^2/2 + r^3/6 - ... for 0 <= r < 1/4: the Taylor polynomial of degree 6 for
// float (within 5.3e-8 relative) and 12 for double (within 1.2e-17).
template <typename T, typename V>
inline V minus_expm1_small(const V& r) {
  V p;
  if constexpr (std::is_same_v<T, double>) {
    p = mul_add(r, V(-1.0 / 479001600), V(1.0 / 39916800));
    p = mul_add(p, r, V(-1.0 / 3628800));
    p = mul_add(p, r, V(1.0 / 362880));
    p = mul_add(p, r, V(-1.0 / 40320));
    p = mul_add(p, r, V(1.0 / 5040));
    p = mul_add(p, r, V(-1.0 / 720));
    p = mul_add(p, r, V(1.0 / 120));
  } else {
    p = mul_add(r, V(T(-1.0 / 720)), V(T(1.0 / 120)));
  }
  p = mul_add(p, r, V(T(-1.0 / 24)));
  p = mul_add(p, r, V(T(1.0 / 6)));
  p = mul_add(p, r, V(T(-0.5)));
  p = mul_add(p, r, V(T(1)));
  return p * r;
}
}  // namespace detail

template <typename T>
inline ReluProbs<T> relu_and_probs(T y) {
  const T r = y != y ? y : std::max(y, T(0));
  const T q = std::exp(-r);
  return {r, r < T(detail::kSmall) ? detail::minus_expm1_small<T>(r) : T(1) - q, q};
}

template <typename T>
inline ReluProbs<at::vec::Vectorized<T>> relu_and_probs(const at::vec::Vectorized<T>& y) {
  using Vec = at::vec::Vectorized<T>;
  const Vec zero(T(0));
  const Vec r = at::vec::maximum(y, zero);
  const Vec q = (zero - at::vec::clamp_min(y, zero)).exp();
  const Vec s = Vec::blendv(Vec(T(1)) - q, detail::minus_expm1_small<T>(r),
                            r < Vec(T(detail::kSmall)));
  return {r, s, q};
}

namespace detail {
// exp(x) = 1 + x + x^2 P(x) on [-ln2/2, ln2/2]
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;  // few mantissa bits: n * kLn2Hi is exact
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kP[5] = {1.3814185513183475e-3f, 8.368914015591145e-3f, 4.166840761899948e-2f,
                         1.666651964187622e-1f, 4.999999403953552e-1f};
constexpr float kLargest = 87.0f;  // exp(-87) is near the smallest normal float
constexpr float kClamp = 88.0f;    // -88 log2(e) rounds to -127: a scale of 0
constexpr float kRoundMagic = 12582912.0f + 127.0f;  // 1.5 2^23 + 127: see below
}  // namespace detail

#if defined(CPU_CAPABILITY_AVX512) && !defined(_MSC_VER)
template <>
inline ReluProbs<at::vec::Vectorized<float>> relu_and_probs(const at::vec::Vectorized<float>& y) {
  using namespace detail;
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  const __m512 r = _mm512_max_ps(zero, y);  // the second operand where NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(r, _mm512_set1_ps(-kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 x = _mm512_fnmsub_ps(n, _mm512_set1_ps(kLn2Hi), r);  // -r - n ln2, in two steps
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), x);
  __m512 p = _mm512_set1_ps(kP[0]);
  for (int i = 1; i < 5; ++i) p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(kP[i]));
  const __m512 expm1 = _mm512_fmadd_ps(p, _mm512_mul_ps(x, x), x);  // exp(x) - 1
  const __mmask16 in_range = _mm512_cmp_ps_mask(r, _mm512_set1_ps(kLargest), _CMP_LE_OQ);
  const __m512 q = _mm512_maskz_scalef_ps(in_range, _mm512_add_ps(expm1, one), n);
  // n == 0 (r < ln2/2): s = -expm1(-r); else 1 - q
  const __mmask16 small = _mm512_cmp_ps_mask(n, zero, _CMP_EQ_OQ);
  return {r, _mm512_mask_sub_ps(_mm512_sub_ps(one, q), small, zero, expm1), q};
}
#elif defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
template <>
inline ReluProbs<at::vec::Vectorized<float>> relu_and_probs(const at::vec::Vectorized<float>& y) {
  using namespace detail;
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 r = _mm256_max_ps(_mm256_setzero_ps(), y);  // the second operand where NaN
  // r clamped to 88 (NaN too): there n = -127 and the scale 2^n below is 0, so q = 0 and s = 1
  const __m256 clamped = _mm256_min_ps(r, _mm256_set1_ps(kClamp));
  // n = round(-r log2(e)) as the low bits of t = -r log2(e) + 1.5 2^23 + 127 (the addition
  // rounds to an integer), which also hold n + 127, the exponent field of 2^n
  const __m256 magic = _mm256_set1_ps(kRoundMagic);
  const __m256 t = _mm256_fmadd_ps(clamped, _mm256_set1_ps(-kLog2e), magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  __m256 x = _mm256_fnmsub_ps(n, _mm256_set1_ps(kLn2Hi), clamped);  // -r - n ln2, in two steps
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), x);
  // P(x) in Estrin's order, a shorter chain of dependent operations than Horner's: these loops
  // are bound by that chain more than by the operations
  const __m256 x2 = _mm256_mul_ps(x, x);
  const __m256 low = _mm256_fmadd_ps(_mm256_set1_ps(kP[3]), x, _mm256_set1_ps(kP[4]));
  const __m256 mid = _mm256_fmadd_ps(_mm256_set1_ps(kP[1]), x, _mm256_set1_ps(kP[2]));
  const __m256 high = _mm256_fmadd_ps(_mm256_set1_ps(kP[0]), x2, mid);
  const __m256 p = _mm256_fmadd_ps(high, x2, low);
  const __m256 expm1 = _mm256_fmadd_ps(p, x2, x);  // exp(x) - 1
  const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23));
  // q = 2^n (1 + expm1), s = 1 - q = (1 - 2^n) - 2^n expm1: -expm1 itself where n = 0
  const __m256 q = _mm256_fmadd_ps(expm1, scale, scale);
  const __m256 s = _mm256_fnmadd_ps(scale, expm1, _mm256_sub_ps(one, scale));
  return {r, s, q};
}
#endif

}  // namespace shade_ops
