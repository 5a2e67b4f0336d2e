// Exhaustive accuracy check of relu_and_probs (csrc/vec_exp.h): q = exp(-r) and s = 1 - exp(-r)
// for every float r in [0, 87], against double, in units in the last place of the float result.
//
//   make exp-ulp      (builds this for the same instruction set as the extension, then runs it)
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "../vec_exp.h"

namespace {

struct Worst {
  double ulps = 0;
  float at = 0;
  void add(float actual, double exact, float r) {
    const float rounded = static_cast<float>(exact);
    const double ulp = std::nextafter(rounded, INFINITY) - rounded;
    const double error = std::fabs(actual - exact) / ulp;
    if (error > ulps) ulps = error, at = r;
  }
};

}  // namespace

int main() {
  using Vec = at::vec::Vectorized<float>;
  constexpr int kLanes = Vec::size();
  float in[kLanes], q[kLanes], s[kLanes];
  uint32_t last;
  const float largest = 87.0f;
  std::memcpy(&last, &largest, sizeof last);
  Worst worst_q, worst_s;
  for (uint64_t bits = 0; bits <= last; bits += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const uint32_t b = static_cast<uint32_t>(std::min<uint64_t>(bits + k, last));
      std::memcpy(&in[k], &b, sizeof b);
    }
    const auto probs = shade_ops::relu_and_probs(Vec::loadu(in));
    probs.q.store(q);
    probs.s.store(s);
    for (int k = 0; k < kLanes; ++k) {
      worst_q.add(q[k], std::exp(-static_cast<double>(in[k])), in[k]);
      if (in[k] > 0) worst_s.add(s[k], -std::expm1(-static_cast<double>(in[k])), in[k]);
    }
  }
  std::printf("exp(-r), r in [0, 87], %d lanes: largest error %.3f ulp, at r = %.9g\n", kLanes,
              worst_q.ulps, worst_q.at);
  std::printf("1 - exp(-r), r in (0, 87]: largest error %.3f ulp, at r = %.9g\n", worst_s.ulps,
              worst_s.at);
  return worst_q.ulps <= 2.0 && worst_s.ulps <= 3.0 ? 0 : 1;
}
