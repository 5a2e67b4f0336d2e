"""Training recipes keep their meaning with SHADE in the model: gradient checkpointing, double
backward, deepcopy and pickle (EMA, best-model snapshots), GradScaler on a lazily sized model,
attach on modules returning tuples, and the smaller contracts of SPEC section 6 at the call."""
from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import shade_ops
from shade_ops import ShadeReLU, ShadeState, reference
from shade_ops import _checkpoint

from conftest import FUSED_BACKENDS, assert_close, random_activations

ALL_BACKENDS = ["reference", *FUSED_BACKENDS]


class Block(nn.Module):
    """A residual block reusing one ShadeReLU: two call sites inside one checkpointed segment."""

    def __init__(self, width: int = 5, backend: str = "auto") -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.act = ShadeReLU(backend=backend)

    def forward(self, x):
        return self.act(x + self.fc2(self.act(self.fc1(x))))


class Net(nn.Module):
    def __init__(self, backend: str = "auto", checkpointed: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(4, 5)
        self.blocks = nn.ModuleList([Block(backend=backend), Block(backend=backend)])
        self.out = nn.Linear(5, 3)
        self.checkpointed = checkpointed

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            if self.checkpointed is None:
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.checkpointed == "reentrant")
        return self.out(x)


def train_steps(model: nn.Module, steps: int = 3):
    """Loss, parameter gradients and every state after each step."""
    shade_ops.track(model)
    results = []
    for step in range(steps):
        x = random_activations((6, 4), seed=step)
        model.zero_grad()
        loss = model(x).square().mean() + 0.3 * shade_ops.collect(model)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()],
                        [s.mu.clone() for s in model.modules() if isinstance(s, ShadeState)],
                        [s.p.clone() for s in model.modules() if isinstance(s, ShadeState)]))
    return results


# ---- checkpointing -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_reentrant_checkpoint_gives_the_gradients_and_state_of_no_checkpoint(backend):
    plain = train_steps(Net(backend))
    checkpointed = train_steps(Net(backend, checkpointed="non-reentrant"))
    for step, (a, b) in enumerate(zip(checkpointed, plain)):
        assert_close(a[0], b[0], torch.float32, "penalty", f"step {step} loss")
        for i, (ga, gb) in enumerate(zip(a[1], b[1])):
            assert_close(ga, gb, torch.float32, "grad", f"step {step} parameter {i}")
        for i, (sa, sb) in enumerate(zip(a[2] + a[3], b[2] + b[3])):
            # bitwise: the recomputation updated nothing
            assert torch.equal(sa, sb), f"step {step} state {i}"


def test_compiled_model_with_checkpointed_blocks_matches_eager():
    torch._dynamo.reset()
    plain = train_steps(Net())
    model = shade_ops.track(Net(checkpointed="non-reentrant"))
    compiled = torch.compile(model)
    for step, expected in enumerate(plain):
        x = random_activations((6, 4), seed=step)
        model.zero_grad()
        loss = compiled(x).square().mean() + 0.3 * shade_ops.collect(model)
        loss.backward()
        assert_close(loss.detach(), expected[0], torch.float32, "penalty", f"step {step}")
        for i, (p, g) in enumerate(zip(model.parameters(), expected[1])):
            assert_close(p.grad, g, torch.float32, "grad", f"step {step} parameter {i}")
        states = [s for s in model.modules() if isinstance(s, ShadeState)]
        for i, (s, mu) in enumerate(zip(states, expected[2])):
            assert_close(s.mu, mu, torch.float32, "state", f"step {step} state {i}")


def test_reentrant_checkpoint_is_refused_at_once_naming_checkpointing():
    model = shade_ops.track(Net(checkpointed="reentrant"))
    before = [s.mu.clone() for s in model.modules() if isinstance(s, ShadeState)]
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        model(random_activations((6, 4), seed=0).requires_grad_())
    after = [s.mu for s in model.modules() if isinstance(s, ShadeState)]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_no_grad_training_forward_still_updates_the_state():
    """Not every no_grad forward is a reentrant checkpoint (BatchNorm-style calibration)."""
    act = ShadeReLU(3)
    with torch.no_grad():
        act(torch.randn(8, 3))
    assert not torch.equal(act.state.mu, ShadeState(3).mu)


def test_functional_penalty_under_checkpoint():
    state_plain, state_ckpt = ShadeState(5), ShadeState(5)
    w = torch.randn(4, 5, requires_grad=True)
    x = torch.randn(6, 4)

    def segment(x, w, state):
        return shade_ops.penalty(x @ w, state)

    grads = []
    for state, use_checkpoint in ((state_plain, False), (state_ckpt, True)):
        value = checkpoint(segment, x, w, state, use_reentrant=False) if use_checkpoint \
            else segment(x, w, state)
        grads.append(torch.autograd.grad(value, w)[0])
    assert_close(grads[1], grads[0], torch.float32, "grad")
    assert torch.equal(state_ckpt.mu, state_plain.mu) and torch.equal(state_ckpt.p, state_plain.p)


def test_checkpoint_internals_are_the_ones_shade_ops_reads():
    """The hooks of torch.utils.checkpoint that _checkpoint.py reads: a torch version that
    changes them fails here, not silently in training."""
    seen = []

    def segment(x):
        seen.append((_checkpoint._checkpoint_hooks() or ("none",))[0])
        return (x * 2).sin()

    x = torch.randn(3, requires_grad=True)
    checkpoint(segment, x, use_reentrant=False).sum().backward()
    assert seen == ["_checkpoint_hook", "_recomputation_hook"]


# ---- double backward --------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("relu", [False, True])
def test_double_backward_matches_the_reference(backend, relu):
    shape = (3, 4, 5) if backend != "triton" else (2, 3, 2)
    y = random_activations(shape, seed=1).requires_grad_()
    state = ShadeState(shape[1])
    state.mu.copy_(torch.tensor([[-0.7] * shape[1], [1.3] * shape[1]]))
    v = torch.randn(shape, generator=torch.Generator().manual_seed(2))

    def grad_dot_v(fn_backend):
        y_ = y.detach().clone().requires_grad_()
        if relu:
            out, value = shade_ops.relu_penalty(y_, state, unit_dim=1, update=False,
                                                backend=fn_backend)
            loss = value * 0.7 + (out * v).sum()
        else:
            loss = shade_ops.penalty(y_, state, update=False, backend=fn_backend) * 0.7
        (g,) = torch.autograd.grad(loss, y_, create_graph=True)
        (hv,) = torch.autograd.grad((g * v).sum(), y_)
        return g.detach(), hv

    g, hv = grad_dot_v(backend)
    g_ref, hv_ref = grad_dot_v("reference")
    assert_close(g, g_ref, torch.float32, "grad", "gradient")
    assert_close(hv, hv_ref, torch.float32, "grad", "Hessian-vector product")


# ---- deepcopy, pickle, EMA ------------------------------------------------------------------

def test_deepcopy_and_pickle_at_any_point_of_a_step():
    model = shade_ops.convert(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5),
                                            nn.ReLU()))
    ema = copy.deepcopy(model)  # before any forward
    x = random_activations((6, 4), seed=0)
    loss = model(x).sum() + shade_ops.collect(model)
    mid = copy.deepcopy(model)   # after the forward, graph alive
    pickled = pickle.loads(pickle.dumps(model))
    loss.backward()
    after = copy.deepcopy(model)
    for copied in (mid, pickled, after):
        assert copied[1].penalty is None  # the copy holds no graph
        assert torch.equal(copied[1].state.mu, model[1].state.mu)
        copied(x)  # and it trains on its own, counting its own call sites
        assert shade_ops.collect(copied).requires_grad
        assert copied[1].state is not model[1].state
    with torch.no_grad():  # an EMA update over parameters and buffers
        for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
            if e.shape == p.shape:
                e.copy_(0.9 * e + 0.1 * p)
    buffer = io.BytesIO()
    torch.save(after, buffer)
    buffer.seek(0)
    assert isinstance(torch.load(buffer, weights_only=False)[1], ShadeReLU)


def test_the_layer_frees_the_activations_after_the_backward():
    """The kept penalty does not keep the step's saved activations alive past the backward."""
    import weakref

    act = ShadeReLU(6)
    x = torch.randn(64, 6, requires_grad=True)
    y = x * 2
    alive = weakref.ref(y)
    out = act(y)
    del y
    (out.sum() + act.penalty).backward()
    del out
    assert act.penalty is not None and alive() is None


# ---- GradScaler on a lazily sized model -------------------------------------------------------

def test_skipped_first_gradscaler_step_of_a_lazy_model_leaves_no_trace():
    model = shade_ops.convert(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x = random_activations((6, 4), seed=0)
    snap = shade_ops.amp.snapshot(model)  # no state exists yet
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().sum() + 0.01 * shade_ops.collect(model)
    scaler.scale(loss * torch.tensor(float("inf"))).backward()
    assert not shade_ops.amp.scaler_step(scaler, optimizer, snap)
    fresh = ShadeState(5)
    assert torch.equal(model[1].state.mu, fresh.mu) and torch.equal(model[1].state.p, fresh.p)


# ---- attach on modules returning tuples ------------------------------------------------------

def test_attach_on_tuple_returning_modules():
    with pytest.raises(ValueError, match="select=0"):
        shade_ops.attach(nn.LSTM(4, 6, batch_first=True))
    lstm = nn.LSTM(4, 6, batch_first=True)
    shade = shade_ops.attach(lstm, select=0, unit_dim=-1)
    x = torch.randn(2, 5, 4)
    out, _ = lstm(x)
    assert_close(shade.penalty, reference.penalty(out.detach(), ShadeState(6), unit_dim=-1),
                 torch.float32, "penalty")
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    shade_ops.attach(attention, select=lambda output: output[0], unit_dim=-1)
    q = torch.randn(2, 3, 8)
    attention(q, q, q)
    assert attention.shade.penalty is not None

    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    pair = Pair()
    shade_ops.attach(pair)
    with pytest.raises(TypeError, match="select="):
        pair(torch.randn(2, 3))


# ---- smaller contracts --------------------------------------------------------------------

def test_bad_arguments_fail_at_construction():
    with pytest.raises(TypeError, match="unit_dim"):
        ShadeReLU(unit_dim=1.5)
    with pytest.raises(ValueError, match="reduction"):
        ShadeReLU(reduction="max")
    with pytest.raises(ValueError, match="backend"):
        ShadeReLU(backend="gpu")
    with pytest.raises(ValueError, match="num_units"):
        ShadeReLU(num_units=0)
    with pytest.raises(ValueError, match="backend"):
        shade_ops.convert(nn.Sequential(nn.ReLU()), backend="gpu")


def test_wrong_state_object_and_float8_are_type_errors():
    with pytest.raises(TypeError, match="ShadeState"):
        shade_ops.penalty(torch.randn(4, 3), torch.zeros(2, 3))
    if hasattr(torch, "float8_e4m3fn"):
        with pytest.raises(TypeError, match="float8"):
            shade_ops.penalty(torch.randn(4, 3).to(torch.float8_e4m3fn), ShadeState(3))


def test_lazy_layer_follows_to_before_its_first_forward_and_stays_float32():
    act = ShadeReLU().to(torch.float64)
    act(torch.randn(4, 3, dtype=torch.float64))
    assert act.state.mu.dtype == torch.float32
    model = shade_ops.convert(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
    model(torch.randn(2, 4))
    model.half()
    assert model[1].state.mu.dtype == torch.float32 and model[1].state.p.dtype == torch.float32
    model.to(torch.bfloat16)
    assert model[1].state.mu.dtype == torch.float32
    state64 = ShadeState(3, dtype=torch.float64).float()
    assert state64.mu.dtype == torch.float64  # asked for at construction


def test_lazy_device_follows_the_module():
    act = ShadeReLU().to("meta")
    with pytest.raises(ValueError, match="meta"):
        act(torch.randn(4, 3))  # the state went to the module's device, y is elsewhere


def test_state_first_made_under_inference_mode_trains_later():
    act = ShadeReLU(backend="reference")
    with torch.inference_mode():
        act(torch.randn(4, 3))
    y = torch.randn(4, 3, requires_grad=True)
    act(y)
    act.penalty.backward()
    assert y.grad is not None


def test_jit_trace_in_training_mode_is_refused_eval_traces():
    model = shade_ops.convert(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
    with pytest.raises(RuntimeError, match="torch.jit.trace"):
        torch.jit.trace(model, torch.randn(2, 4))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.randn(2, 4))
    x = torch.randn(2, 4)
    assert torch.equal(traced(x), model(x))


def test_torch_func_transforms_are_refused_or_exact():
    """torch.func.grad over the penalty: exact (the reference's gradient) or a clear error."""
    y = random_activations((5, 3), seed=0)
    state = ShadeState(3)
    expected = torch.func.grad(lambda t: shade_ops.penalty(t, state, update=False,
                                                           backend="reference"))(y)
    for backend in FUSED_BACKENDS:
        try:
            got = torch.func.grad(lambda t: shade_ops.penalty(t, state, update=False,
                                                              backend=backend))(y)
        except RuntimeError as error:
            assert "functorch" in str(error) or "vmap" in str(error) or "func" in str(error)
        else:
            assert_close(got, expected, torch.float32, "grad", backend)


def test_export_in_eval_mode_and_refused_in_training_mode():
    model = shade_ops.convert(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="eval mode"):
        torch.export.export(model, (x,))
    model.eval()
    exported = torch.export.export(model, (x,))
    assert torch.equal(exported.module()(x), model(x))


def test_vmap_over_the_penalty_matches_a_loop():
    y = random_activations((5, 4, 3), seed=0)
    state = ShadeState(3)
    expected = torch.stack([reference.penalty(t, state, update=False) for t in y])
    for backend in FUSED_BACKENDS:
        got = torch.vmap(lambda t: shade_ops.penalty(t, state, update=False, backend=backend))(y)
        assert_close(got, expected, torch.float32, "penalty", backend)


def test_torchscript_script_is_unsupported():
    with pytest.raises(Exception):
        torch.jit.script(ShadeReLU(3))
