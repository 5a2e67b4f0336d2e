"""Model-level SHADE: ShadeReLU, convert, collect, attach, autocast, GradScaler, torch.compile of
a whole model and the DDP-synchronised state."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import shade_ops
from shade_ops import ShadePenalty, ShadeReLU, ShadeState, reference

from conftest import FUSED_BACKENDS, assert_close, random_activations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True),
        nn.Sequential(nn.Conv2d(6, 5, 3), nn.ReLU()),
        nn.Flatten(), nn.Linear(5 * 5 * 5, 7), nn.ReLU(), nn.Linear(7, 3))


def shade_states(model: nn.Module) -> list[ShadeState]:
    return [m for m in model.modules() if isinstance(m, ShadeState)]


# ---- ShadeReLU --------------------------------------------------------------------------

@pytest.mark.parametrize("num_units", [None, 5])
def test_shade_relu_matches_relu_plus_reference(backend, num_units):
    act = ShadeReLU(num_units, backend=backend)
    expected_state = ShadeState(5)
    for step in range(2):
        y = random_activations((4, 5, 3, 7), seed=step).requires_grad_()
        y_ref = y.detach().clone().requires_grad_()
        out = act(y)
        out_ref = torch.relu(y_ref)
        value_ref = reference.penalty(y_ref, expected_state)
        assert_close(out, out_ref, torch.float32, "grad")
        assert_close(act.penalty, value_ref, torch.float32, "penalty")
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(step))
        (out * g + 0.3 * act.penalty).sum().backward()
        (out_ref * g + 0.3 * value_ref).sum().backward()
        assert_close(y.grad, y_ref.grad, torch.float32, "grad")
        assert_close(act.state.mu, expected_state.mu, torch.float32, "state")
    assert act.state.p.dtype == torch.float32


def test_shade_relu_eval_is_plain_relu():
    act = ShadeReLU(3)
    act(torch.randn(4, 3))
    act.eval()
    before = act.state.mu.clone()
    y = torch.randn(4, 3)
    assert torch.equal(act(y), torch.relu(y))
    assert act.penalty is None and torch.equal(act.state.mu, before)


def test_shade_relu_units_last_and_bad_unit_dim():
    act = ShadeReLU(unit_dim=-1)
    act(torch.randn(2, 9, 4))
    assert act.state.num_units == 4
    with pytest.raises(ValueError, match="out of range"):
        ShadeReLU(unit_dim=3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="decay"):
        ShadeReLU(decay=1.0)


def test_lazy_shade_relu_state_dict_round_trip():
    trained = ShadeReLU()
    for i in range(3):
        trained(random_activations((6, 4), seed=i))
    fresh = ShadeReLU()  # no input seen: its size comes from the checkpoint
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.state.mu, trained.state.mu)
    assert torch.equal(fresh.state.p, trained.state.p)
    assert set(trained.state_dict()) == {"state.p", "state.mu"}


# ---- convert, collect, attach -----------------------------------------------------------

def test_convert_replaces_every_relu_and_collect_sums_penalties():
    model = small_cnn()
    assert shade_ops.convert(model, decay=0.7) is model
    assert not any(type(m) is nn.ReLU for m in model.modules())
    acts = [m for m in model.modules() if isinstance(m, ShadeReLU)]
    assert len(acts) == 3 and all(a.decay == 0.7 for a in acts)
    assert isinstance(shade_ops.convert(nn.ReLU()), ShadeReLU)
    assert shade_ops.collect(model).item() == 0.0  # nothing ran yet
    model(torch.randn(2, 3, 7, 7))
    total = shade_ops.collect(model)
    assert torch.allclose(total, sum(a.penalty for a in acts))
    assert [a.state.num_units for a in acts] == [6, 5, 7]
    model.eval()
    model(torch.randn(2, 3, 7, 7))
    assert shade_ops.collect(model).item() == 0.0


def test_attach_puts_shade_on_a_layer_without_relu():
    torch.manual_seed(0)
    linear = nn.Linear(4, 6)
    shade = shade_ops.attach(linear)
    model = nn.Sequential(linear, nn.Tanh())
    x = torch.randn(5, 4)
    model(x)
    assert isinstance(shade, ShadePenalty) and linear.shade is shade
    expected = reference.penalty(nn.functional.linear(x, linear.weight, linear.bias).detach(),
                                 ShadeState(6))
    assert_close(shade_ops.collect(model), expected, torch.float32, "penalty")
    assert "0.shade.state.mu" in model.state_dict()
    with pytest.raises(ValueError, match="shade"):
        shade_ops.attach(linear)


# ---- autocast and GradScaler -------------------------------------------------------------

def test_cpu_bfloat16_autocast_keeps_penalty_and_state_float32():
    model = shade_ops.convert(small_cnn())
    x = torch.randn(4, 3, 7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        penalty = shade_ops.collect(model)
    assert out.dtype == torch.bfloat16
    assert penalty.dtype == torch.float32
    assert all(s.p.dtype == torch.float32 and s.mu.dtype == torch.float32
               for s in shade_states(model))
    penalty.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.skipif(not torch.cuda.is_available() or "triton" not in
                    shade_ops.available_backends("cuda"), reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_keeps_penalty_and_state_float32(dtype):
    model = shade_ops.convert(small_cnn()).cuda()
    with torch.autocast("cuda", dtype=dtype):
        out = model(torch.randn(4, 3, 7, 7, device="cuda"))
        penalty = shade_ops.collect(model)
    assert out.dtype == dtype and penalty.dtype == torch.float32
    assert all(s.mu.dtype == torch.float32 for s in shade_states(model))
    penalty.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_skipped_gradscaler_step_leaves_no_trace_in_the_state():
    model = shade_ops.convert(small_cnn())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(4, 3, 7, 7)

    def step(poison: bool) -> bool:
        snap = shade_ops.amp.snapshot(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().sum() + 0.01 * shade_ops.collect(model)
        if poison:  # an overflow in the backward only: every activation was finite
            loss = loss * torch.tensor(float("inf"))
        scaler.scale(loss).backward()
        stepped = shade_ops.amp.scaler_step(scaler, optimizer, snap)
        optimizer.zero_grad()
        return stepped

    assert step(poison=False)
    before = [s.mu.clone() for s in shade_states(model)] + [s.p.clone() for s in shade_states(model)]
    weights = [p.detach().clone() for p in model.parameters()]
    assert not step(poison=True)
    after = [s.mu for s in shade_states(model)] + [s.p for s in shade_states(model)]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))
    assert step(poison=False)  # and training goes on
    assert not torch.equal(shade_states(model)[0].mu, before[0])


# ---- torch.compile of a whole model -----------------------------------------------------

@pytest.mark.parametrize("compile_backend", ["inductor"])
def test_compiled_converted_model_matches_eager(compile_backend):
    torch._dynamo.reset()
    eager = shade_ops.convert(small_cnn())
    compiled_model = shade_ops.convert(small_cnn())
    x0 = torch.randn(2, 3, 7, 7)
    eager(x0), compiled_model(x0)  # sizes from a first input, in eager mode
    for m in (eager, compiled_model):
        for s in shade_states(m):
            s.reset_state()

    def loss_fn(model, x, t):
        return nn.functional.cross_entropy(model(x), t) + 0.1 * shade_ops.collect(model)

    compiled = torch.compile(loss_fn, fullgraph=True, backend=compile_backend)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x, t = torch.randn(4, 3, 7, 7, generator=g), torch.randint(0, 3, (4,), generator=g)
        loss_eager, loss_compiled = loss_fn(eager, x, t), compiled(compiled_model, x, t)
        assert_close(loss_compiled, loss_eager, torch.float32, "penalty", f"step {step}")
        loss_eager.backward()
        loss_compiled.backward()
        for (name, a), b in zip(compiled_model.named_parameters(), eager.parameters()):
            assert_close(a.grad, b.grad, torch.float32, "grad", f"step {step} {name}")
        for a, b in zip(shade_states(compiled_model), shade_states(eager)):
            assert_close(a.mu, b.mu, torch.float32, "state", f"step {step}")
            assert_close(a.p, b.p, torch.float32, "state", f"step {step}")


# ---- DDP: the synchronised state ---------------------------------------------------------

def _sync_worker(rank: int, world: int, init_file: str, batch: torch.Tensor, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        state = ShadeState(batch.shape[1], sync=True)
        shard = batch.chunk(world)[rank]
        for _ in range(2):
            shade_ops.penalty(shard, state)
        queue.put((rank, state.p.tolist(), state.mu.tolist()))  # no shared memory to outlive us
        dist.barrier()  # as examples/ddp_train.py: no rank tears gloo down under another
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("call_backend", ["reference", *FUSED_BACKENDS[:1]])
def test_sync_state_equals_one_process_on_the_whole_batch(tmp_path, call_backend):
    if call_backend != "reference":
        pytest.importorskip("shade_ops._C")
    batch = random_activations((8, 5, 3), seed=7)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_sync_worker, args=(r, 2, str(tmp_path / "init"), batch, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    results = {r: (torch.tensor(p), torch.tensor(mu))
               for r, p, mu in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    single = ShadeState(5)
    for _ in range(2):
        reference.penalty(batch, single)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert_close(results[0][0], single.p, torch.float32, "state")
    assert_close(results[0][1], single.mu, torch.float32, "state")


def test_sync_without_process_group_is_local():
    state = ShadeState(3, sync=True)
    y = random_activations((4, 3), seed=1)
    shade_ops.penalty(y, state)
    local = ShadeState(3)
    shade_ops.penalty(y, local)
    assert torch.equal(state.mu, local.mu)


@pytest.mark.slow
def test_ddp_example_runs_with_torchrun():
    pytest.importorskip("sklearn")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         os.path.join(ROOT, "examples", "ddp_train.py"), "--steps", "5"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("identical on all ranks: True") == 2


def test_a_model_without_relu_is_named_with_its_activations():
    """mobilenet_v2's ReLU6, efficientnet's SiLU: convert and convert_fx say there is no ReLU and
    name what there is; the training forward that then computes no penalty says so too, without
    sending a convert_fx model back to convert_fx."""
    for convert in (shade_ops.convert, shade_ops.convert_fx):
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU6(), nn.Linear(6, 6), nn.SiLU())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = convert(model)
            model(torch.randn(3, 4))
        messages = [str(w.message) for w in caught]
        assert len(messages) == 2, messages
        assert "found no ReLU" in messages[0] and "ReLU6 (x1)" in messages[0]
        assert "SiLU (x1)" in messages[0]
        assert "computed no SHADE penalty" in messages[1]
        assert ("use shade_ops.convert_fx" in messages[1]) == (convert is shade_ops.convert)
