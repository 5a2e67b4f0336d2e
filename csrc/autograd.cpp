// The autograd formulas of penalty_forward and relu_penalty_forward, for every device.
//
// Written in C++ rather than with torch.library.register_autograd: a Python formula costs tens of
// microseconds a call on each of the forward and the backward, which a network with a ShadeReLU
// per layer pays at every layer. torch.compile traces these like any other autograd kernel.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace shade_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_backward(const at::Tensor& grad_penalty, const at::Tensor& y, const at::Tensor& mu,
                         c10::string_view reduction, const std::optional<at::Tensor>& grad_out) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("shade_ops::penalty_backward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            c10::string_view, const std::optional<at::Tensor>&)>();
  return op.call(grad_penalty, y, mu, reduction, grad_out);
}

// The same gradient from differentiable ops, for a backward that is itself differentiated.
at::Tensor call_differentiable_backward(const at::Tensor& grad_penalty, const at::Tensor& y,
                                        const at::Tensor& mu, c10::string_view reduction,
                                        const std::optional<at::Tensor>& grad_out) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("shade_ops::differentiable_penalty_backward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            c10::string_view, const std::optional<at::Tensor>&)>();
  return op.call(grad_penalty, y, mu, reduction, grad_out);
}

// What both forwards save: y, the copy of mu (never mu itself, which the state update that
// follows writes into) and the reduction. Gradients are not materialised: a penalty left out of
// the loss, or a ShadeReLU output left unused, costs nothing in the backward.
void save(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& mu_copy,
          c10::string_view reduction) {
  ctx->save_for_backward({y, mu_copy});
  ctx->saved_data["reduction"] = std::string(reduction);
  ctx->set_materialize_grads(false);
}

// grad_y from the gradients of the penalty and of relu(y); either may be undefined.
at::Tensor grad_y(AutogradContext* ctx, const at::Tensor& grad_penalty,
                  const std::optional<at::Tensor>& grad_out) {
  const auto saved = ctx->get_saved_variables();
  const at::Tensor& y = saved[0];
  if (!grad_penalty.defined()) {
    if (!grad_out.has_value() || !grad_out->defined()) return at::Tensor();
    return at::threshold_backward(*grad_out, y, 0);  // the ReLU's backward alone
  }
  const std::string& reduction = ctx->saved_data["reduction"].toStringRef();
  std::optional<at::Tensor> go;
  if (grad_out.has_value() && grad_out->defined()) go = grad_out;
  // create_graph=True: the fused kernel has no derivative of its own, so build this gradient
  // from ops that autograd can differentiate again (grad of grad is then exact).
  if (at::GradMode::is_enabled()) {
    return call_differentiable_backward(grad_penalty, y, saved[1], reduction, go);
  }
  return call_backward(grad_penalty, y, saved[1], reduction, go);
}

class Penalty : public torch::autograd::Function<Penalty> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& mu,
                               const std::string& reduction) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("shade_ops::penalty_forward", "")
                               .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, c10::string_view)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [value, sums, mu_copy] = op.call(y, mu, reduction);
    save(ctx, y, mu_copy, reduction);
    ctx->mark_non_differentiable({sums, mu_copy});
    return {value, sums, mu_copy};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {grad_y(ctx, grads[0], std::nullopt), at::Tensor(), at::Tensor()};
  }
};

class ReluPenalty : public torch::autograd::Function<ReluPenalty> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& mu,
                               const std::string& reduction) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("shade_ops::relu_penalty_forward", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, c10::string_view)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [value, sums, out, mu_copy] = op.call(y, mu, reduction);
    save(ctx, y, mu_copy, reduction);
    ctx->mark_non_differentiable({sums, mu_copy});
    return {value, sums, out, mu_copy};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {grad_y(ctx, grads[0], grads[2]), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> penalty_forward_autograd(
    const at::Tensor& y, const at::Tensor& mu, c10::string_view reduction) {
  auto result = Penalty::apply(y, mu, std::string(reduction));
  return {result[0], result[1], result[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> relu_penalty_forward_autograd(
    const at::Tensor& y, const at::Tensor& mu, c10::string_view reduction) {
  auto result = ReluPenalty::apply(y, mu, std::string(reduction));
  return {result[0], result[1], result[2], result[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(shade_ops, Autograd, m) {
  m.impl("penalty_forward", &penalty_forward_autograd);
  m.impl("relu_penalty_forward", &relu_penalty_forward_autograd);
}

}  // namespace shade_ops
