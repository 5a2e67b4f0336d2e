// Exhaustive accuracy check of relu_and_q's exp (csrc/vec_exp.h): q = exp(-r) for every float r
// in [0, 87], against exp in double, in units in the last place of the float result.
//
//   make exp-ulp      (builds this for the same instruction set as the extension, then runs it)
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "../vec_exp.h"

int main() {
  using Vec = at::vec::Vectorized<float>;
  constexpr int kLanes = Vec::size();
  float in[kLanes], out[kLanes];
  uint32_t last;
  const float largest = 87.0f;
  std::memcpy(&last, &largest, sizeof last);
  double worst = 0;
  float worst_at = 0;
  for (uint64_t bits = 0; bits <= last; bits += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const uint32_t b = static_cast<uint32_t>(std::min<uint64_t>(bits + k, last));
      std::memcpy(&in[k], &b, sizeof b);
    }
    shade_ops::relu_and_q(Vec::loadu(in)).q.store(out);
    for (int k = 0; k < kLanes; ++k) {
      const double exact = std::exp(-static_cast<double>(in[k]));
      const float rounded = static_cast<float>(exact);
      const double ulp = std::nextafter(rounded, INFINITY) - rounded;
      const double error = std::fabs(out[k] - exact) / ulp;
      if (error > worst) worst = error, worst_at = in[k];
    }
  }
  std::printf("exp(-r), r in [0, 87], %d lanes: largest error %.3f ulp, at r = %.9g\n", kLanes,
              worst, worst_at);
  return worst <= 2.0 ? 0 : 1;
}
