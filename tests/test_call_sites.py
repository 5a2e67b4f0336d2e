"""What a call site is, where one module meets several forwards: layers shared by two models, a
tower called twice in one forward, a data-dependent number of calls, a part called on its own,
strict loading, two threads, and copies (deepcopy, pickle, torch.save) on the convert and
convert_fx paths. Values are checked against shade_ops.reference at every call site."""
from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shade_ops
from shade_ops import ShadeReLU, ShadeState, reference

from conftest import assert_close, random_activations
from test_real_models import ReluInputs


def relu_inputs(model: nn.Module, *args) -> list[torch.Tensor]:
    """The input of every ReLU call of one forward of ``model``, in call order (recorded in eval
    mode, where a ShadeReLU is torch.relu; the models here have no BatchNorm or dropout)."""
    training = model.training
    model.eval()
    with ReluInputs() as recorder:
        model(*args)
    model.train(training)
    return recorder.inputs


def fresh_states(inputs: list[torch.Tensor]) -> list[ShadeState]:
    """A new reference state per call site, sized by its input."""
    return [ShadeState(y.shape[1]) for y in inputs]


def states_of(model: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for s in model.modules() if isinstance(s, ShadeState) for t in (s.p, s.mu)]


def assert_state(state: ShadeState, expected: ShadeState, what: str = "") -> None:
    assert_close(state.mu, expected.mu, torch.float32, "state", what + " mu")
    assert_close(state.p, expected.p, torch.float32, "state", what + " p")


def tower() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU())


class Task(nn.Module):
    """A head on a tower that other models may share (weight tying)."""

    def __init__(self, body: nn.Module, classes: int) -> None:
        super().__init__()
        self.tower, self.head = body, nn.Linear(6, classes)

    def forward(self, x):
        return self.head(self.tower(x))


class Siamese(nn.Module):
    """One tower applied to both inputs of a pair, in one forward."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.tower = body

    def forward(self, a, b):
        return (self.tower(a) - self.tower(b)).square().sum(1)


# ---- layers shared by models ------------------------------------------------------------------

def test_a_layer_shared_by_two_models_gives_each_model_its_own_penalty():
    torch.manual_seed(0)
    shared = ShadeReLU()
    a = shade_ops.track(nn.Sequential(nn.Linear(4, 5), shared))
    b = shade_ops.track(nn.Sequential(nn.Linear(4, 5), shared))
    x = random_activations((6, 4), seed=0)
    (ya,), (yb,) = relu_inputs(a, x), relu_inputs(b, x)
    state = ShadeState(5)  # one state, as a shared BatchNorm has one set of running stats
    expected_a, expected_b = reference.penalty(ya, state), reference.penalty(yb, state)
    a(x)
    b(x)
    assert_close(shade_ops.collect(a), expected_a, torch.float32, "penalty", "a")
    assert_close(shade_ops.collect(b), expected_b, torch.float32, "penalty", "b")
    shade_ops.collect(a).backward()
    assert a[0].weight.grad is not None and b[0].weight.grad is None
    assert_state(shared.state, state)
    assert shade_ops.call_sites(a) == shade_ops.call_sites(b) == {"1": [5]}


def test_weight_tied_towers_trained_in_one_step():
    torch.manual_seed(0)
    body = tower()
    task_a = shade_ops.convert(Task(body, 3))
    task_b = shade_ops.convert(Task(body, 2))
    states = [ShadeState(6), ShadeState(6)]  # the tower's two ReLUs, shared by both tasks
    for step in range(3):
        xa, xb = random_activations((5, 4), seed=step), random_activations((7, 4), seed=10 + step)
        expected = []
        for model, x in ((task_a, xa), (task_b, xb)):
            expected.append(sum(reference.penalty(y, s) for y, s in zip(relu_inputs(model, x),
                                                                         states)))
        out_a, out_b = task_a(xa), task_b(xb)  # both forwards, then the loss
        penalty_a, penalty_b = shade_ops.collect(task_a), shade_ops.collect(task_b)
        assert_close(penalty_a, expected[0], torch.float32, "penalty", f"step {step} a")
        assert_close(penalty_b, expected[1], torch.float32, "penalty", f"step {step} b")
        (out_a.sum() + out_b.sum() + 0.1 * (penalty_a + penalty_b)).backward()
        for site, (state, ref) in enumerate(zip([body[1].state, body[3].state], states)):
            assert_state(state, ref, f"step {step} site {site}")
    assert shade_ops.call_sites(task_a) == {"tower.1": [6], "tower.3": [6]}


def test_siamese_tower_twice_in_one_forward_and_shared_with_a_classifier():
    """In the siamese forward each ReLU of the tower has two call sites (one per branch); a
    classifier on the same tower calls each once and uses call site 0, branch a's state."""
    torch.manual_seed(0)
    body = tower()
    siamese = shade_ops.convert(Siamese(body))
    classifier = shade_ops.convert(Task(body, 3))
    # call sites: [relu 1 site 0, relu 2 site 0, relu 1 site 1, relu 2 site 1] in call order
    states = [ShadeState(6) for _ in range(4)]
    for step in range(2):
        a, b = random_activations((5, 4), seed=step), random_activations((5, 4), seed=20 + step)
        x = random_activations((3, 4), seed=40 + step)
        inputs = relu_inputs(siamese, a, b)
        expected = sum(reference.penalty(y, s) for y, s in zip(inputs, states))
        expected_classifier = sum(reference.penalty(y, s) for y, s in
                                  zip(relu_inputs(classifier, x), states[:2]))
        loss = siamese(a, b).mean() + classifier(x).sum()
        penalties = shade_ops.collect(siamese), shade_ops.collect(classifier)
        assert_close(penalties[0], expected, torch.float32, "penalty", f"step {step}")
        assert_close(penalties[1], expected_classifier, torch.float32, "penalty",
                     f"step {step} classifier")
        (loss + 0.1 * sum(penalties)).backward()
    assert shade_ops.call_sites(siamese) == {"tower.1": [6, 6], "tower.3": [6, 6]}
    for i, (state, ref) in enumerate(zip([body[1].state, body[3].state, body[1].extra_states[0],
                                          body[3].extra_states[0]], states)):
        assert_state(state, ref, f"site {i}")


# ---- a data-dependent number of calls -----------------------------------------------------------

class Recurrent(nn.Module):
    """One ReLU module applied two or three times, by an argument: a data-dependent count."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2, self.relu = nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU()

    def forward(self, x, deep: bool):
        h = self.relu(self.l1(x))
        if deep:
            h = self.relu(h * 10)
        return self.relu(self.l2(h) - 5)


@pytest.mark.parametrize("first, then", [(True, False), (False, True)], ids=["deep-then-shallow",
                                                                             "shallow-then-deep"])
def test_a_changed_number_of_calls_is_refused_and_updates_nothing(first, then):
    model = shade_ops.convert(Recurrent())
    x = random_activations((6, 4), seed=0)
    model(x, first)
    shade_ops.collect(model)
    before = states_of(model)
    with pytest.raises(RuntimeError) as error:
        model(x, then)
    message = str(error.value)
    called = "called 2 times" if then is False else "called more than 2 times"
    assert "'relu'" in message and called in message
    assert ("called it 3 times" if first else "called it 2 times") in message
    assert "variable_calls=True" in message and "its own module" in message
    assert all(torch.equal(a, b) for a, b in zip(states_of(model), before))
    assert shade_ops.collect(model).item() == 0.0  # the refused forward left no penalty
    model(x, first)  # the model's own number of calls trains on
    assert shade_ops.collect(model).requires_grad


def test_a_changed_width_at_a_later_call_says_the_number_of_calls_may_have_changed():
    class Widths(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(4, 4), nn.Linear(4, 6), nn.Linear(6, 4)
            self.relu = nn.ReLU()

        def forward(self, x, deep):
            h = self.relu(self.fc1(x))
            if deep:
                h = self.relu(self.fc3(self.relu(self.fc2(h))))
            return self.relu(h)

    model = shade_ops.convert(Widths())
    model(torch.randn(3, 4), True)
    shade_ops.collect(model)
    with pytest.raises(ValueError, match="number of calls of this module changed"):
        model(torch.randn(3, 4), False)


def test_variable_calls_number_sites_by_call_order():
    model = shade_ops.convert(Recurrent(), variable_calls=True)
    states = [ShadeState(4) for _ in range(3)]
    for step, deep in enumerate([False, True, False, True]):
        x = random_activations((6, 4), seed=step)
        expected = sum(reference.penalty(y, s) for y, s in zip(relu_inputs(model, x, deep),
                                                                states))
        model(x, deep)
        assert_close(shade_ops.collect(model), expected, torch.float32, "penalty", f"step {step}")
        for i, (state, ref) in enumerate(zip(model.relu.states, states)):
            assert_state(state, ref, f"step {step} site {i}")
    assert shade_ops.call_sites(model) == {"relu": [4, 4, 4]}


# ---- a part called on its own -----------------------------------------------------------------

def test_a_block_of_a_converted_model_called_on_its_own():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    outer = shade_ops.convert(nn.Sequential(inner, nn.ReLU()))
    x = random_activations((6, 4), seed=0)
    outer(x)
    total = shade_ops.collect(outer)
    keys, before = set(outer.state_dict()), states_of(outer)
    for _ in range(2):
        with pytest.raises(RuntimeError) as error:
            inner(x)  # feature extraction in training mode
    message = str(error.value)
    assert "'0.1'" in message and "model.eval()" in message and "shade_ops.track(part)" in message
    assert shade_ops.call_sites(outer) == {"0.1": [4], "1": [4]}
    assert set(outer.state_dict()) == keys
    assert all(torch.equal(a, b) for a, b in zip(states_of(outer), before))
    assert torch.equal(shade_ops.collect(outer), total)
    outer.eval()  # feature extraction: a plain ReLU
    assert torch.equal(inner(x), torch.relu(inner[0](x)))
    outer.train()
    shade_ops.track(inner)  # to train the block alone, with its site of the model
    expected = reference.penalty(inner[0](x).detach(), copy.deepcopy(inner[1].state))
    inner(x)
    assert_close(shade_ops.collect(inner), expected, torch.float32, "penalty")
    outer(x)  # and the model still has one site per place
    assert shade_ops.call_sites(outer) == {"0.1": [4], "1": [4]}


def test_a_tracked_block_inside_a_tracked_model_gives_its_share():
    torch.manual_seed(0)
    block = shade_ops.convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    model = shade_ops.convert(nn.Sequential(block, nn.Linear(4, 5), nn.ReLU()))
    x = random_activations((6, 4), seed=0)
    inputs = relu_inputs(model, x)
    expected = [reference.penalty(y, s) for y, s in zip(inputs, fresh_states(inputs))]
    model(x)
    assert_close(shade_ops.collect(block), expected[0], torch.float32, "penalty", "block")
    assert_close(shade_ops.collect(model), expected[0] + expected[1], torch.float32, "penalty")


def test_a_forward_that_raises_updates_nothing():
    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.ReLU()

        def forward(self, x, fail=False):
            h = self.act(self.fc(x))
            if fail:
                raise KeyError("a later layer failed")
            return h

    model = shade_ops.convert(Failing())
    x = random_activations((6, 4), seed=0)
    model(x)
    shade_ops.collect(model)
    before = states_of(model)
    with pytest.raises(KeyError):
        model(x, fail=True)
    assert all(torch.equal(a, b) for a, b in zip(states_of(model), before))
    assert shade_ops.collect(model).item() == 0.0
    alone = ShadeReLU()  # no record was left open: a layer of no model is on its own
    alone(x)
    assert not torch.equal(alone.state.mu, ShadeState(4).mu)
    model(x)
    assert shade_ops.call_sites(model) == {"act": [4]}


# ---- strict loading ---------------------------------------------------------------------------

class Repeat(nn.Module):
    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls, self.r = calls, nn.ReLU()

    def forward(self, x):
        for _ in range(self.calls):
            x = self.r(x) - 0.5
        return x


def test_strict_loading_reports_other_call_sites_as_for_any_module():
    x = random_activations((6, 4), seed=0)
    once, thrice = shade_ops.convert(Repeat(1)), shade_ops.convert(Repeat(3))
    once(x), thrice(x)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*r\.extra_states\.0\.p"):
        once.load_state_dict(thrice.state_dict())
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*r\.extra_states\.1\.mu"):
        thrice.load_state_dict(once.state_dict())
    assert shade_ops.call_sites(once) == {"r": [4]}
    result = once.load_state_dict(thrice.state_dict(), strict=False)
    assert "r.extra_states.0.p" in result.unexpected_keys
    assert shade_ops.call_sites(once) == {"r": [4]}


def test_a_never_run_model_takes_its_call_sites_from_the_checkpoint():
    trained = shade_ops.convert(Repeat(3))
    for step in range(2):
        trained(random_activations((6, 4), seed=step))
        shade_ops.collect(trained)
    fresh = shade_ops.convert(Repeat(3))  # lazy: no state yet
    assert str(fresh.load_state_dict(trained.state_dict())) == "<All keys matched successfully>"
    assert shade_ops.call_sites(fresh) == {"r": [4, 4, 4]}
    x = random_activations((6, 4), seed=5)
    trained(x), fresh(x)
    assert torch.equal(shade_ops.collect(fresh), shade_ops.collect(trained))
    assert all(torch.equal(a, b) for a, b in zip(states_of(fresh), states_of(trained)))
    other = shade_ops.convert(Repeat(1))  # takes the three sites, but calls once
    other.load_state_dict(trained.state_dict())
    with pytest.raises(RuntimeError, match="3 call sites of the checkpoint"):
        other(x)


# ---- threads ----------------------------------------------------------------------------------

class Meeting(nn.Module):
    """A forward that waits for the other thread's forward after each ReLU call, so that both
    are inside the model at once and both compute every penalty before either one ends."""

    def __init__(self, barrier: threading.Barrier) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.act1, self.fc2, self.act2 = nn.Linear(4, 64), nn.ReLU(), \
            nn.Linear(64, 64), nn.ReLU()
        self.barrier = barrier

    def forward(self, x):
        meet = self.training and torch.is_grad_enabled()
        h = self.act1(self.fc1(x))
        if meet:
            self.barrier.wait(timeout=30)
        h = self.act2(self.fc2(h))
        if meet:
            self.barrier.wait(timeout=30)
        return h


def test_two_threads_running_one_model_count_their_own_calls():
    barrier = threading.Barrier(2)
    model = shade_ops.convert(Meeting(barrier))
    inputs = [random_activations((8, 4), seed=i) for i in range(2)]
    with torch.no_grad():
        sites = [relu_inputs(model, x) for x in inputs]
    results, errors = {}, []

    def run(i):
        try:
            model(inputs[i])
            results[i] = shade_ops.collect(model)  # this thread's forward
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert shade_ops.call_sites(model) == {"act1": [64], "act2": [64]}
    for i in range(2):  # both forwards ran on the states from before either one's update
        expected = sum(reference.penalty(y, ShadeState(64)) for y in sites[i])
        assert_close(results[i], expected, torch.float32, "penalty", f"thread {i}")
    # the states hold both updates, one after the other, in one of the two orders
    layers = [model.act1.state, model.act2.state]
    orders = []
    for order in ((0, 1), (1, 0)):
        refs = [ShadeState(64), ShadeState(64)]
        for i in order:
            for y, ref in zip(sites[i], refs):
                reference.penalty(y, ref)
        orders.append(all(torch.allclose(s.mu, r.mu, rtol=1e-5, atol=1e-6) and
                          torch.allclose(s.p, r.p, rtol=1e-5, atol=1e-6)
                          for s, r in zip(layers, refs)))
    assert any(orders)


# ---- the arguments ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["track", "collect", "call_sites", "convert"])
def test_a_model_that_is_not_a_module_is_a_type_error(name):
    with pytest.raises(TypeError, match="nn.Module"):
        getattr(shade_ops, name)(3)


# ---- copies -------------------------------------------------------------------------------------

class Functional(nn.Module):
    """ReLUs as functions, one applied to two places through a helper: convert_fx's path."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        h = torch.relu(self.fc2(h) + h)
        return self.fc3(h).relu()


class Shared(nn.Module):
    """A ShadeReLU built by hand, called twice in one forward: track's path."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.act = nn.Linear(4, 8), nn.Linear(8, 8), ShadeReLU()

    def forward(self, x):
        return self.act(self.fc2(self.act(self.fc1(x))))


MAKERS = {
    "convert": lambda: shade_ops.convert(nn.Sequential(nn.Linear(4, 8), nn.ReLU(),
                                                       nn.Linear(8, 8), nn.ReLU())),
    "track": lambda: shade_ops.track(Shared()),
    "convert_fx": lambda: shade_ops.convert_fx(Functional()),
}


def _pickled(model):
    return pickle.loads(pickle.dumps(model))


def _saved(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "pickle": _pickled, "torch.save": _saved,
          "copy of a copy": lambda m: copy.deepcopy(_pickled(m))}


def _steps(model, start: int, steps: int = 3):
    """Training steps (no optimizer, so that only the states move): per step the loss, the
    penalty and every state and gradient after it."""
    results = []
    for step in range(start, start + steps):
        model.zero_grad()
        x = random_activations((6, 4), seed=step)
        out = model(x)
        penalty = shade_ops.collect(model)
        (out.square().mean() + 0.3 * penalty).backward()
        results.append([penalty.detach(), *states_of(model),
                        *[p.grad.clone() for p in model.parameters()]])
    return results


@pytest.mark.parametrize("copy_with", list(COPIES))
@pytest.mark.parametrize("make", list(MAKERS))
def test_a_copy_trains_exactly_like_the_original(make, copy_with):
    model = MAKERS[make]()
    x = random_activations((6, 4), seed=100)
    inputs = relu_inputs(model, x)
    expected = sum(reference.penalty(y, s) for y, s in zip(inputs, fresh_states(inputs)))
    model(x)
    assert_close(shade_ops.collect(model), expected, torch.float32, "penalty", "first step")
    loss = model(x).sum() + shade_ops.collect(model)
    mid = COPIES[copy_with](model)  # mid-step: after the forward, the graph alive
    loss.backward()
    assert shade_ops.collect(mid).item() == 0.0  # the copy holds no graph
    copied = _steps(mid, 1)
    original = _steps(model, 1)
    for step, (a, b) in enumerate(zip(copied, original)):
        for i, (ta, tb) in enumerate(zip(a, b)):
            assert torch.equal(ta, tb), f"step {step} tensor {i}"
    assert shade_ops.call_sites(mid) == shade_ops.call_sites(model)
    after = COPIES[copy_with](mid)  # after the steps, and its count of calls is kept
    assert all(torch.equal(a, b) for a, b in zip(states_of(after), states_of(model)))
    after(x)
    assert shade_ops.call_sites(after) == shade_ops.call_sites(model)


class LossInForward(nn.Module):
    """A model that returns its loss, penalty included (Lightning-style, DataParallel losses)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.relu = nn.Linear(3, 4), nn.ReLU()

    def forward(self, x):
        h = self.relu(self.body(x))
        return h.sum() + 0.1 * shade_ops.collect(self)


def test_collect_inside_the_forward_gives_this_forward():
    torch.manual_seed(0)
    model = shade_ops.convert(LossInForward())
    expected_state = ShadeState(4)
    for step in range(3):
        x = torch.randn(5, 3)
        h = model.body(x).detach()
        expected = h.relu().sum() + 0.1 * reference.penalty(h, expected_state)
        loss = model(x)
        loss.backward()  # a second step through a stale penalty would fail here
        assert_close(loss.detach(), expected, torch.float32, "penalty", f"step {step}")
        assert_state(model.relu.state, expected_state, f"step {step}")


def test_a_checkpointed_tracked_model_keeps_its_penalties_after_backward():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = shade_ops.convert(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4),
                                            nn.ReLU()))
    plain = copy.deepcopy(model)
    x = torch.randn(6, 3)
    out = checkpoint(model, x, use_reentrant=False)
    before = shade_ops.collect(model)
    (out.sum() + before).backward()
    after = shade_ops.collect(model)
    plain_out = plain(x)
    assert torch.equal(after, before) and after.item() > 0
    assert torch.equal(after, shade_ops.collect(plain))
    assert_state(model[1].state, plain[1].state)
