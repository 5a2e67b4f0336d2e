// The op schemas of shade_ops, declared once for every backend, and the state update.
//
// Every op takes the activations as (A, C, B): C units, each with K = A * B samples; or as
// (A, C, ...), whose trailing dims merge into B, which spares a contiguous NCHW tensor a view
// (and its autograd node). shade_ops/_layout.py builds the argument once in Python for every
// backend. relu(y) and the gradient come back in y's shape, contiguous.
#include <ATen/ATen.h>
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

// The vector instructions the CPU kernels were compiled for (setup.py picks them).
#if defined(CPU_CAPABILITY_AVX512)
#define SHADE_OPS_CPU_CAPABILITY "avx512"
#elif defined(CPU_CAPABILITY_AVX2)
#define SHADE_OPS_CPU_CAPABILITY "avx2"
#else
#define SHADE_OPS_CPU_CAPABILITY "default"
#endif

// The torch this library was compiled against (setup.py passes it as a token).
#define SHADE_OPS_STR_(x) #x
#define SHADE_OPS_STR(x) SHADE_OPS_STR_(x)
#ifdef SHADE_OPS_TORCH_VERSION
#define SHADE_OPS_BUILT_FOR SHADE_OPS_STR(SHADE_OPS_TORCH_VERSION)
#else
#define SHADE_OPS_BUILT_FOR "unknown"
#endif

// What shade_ops/_registry.py reads from the library file *before* loading it: a library built for
// another torch may fail to load or crash, and one built for instructions this CPU lacks would die
// on an illegal instruction, possibly in its static initialisers.
extern "C" __attribute__((used, visibility("default"))) const char shade_ops_build_info[] =
    "shade_ops-build-info:torch=" SHADE_OPS_BUILT_FOR ";isa=" SHADE_OPS_CPU_CAPABILITY ";";

// An importable module, so that `import shade_ops._C` loads the op registrations below; it says
// which instructions it needs in CPU_CAPABILITY and which torch it was built for in
// TORCH_VERSION.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr &&
      (PyModule_AddStringConstant(m, "CPU_CAPABILITY", SHADE_OPS_CPU_CAPABILITY) < 0 ||
       PyModule_AddStringConstant(m, "TORCH_VERSION", SHADE_OPS_BUILT_FOR) < 0)) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

namespace shade_ops {

// Algorithm 1 of the paper, with the guards of SPEC section 4, on the device of the state:
// element-wise ATen ops only, so no value is ever read back to the host.
void update_state(at::Tensor& p, at::Tensor& mu, const at::Tensor& sums, double decay) {
  TORCH_CHECK(p.dim() == 2 && p.size(0) == 2, "update_state: p must have shape (2, C)");
  TORCH_CHECK(mu.sizes() == p.sizes(), "update_state: mu must have the shape of p");
  TORCH_CHECK(sums.dim() == 2 && sums.size(0) == 4 && sums.size(1) == p.size(1),
              "update_state: sums must have shape (4, C)");
  const auto compute = at::promote_types(p.scalar_type(), sums.scalar_type());
  const auto s = sums.to(compute);
  const auto old_p = p.to(compute);
  const auto old_mu = mu.to(compute);
  const auto count = s[3];
  const auto b1 = s[0] / count;
  const auto batch_p = at::stack({1 - b1, b1});             // (b0, b1)
  const auto batch_m = at::stack({s[2], s[1]}) / count;     // (m0, m1)
  const auto finite = at::isfinite(batch_p).all(0) & at::isfinite(batch_m).all(0);
  const auto new_p = decay * old_p + (1 - decay) * batch_p;
  auto new_mu = decay * old_mu + (1 - decay) * batch_m / new_p;
  new_mu = at::where(new_p != 0, new_mu, old_mu);
  p.copy_(at::where(finite, new_p, old_p));
  mu.copy_(at::where(finite, new_mu, old_mu));
}

// update_state for every state of a forward, in one call from Python (a model with a hundred call
// sites paid a Python op call, a few microseconds, per site). Each goes through the dispatcher, so
// CPU buffers take the native kernel and others the composite above.
void update_states(at::TensorList p, at::TensorList mu, at::TensorList sums,
                   at::ArrayRef<double> decay) {
  TORCH_CHECK(mu.size() == p.size() && sums.size() == p.size() && decay.size() == p.size(),
              "update_states: p, mu, sums and decay must have one entry per state");
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("shade_ops::update_state", "")
                             .typed<void(at::Tensor&, at::Tensor&, const at::Tensor&, double)>();
  for (size_t i = 0; i < p.size(); ++i) {
    at::Tensor p_i = p[i], mu_i = mu[i];
    op.call(p_i, mu_i, sums[i], decay[i]);
  }
}

TORCH_LIBRARY(shade_ops, m) {
  // The penalty of SPEC section 2, the per-unit batch sums (sum s, sum s*y, sum q*y, K) as a
  // (4, C) tensor, in one pass over y, and a copy of mu: autograd saves that copy for the
  // backward, because the state update that follows writes into mu itself (under torch.compile a
  // saved graph input would see that write).
  m.def("penalty_forward(Tensor y, Tensor mu, str reduction) -> (Tensor, Tensor, Tensor)");
  // The same, with relu(y) written in the same pass: the fused ShadeReLU.
  m.def(
      "relu_penalty_forward(Tensor y, Tensor mu, str reduction) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // d penalty / d y times grad_penalty (SPEC section 3), plus grad_out * (y > 0) when grad_out
  // is given (the backward of the fused ShadeReLU). Returns a contiguous tensor of y's shape.
  m.def(
      "penalty_backward(Tensor grad_penalty, Tensor y, Tensor mu, str reduction, "
      "Tensor? grad_out=None) -> Tensor");
  m.def("update_state(Tensor(a!) p, Tensor(b!) mu, Tensor sums, float decay) -> ()");
  m.def(
      "update_states(Tensor(a!)[] p, Tensor(b!)[] mu, Tensor[] sums, float[] decay) -> ()");
  // penalty_backward written with differentiable ATen ops (SPEC section 3 term by term), for
  // double backward: the autograd formulas call it instead of penalty_backward when the backward
  // itself is being differentiated (create_graph=True). Its CompositeImplicitAutograd kernel is
  // Python (shade_ops/reference.py, registered by shade_ops/_ops.py).
  m.def(
      "differentiable_penalty_backward(Tensor grad_penalty, Tensor y, Tensor mu, str reduction, "
      "Tensor? grad_out=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(shade_ops, CompositeExplicitAutograd, m) {
  m.impl("update_state", &update_state);
  m.impl("update_states", &update_states);
}

}  // namespace shade_ops
