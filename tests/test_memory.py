"""shade_ops.recompute_relu: the ReLU outputs later layers save are kept as the ReLU's input;
gradients and states bitwise those without it, on models written the way torchvision and
transformers write theirs."""
import contextlib
import copy
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import shade_ops
from shade_ops import reference
from shade_ops.modules import ShadeReLU


class BasicBlock(nn.Module):  # torchvision's: one ReLU module called twice, a downsample
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def resnet(use_checkpoint=False):
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    blocks = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 16, 2))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.blocks = stem, blocks
            self.head = nn.Linear(16, 5)

        def forward(self, x):
            x = self.stem(x)
            x = checkpoint(self.blocks, x, use_reentrant=False) if use_checkpoint \
                else self.blocks(x)
            return self.head(x.mean((2, 3)))
    return shade_ops.convert(Net())


class Transformerish(nn.Module):  # (N, L, D) activations, units last, an MLP block
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.act, self.fc2 = nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 12)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


def _context(low_memory):
    return shade_ops.recompute_relu() if low_memory else contextlib.nullcontext()


def _step(model, x, low_memory):
    model.zero_grad()
    with _context(low_memory):
        loss = model(x).square().mean() + 0.1 * shade_ops.collect(model)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], \
        [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("make, shape", [(resnet, (4, 3, 8, 8)),
                                         (lambda: shade_ops.convert(Transformerish(),
                                                                    unit_dim=-1), (3, 5, 12)),
                                         (lambda: resnet(use_checkpoint=True), (4, 3, 8, 8))],
                         ids=["resnet", "units-last", "checkpoint"])
def test_gradients_and_states_are_bitwise_those_without_it(make, shape):
    model = make()
    twin = copy.deepcopy(model)
    for step in range(3):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(step))
        plain, low = _step(model, x, False), _step(twin, x, True)
        assert torch.equal(plain[0], low[0])
        for a, b in zip(plain[1] + plain[2], low[1] + low[2]):
            assert torch.equal(a, b)


def _alive_relu_outputs(model, x, low_memory):
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(weakref.ref(o)))
             for m in model.modules() if isinstance(m, ShadeReLU)]
    with _context(low_memory):
        loss = model(x).square().mean() + 0.1 * shade_ops.collect(model)
    gc.collect()
    alive = sum(ref() is not None for ref in outputs)
    for hook in hooks:
        hook.remove()
    loss.backward()
    return alive, len(outputs)


def test_the_relu_outputs_are_freed_after_the_forward():
    model, x = resnet(), torch.randn(4, 3, 8, 8)
    alive, calls = _alive_relu_outputs(model, x, low_memory=False)
    assert calls == 5 and alive == 4  # the next layers hold them (the last one feeds a mean)
    alive, calls = _alive_relu_outputs(model, x, low_memory=True)
    assert calls == 5 and alive == 0


def test_an_input_modified_in_place_is_an_error_not_a_wrong_gradient():
    relu, linear = ShadeReLU(), nn.Linear(6, 3)
    x = torch.randn(4, 6)  # the ReLU's input needs no grad: only the linear layer saves
    with shade_ops.recompute_relu():
        loss = linear(relu(x)).sum() + shade_ops.collect(relu)
    x.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


def test_relu_penalty_and_the_reference_backend_agree():
    y = torch.randn(5, 7, requires_grad=True)
    linear = nn.Linear(7, 2)
    grads = []
    for low, backend in [(False, "reference"), (True, "reference"), (True, "auto")]:
        state = shade_ops.ShadeState(7)
        with _context(low):
            out, value = shade_ops.relu_penalty(y, state, backend=backend)
            loss = linear(out).sum() + value
        grads.append(torch.autograd.grad(loss, y)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-5, atol=1e-6)
    state = shade_ops.ShadeState(7)
    torch.testing.assert_close(reference.penalty(y.detach(), state), value.detach())


def test_no_grad_and_compile_inside_it():
    model = shade_ops.convert(Transformerish(), unit_dim=-1)
    x = torch.randn(2, 3, 12)
    with shade_ops.recompute_relu(), torch.no_grad():
        model(x)
    shade_ops.collect(model)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True)
    plain = _step(model, x, False)
    low = _step(compiled, x, True)
    torch.testing.assert_close(low[0], plain[0])
    for a, b in zip(plain[1], low[1]):
        torch.testing.assert_close(a, b)


class InPlaceAfterReLU(nn.Module):  # the ReLU output changed before the next layer saves it
    def __init__(self, how):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.act, self.fc2, self.how = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3), how
        self.drop = nn.Dropout(0.5, inplace=True)

    def forward(self, x):
        h = self.act(self.fc1(x))
        if self.how == "add":
            h += 1
        elif self.how == "dropout":
            torch.manual_seed(1)
            h = self.drop(h)
        return self.fc2(h)


@pytest.mark.parametrize("how", ["add", "dropout"])
def test_an_output_changed_in_place_before_it_is_saved_is_saved_as_it_is(how):
    model = shade_ops.convert(InPlaceAfterReLU(how))
    twin = copy.deepcopy(model)
    x = torch.randn(5, 6)
    plain, low = _step(model, x, False), _step(twin, x, True)
    for a, b in zip(plain[1] + plain[2], low[1] + low[2]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("next_layer", [True, False], ids=["linear-after", "sum-after"])
def test_autograd_s_own_in_place_check_still_holds_inside_it(next_layer):
    # the ReLU's input needs grad and changes after the ReLU: plain autograd refuses, and so
    # must the context (a saved_tensors_hooks context turns autograd's own check off)
    for low in (False, True):
        relu, linear = ShadeReLU(), (nn.Linear(6, 3) if next_layer else nn.Identity())
        y = torch.randn(4, 6, requires_grad=True).clone()
        with _context(low):
            loss = linear(relu(y)).sum() + shade_ops.collect(relu)
        y.mul_(2)
        with pytest.raises(RuntimeError, match="modified"):
            loss.backward()


def test_a_training_loop_inside_it_leaks_nothing():
    model = resnet()
    inputs = []
    hook = model.stem[2].register_forward_hook(lambda m, i, o: inputs.append(weakref.ref(i[0])))
    with shade_ops.recompute_relu():
        for step in range(4):
            model.zero_grad()
            loss = model(torch.randn(2, 3, 8, 8)).sum() + 0.1 * shade_ops.collect(model)
            loss.backward()
            del loss
        gc.collect()
        alive = [ref() is not None for ref in inputs]  # inside the context, after the steps
    hook.remove()
    assert len(inputs) == 4 and not any(alive)
