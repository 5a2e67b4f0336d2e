// exp for the vector loops: inline, so that the vector registers live across it.
//
// ATen's Vectorized<float>::exp() calls Sleef, and around that call every live vector register
// is spilled to the stack: in these kernels that costs more than the exp itself. exp_u20() is
// inline but 20 ulp. This is the Cephes single-precision exp (Cody-Waite range reduction and a
// degree-6 polynomial, within 2 ulp), written with AVX2 intrinsics.
#pragma once

#include <ATen/cpu/vec/vec.h>

namespace shade_ops {

// exp(x) for x <= 0, never NaN (the kernels pass -max(y, 0)).
template <typename T>
inline at::vec::Vectorized<T> exp_nonpositive(const at::vec::Vectorized<T>& x) {
  return x.exp();
}

#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
template <>
inline at::vec::Vectorized<float> exp_nonpositive(const at::vec::Vectorized<float>& x) {
  const __m256 lowest = _mm256_set1_ps(-87.0f);  // exp(-87) is near the smallest normal float
  const __m256 v = _mm256_max_ps(x, lowest);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), v);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i exponent = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
  return _mm256_and_ps(result, _mm256_cmp_ps(x, lowest, _CMP_GE_OQ));  // below: 0
}
#endif

}  // namespace shade_ops
