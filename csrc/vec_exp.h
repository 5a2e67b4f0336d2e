// relu(y) and q = exp(-relu(y)) for the vector loops, inline, so that the vector registers live
// across them.
//
// ATen's Vectorized<float>::exp() calls Sleef, and around that call every live vector register is
// spilled to the stack: in these kernels that costs more than the exp itself. exp_u20() is inline
// but 20 ulp. Here, for float on AVX2 and AVX-512: Cody-Waite range reduction,
// exp(x) = 1 + x + x^2 P(x) on [-ln2/2, ln2/2] with P of degree 4 fitted for relative error, and
// the scaling by 2^n. Within 1.3 ulp of exp over every float in [-87, 0] (checked exhaustively);
// exp(-r) for r > 87, under 1.7e-38, is returned as 0. The argument is never negated: the
// reduction folds the sign into its first fused multiply-add.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>

namespace shade_ops {

template <typename T>
struct ReluQ {
  T r;  // relu(y); NaN stays NaN
  T q;  // exp(-relu(y)); any value where y is NaN (the NaN reaches the sums through y)
};

template <typename T>
inline ReluQ<T> relu_and_q(T y) {
  const T r = y != y ? y : std::max(y, T(0));
  return {r, std::exp(-r)};
}

template <typename T>
inline ReluQ<at::vec::Vectorized<T>> relu_and_q(const at::vec::Vectorized<T>& y) {
  using Vec = at::vec::Vectorized<T>;
  const Vec zero(T(0));
  return {at::vec::maximum(y, zero), (zero - at::vec::clamp_min(y, zero)).exp()};
}

namespace detail {
// exp(x) = 1 + x + x^2 P(x) on [-ln2/2, ln2/2]
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;  // few mantissa bits: n * kLn2Hi is exact
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kP[5] = {1.3814185513183475e-3f, 8.368914015591145e-3f, 4.166840761899948e-2f,
                         1.666651964187622e-1f, 4.999999403953552e-1f};
constexpr float kLargest = 87.0f;  // exp(-87) is near the smallest normal float
}  // namespace detail

#if defined(CPU_CAPABILITY_AVX512) && !defined(_MSC_VER)
template <>
inline ReluQ<at::vec::Vectorized<float>> relu_and_q(const at::vec::Vectorized<float>& y) {
  using namespace detail;
  const __m512 r = _mm512_max_ps(_mm512_setzero_ps(), y);  // the second operand where NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(r, _mm512_set1_ps(-kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 x = _mm512_fnmsub_ps(n, _mm512_set1_ps(kLn2Hi), r);  // -r - n ln2, in two steps
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), x);
  __m512 p = _mm512_set1_ps(kP[0]);
  for (int i = 1; i < 5; ++i) p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(kP[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  const __mmask16 in_range = _mm512_cmp_ps_mask(r, _mm512_set1_ps(kLargest), _CMP_LE_OQ);
  return {r, _mm512_maskz_scalef_ps(in_range, p, n)};
}
#elif defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
template <>
inline ReluQ<at::vec::Vectorized<float>> relu_and_q(const at::vec::Vectorized<float>& y) {
  using namespace detail;
  const __m256 r = _mm256_max_ps(_mm256_setzero_ps(), y);  // the second operand where NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(r, _mm256_set1_ps(-kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 x = _mm256_fnmsub_ps(n, _mm256_set1_ps(kLn2Hi), r);  // -r - n ln2, in two steps
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), x);
  __m256 p = _mm256_set1_ps(kP[0]);
  for (int i = 1; i < 5; ++i) p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(kP[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i scale = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 q = _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
  // r > 87, inf or NaN: the scale above is garbage; 0 instead
  return {r, _mm256_and_ps(q, _mm256_cmp_ps(r, _mm256_set1_ps(kLargest), _CMP_LE_OQ))};
}
#endif

}  // namespace shade_ops
