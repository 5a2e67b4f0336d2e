"""SHADE on real torchvision, timm and transformers models (random weights, nothing downloaded).

For every model, an unconverted copy runs under a TorchDispatchMode that records the input of
every ``aten.relu`` / ``aten.relu_`` (functional calls included): these are the model's ReLU
applications. The converted model (``convert``, or ``convert_fx`` where ``convert`` misses some)
must have a SHADE call site for each (100% coverage), ``collect`` must equal the sum of
``shade_ops.reference.penalty`` over them (each with its own reference state) at the first step
and after the states moved, with the same per-site states and the same parameter gradients as
the reference penalty on the unconverted model. Then bf16 autocast, channels-last and
``torch.compile`` on a few.

Needs torchvision (and timm, transformers), which the pinned torch of ``make test`` lacks: this
module is skipped there and runs in its own venv with ``make zoo``, which writes the table
(``SHADE_ZOO_OUT=path/prefix`` writes ``prefix.md`` and ``prefix.json``).
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import sysconfig
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

pytest.importorskip("torchvision")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: every model comes from a config
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import shade_ops  # noqa: E402
from shade_ops import ShadeState, reference  # noqa: E402

BETA = 0.1
LR = 0.01
BATCH = 2
RTOL = 2e-5          # collect against the reference sum, float32 (the suite's penalty tolerance)
BF16_RTOL = 1e-3     # bf16 autocast: collect against the reference on the same bf16 activations
BF16_FP32_RTOL = 0.1  # ... and against the float32 model's (bf16 rounding through every layer)
COMPILE_RTOL = 1e-4  # inductor fuses the convolutions and norms in another order


# ---- the models -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Zoo:
    library: str
    name: str
    build: Callable[[], nn.Module]
    size: int = 64          # image side, or sequence length for transformers
    unit_dim: int = 1
    conv: bool = True       # channels-last applies

    @property
    def id(self) -> str:
        return f"{self.library}-{self.name}"

    def input(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + step)
        if self.library == "transformers":
            x = torch.randint(0, VOCAB, (BATCH, self.size), generator=g)
            target = torch.randint(0, 3, (BATCH,), generator=g) if "Classification" in self.name \
                else torch.randint(0, VOCAB, (BATCH, self.size), generator=g)
            return x, target
        x = torch.randn(BATCH, 3, self.size, self.size, generator=g)
        return x, torch.randint(0, 10, (BATCH,), generator=g)

    def input_shape(self) -> list[int]:
        return list(self.input(0)[0].shape)


def torchvision_model(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build():
        import torchvision.models as models
        return getattr(models, name)(weights=None, num_classes=10, **kwargs)
    return build


def timm_model(name: str) -> Callable[[], nn.Module]:
    def build():
        import timm
        return timm.create_model(name, pretrained=False, num_classes=10)
    return build


VOCAB = 101


def bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=48, hidden_act="relu",
                        max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(config)


def opt() -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM
    config = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
                       num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32)
    assert config.activation_function == "relu"
    return OPTForCausalLM(config)


INCEPTION = dict(aux_logits=False, init_weights=False)
ZOO = [
    Zoo("torchvision", "resnet18", torchvision_model("resnet18")),
    Zoo("torchvision", "resnet50", torchvision_model("resnet50")),
    Zoo("torchvision", "vgg11", torchvision_model("vgg11")),
    Zoo("torchvision", "alexnet", torchvision_model("alexnet")),
    Zoo("torchvision", "densenet121", torchvision_model("densenet121")),
    Zoo("torchvision", "squeezenet1_0", torchvision_model("squeezenet1_0")),
    Zoo("torchvision", "shufflenet_v2_x0_5", torchvision_model("shufflenet_v2_x0_5")),
    Zoo("torchvision", "mobilenet_v3_small", torchvision_model("mobilenet_v3_small")),
    Zoo("torchvision", "mnasnet0_5", torchvision_model("mnasnet0_5")),
    Zoo("torchvision", "regnet_y_400mf", torchvision_model("regnet_y_400mf")),
    Zoo("torchvision", "googlenet", torchvision_model("googlenet", **INCEPTION)),
    Zoo("torchvision", "inception_v3", torchvision_model("inception_v3", **INCEPTION), size=75),
    Zoo("timm", "resnet26d", timm_model("resnet26d")),
    Zoo("timm", "regnetx_002", timm_model("regnetx_002")),
    Zoo("timm", "dla34", timm_model("dla34")),
    Zoo("timm", "mnasnet_small", timm_model("mnasnet_small")),
    Zoo("timm", "mobilenetv3_small_050", timm_model("mobilenetv3_small_050")),
    Zoo("transformers", "BertForSequenceClassification", bert, size=16, unit_dim=-1, conv=False),
    Zoo("transformers", "OPTForCausalLM", opt, size=16, unit_dim=-1, conv=False),
]
# Models whose activations are ReLU6 / SiLU only: converting them must say so.
NO_RELU = [
    Zoo("torchvision", "mobilenet_v2", torchvision_model("mobilenet_v2")),
    Zoo("timm", "efficientnet_b0", timm_model("efficientnet_b0")),
]
# Cheap to compile on two cores (a ResNet-18's or a SqueezeNet's forward and backward take
# minutes of inductor).
COMPILED = ["torchvision-alexnet", "transformers-BertForSequenceClassification"]
BY_ID = {z.id: z for z in ZOO}

_TEMPLATES: dict[str, nn.Module] = {}


def fresh(zoo: Zoo) -> nn.Module:
    """A copy of the model with the same random weights every time (built once per run)."""
    if zoo.id not in _TEMPLATES:
        torch.manual_seed(0)
        _TEMPLATES[zoo.id] = zoo.build().train()
    return copy.deepcopy(_TEMPLATES[zoo.id])


def logits_of(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def task_loss(output, target: torch.Tensor) -> torch.Tensor:
    logits = logits_of(output).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


# ---- what the unconverted model does --------------------------------------------------------

RELU_OPS = {torch.ops.aten.relu.default, torch.ops.aten.relu_.default}


class ReluApplications(TorchDispatchMode):
    """The input of every aten.relu / aten.relu_ (cloned before an in-place one overwrites it):
    every ReLU the model applies, as a module or as a function."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in RELU_OPS:
            self.inputs.append(args[0].detach().clone())
        return func(*args, **(kwargs or {}))


def relu_inputs(model: nn.Module, x: torch.Tensor, seed: int, memory_format=None,
                autocast: bool = False) -> list[torch.Tensor]:
    with torch.no_grad(), ReluApplications() as recorder, \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        torch.manual_seed(seed)  # the same dropout masks as the converted model's forward
        model(x)
    return recorder.inputs


RELU_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu,
                  torch.Tensor.relu_}


class ReferencePenalties(TorchFunctionMode):
    """The unconverted model with ``reference.penalty`` at every ReLU call (its own state per
    call, in call order), differentiable: the formulation the converted model must equal. The
    ReLU is applied out of place, as a ShadeReLU does."""

    def __init__(self, states: list[ShadeState], unit_dim: int) -> None:
        super().__init__()
        self.states, self.unit_dim = states, unit_dim
        self.penalties: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func not in RELU_FUNCTIONS:
            return func(*args, **(kwargs or {}))
        y = args[0]
        site = len(self.penalties)
        if site == len(self.states):
            self.states.append(ShadeState(y.shape[self.unit_dim]))
        self.penalties.append(reference.penalty(y, self.states[site], unit_dim=self.unit_dim))
        return torch.relu(y)


def reference_sum(inputs: list[torch.Tensor], states: list[ShadeState],
                  unit_dim: int) -> torch.Tensor:
    """Sum of reference penalties, a fresh state per application at its first step."""
    while len(states) < len(inputs):
        states.append(ShadeState(inputs[len(states)].shape[unit_dim]))
    return torch.stack([reference.penalty(y, s, unit_dim=unit_dim)
                        for y, s in zip(inputs, states)]).sum()


# ---- the converted model --------------------------------------------------------------------

def shade_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (shade_ops.ShadeReLU,
                                                         shade_ops.ShadePenalty))]


class CallOrder:
    """The state of each SHADE call site of the last forward, in call order (the k-th call of
    a layer in a forward is its call site k, whose state is ``layer.states[k]``)."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[nn.Module] = []
        model.register_forward_pre_hook(lambda *_: self.calls.clear())
        for layer in shade_layers(model):
            layer.register_forward_pre_hook(lambda m, _: self.calls.append(m))

    def states(self) -> list[ShadeState]:
        seen: dict[int, int] = {}
        out = []
        for layer in self.calls:
            k = seen.get(id(layer), 0)
            seen[id(layer)] = k + 1
            out.append(layer.states[k])
        return out


def convert(zoo: Zoo, model: nn.Module, x: torch.Tensor, applications: int
            ) -> tuple[nn.Module, str]:
    """``convert``; ``convert_fx`` when a training forward of the converted model has fewer
    SHADE call sites than the model has ReLU applications (functional ReLUs)."""
    kwargs = dict(unit_dim=zoo.unit_dim, backend="cpu")  # the native kernel, no silent fallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 'no ReLU module' warnings of a model that needs fx
        probe = shade_ops.convert(copy.deepcopy(model), **kwargs)
        probe(x)
    sites = sum(len(states) for states in shade_ops.call_sites(probe).values())
    if sites >= applications:
        return shade_ops.convert(model, **kwargs), "convert"
    return shade_ops.convert_fx(model, **kwargs), "convert_fx"


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.detach().double() - expected.detach().double()).abs().item() / \
        max(expected.detach().abs().item(), 1e-30)


def assert_close(actual, expected, rtol, what, atol_scale=1e-6):
    scale = max(expected.detach().abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach(), expected.detach(), rtol=rtol,
                               atol=atol_scale * scale, msg=lambda m: f"{what}: {m}")


def assert_grads(converted: nn.Module, plain: nn.Module, what: str) -> float:
    """The converted model's parameter gradients against the reference formulation's; returns
    the relative error of the whole gradient (2-norm). float32 rounding of the two backward
    passes differs at about 1e-6 of the model's largest gradient, which a BatchNorm's near-zero
    bias gradient shows at any relative tolerance (float64 agrees to 1e-13): the tolerance is
    relative to each element and to the model's largest gradient."""
    plain_params = dict(plain.named_parameters())
    pairs = []
    for name, p in converted.named_parameters():
        q = plain_params[name].grad
        assert (p.grad is None) == (q is None), f"{what}: {name} has a gradient on one side only"
        if q is not None:
            assert torch.isfinite(p.grad).all(), f"{what}: {name} has a non-finite gradient"
            pairs.append((name, p.grad, q))
    assert pairs
    largest = max(q.abs().max().item() for _, _, q in pairs)
    for name, g, q in pairs:
        torch.testing.assert_close(g, q, rtol=1e-4, atol=1e-5 * largest,
                                   msg=lambda m: f"{what} grad {name}: {m}")
    diff = sum(((g - q).double() ** 2).sum() for _, g, q in pairs)
    norm = sum((q.double() ** 2).sum() for _, _, q in pairs)
    return (diff / norm).sqrt().item()


def align_weights(converted: nn.Module, plain: nn.Module) -> None:
    """After the SGD step, which moved both models alike (to float32 rounding of the
    gradients), the converted model takes the reference's exact weights, so that the next step
    compares penalties and states on equal activations."""
    plain_tensors = dict(plain.named_parameters()) | dict(plain.named_buffers())
    with torch.no_grad():
        for name, t in [*converted.named_parameters(), *converted.named_buffers()]:
            if name in plain_tensors:
                assert not t.is_floating_point() or torch.isfinite(t).all(), name
                t.copy_(plain_tensors[name])


# ---- the results table ----------------------------------------------------------------------

ROWS: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def results_table():
    yield
    out = os.environ.get("SHADE_ZOO_OUT")
    if out and ROWS:
        write_table(Path(out))


def write_table(prefix: Path) -> None:
    order = [z.id for z in ZOO if "model" in ROWS.get(z.id, {})]
    rows = [ROWS[i] for i in order]
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "shade_ops": shade_ops.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "backends": shade_ops.available_backends(),
            "threads": torch.get_num_threads()}
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1)
                                           + "\n")

    def fmt(value, spec=".1e"):
        return "-" if value is None else format(value, spec)

    lines = [f"# SHADE on the model zoo, {meta['date']}", "",
             f"`make zoo`, torch {meta['torch']} on {meta['cpus']} x {meta['machine']} CPUs, "
             f"backend `cpu` (the native kernel); random weights, batch {BATCH}, training "
             f"mode. Relative error of `collect` against the sum of `shade_ops.reference.penalty` "
             f"over the recorded ReLU applications, at step 1 and at step 2 (after an SGD step "
             f"and the states' first update); grad: the 2-norm relative error of the parameter "
             f"gradient (task loss + {BETA} * collect) against the reference penalty's; bf16: "
             f"under `torch.autocast('cpu', bfloat16)`, against the reference on the same bf16 "
             f"activations; compile: `torch.compile` equal to eager.", "",
             "| library | model | input | ReLU applications | SHADE call sites | coverage | "
             "rel. err. step 1 | rel. err. step 2 | grad rel. err. | bf16 rel. err. | "
             "channels-last rel. err. | compile | convert | torch | s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|"]
    for r in rows:
        lines.append(
            f"| {r['library']} | {r['model']} | {'x'.join(map(str, r['input']))} | "
            f"{r['relu_applications']} | {r['shade_call_sites']} | {r['coverage_pct']:.0f}% | "
            f"{fmt(r['rel_err_step1'])} | {fmt(r['rel_err_step2'])} | {fmt(r['grad_rel_err'])} | "
            f"{fmt(r.get('bf16_rel_err'))} | {fmt(r.get('channels_last_rel_err'))} | "
            f"{'ok' if r.get('compile') else '-'} | `{r['convert']}` | {r['torch']} | "
            f"{r['seconds']:.1f} |")
    lines.append("")
    prefix.with_suffix(".md").write_text("\n".join(lines))


# ---- the tests ------------------------------------------------------------------------------

def test_the_installed_native_kernel_is_tested():
    """The zoo tests the installed package with its native CPU kernel, not the source tree (whose
    in-place build is for another torch) nor the reference fallback."""
    where = Path(shade_ops.__file__).resolve()
    site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    assert any(where.is_relative_to(s) for s in site), f"shade_ops imported from {where}"
    assert "cpu" in shade_ops.available_backends(), "shade_ops._C did not load"


@pytest.mark.parametrize("zoo", ZOO, ids=[z.id for z in ZOO])
def test_collect_equals_reference_at_every_relu(zoo):
    """Coverage, collect, per-site states and gradients against the reference, two steps."""
    start = time.perf_counter()
    model = fresh(zoo)
    plain, counted = copy.deepcopy(model), copy.deepcopy(model)
    x, target = zoo.input(0)
    applications = len(relu_inputs(copy.deepcopy(model), x, seed=0))
    assert applications > 0, f"{zoo.id} applies no ReLU"
    converted, how = convert(zoo, model, x, applications)
    order = CallOrder(converted)
    ref_states: list[ShadeState] = []       # for the recorded applications
    grad_states: list[ShadeState] = []      # for the differentiable reference formulation
    opt_converted = torch.optim.SGD(converted.parameters(), lr=LR)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=LR)
    errors, grad_errors = [], []
    for step in range(2):
        x, target = zoo.input(step)
        counted.load_state_dict(plain.state_dict())
        inputs = relu_inputs(counted, x, seed=step)
        assert len(inputs) == applications, "the ReLU applications changed between steps"
        expected = reference_sum(inputs, ref_states, zoo.unit_dim)

        torch.manual_seed(step)
        out = converted(x)
        total = shade_ops.collect(converted)
        states = order.states()
        assert len(states) == applications, \
            f"{zoo.id} ({how}): {len(states)} SHADE call sites for {applications} ReLU " \
            f"applications"
        assert_close(total, expected, RTOL, f"step {step + 1} collect")
        errors.append(rel_error(total, expected))
        for i, (state, ref) in enumerate(zip(states, ref_states)):
            assert state.num_units == ref.num_units, f"site {i} units"
            assert_close(state.mu, ref.mu, RTOL, f"step {step + 1} site {i} mu")
            assert_close(state.p, ref.p, RTOL, f"step {step + 1} site {i} p")

        mode = ReferencePenalties(grad_states, zoo.unit_dim)
        torch.manual_seed(step)
        with mode:
            out_plain = plain(x)
        assert len(mode.penalties) == applications, "the function-level ReLU calls differ " \
            "from the dispatched ones: the gradient reference does not cover them"
        assert_close(logits_of(out), logits_of(out_plain), RTOL, f"step {step + 1} output")
        loss_plain = task_loss(out_plain, target) + BETA * torch.stack(mode.penalties).sum()
        loss = task_loss(out, target) + BETA * total
        assert torch.isfinite(loss)
        opt_plain.zero_grad()
        opt_converted.zero_grad()
        loss_plain.backward()
        loss.backward()
        grad_errors.append(assert_grads(converted, plain, f"step {step + 1}"))
        opt_plain.step()
        opt_converted.step()
        align_weights(converted, plain)
    record(zoo, **{
        "library": zoo.library, "model": zoo.name, "input": zoo.input_shape(),
        "relu_applications": applications, "shade_call_sites": len(states),
        "coverage_pct": 100.0 * len(states) / applications, "rel_err_step1": errors[0],
        "rel_err_step2": errors[1], "grad_rel_err": max(grad_errors), "convert": how,
        "torch": torch.__version__,
        "seconds": time.perf_counter() - start})


def converted_copy(zoo: Zoo, memory_format=None) -> tuple[nn.Module, nn.Module, torch.Tensor,
                                                          torch.Tensor]:
    """(the converted model, an unconverted copy, input, target) for one more check."""
    model = fresh(zoo)
    x, target = zoo.input(0)
    if memory_format is not None:
        model = model.to(memory_format=memory_format)
        x = x.contiguous(memory_format=memory_format)
    plain = copy.deepcopy(model)
    applications = len(relu_inputs(copy.deepcopy(model), x, seed=0))
    converted, _ = convert(zoo, model, x, applications)
    return converted, plain, x, target


def record(zoo: Zoo, **values) -> None:
    ROWS.setdefault(zoo.id, {}).update(values)


@pytest.mark.parametrize("zoo", ZOO, ids=[z.id for z in ZOO])
def test_bf16_autocast(zoo):
    converted, plain, x, target = converted_copy(zoo)
    expected32 = reference_sum(relu_inputs(copy.deepcopy(plain), x, seed=0), [], zoo.unit_dim)
    inputs = relu_inputs(plain, x, seed=0, autocast=True)
    expected = reference_sum(inputs, [], zoo.unit_dim)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = converted(x)
        total = shade_ops.collect(converted)
        loss = task_loss(out, target) + BETA * total
    loss.backward()
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert_close(total, expected, BF16_RTOL, "bf16 collect against the reference")
    assert_close(total, expected32, BF16_FP32_RTOL, "bf16 collect against float32")
    for name, p in converted.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
    record(zoo, bf16_rel_err=rel_error(total, expected), bf16_vs_fp32_rel=rel_error(total,
                                                                                   expected32))


@pytest.mark.parametrize("zoo", [z for z in ZOO if z.conv], ids=[z.id for z in ZOO if z.conv])
def test_channels_last(zoo):
    converted, plain, x, target = converted_copy(zoo, torch.channels_last)
    inputs = relu_inputs(plain, x, seed=0)
    expected = reference_sum(inputs, [], zoo.unit_dim)
    torch.manual_seed(0)
    out = converted(x)
    total = shade_ops.collect(converted)
    (task_loss(out, target) + BETA * total).backward()
    assert_close(total, expected, RTOL, "channels-last collect")
    for name, p in converted.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
    record(zoo, channels_last_rel_err=rel_error(total, expected))


@pytest.mark.parametrize("zoo_id", COMPILED)
def test_compiled_equals_eager(zoo_id):
    zoo = BY_ID[zoo_id]
    torch._dynamo.reset()
    eager, _, x, _ = converted_copy(zoo)
    for module in eager.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # inductor draws its random numbers otherwise than eager
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    for step in range(2):
        x, target = zoo.input(step)
        results = []
        for model, run in ((eager, eager), (compiled_model, compiled)):
            torch.manual_seed(step)
            out = run(x)
            total = shade_ops.collect(model)
            model.zero_grad()
            (task_loss(out, target) + BETA * total).backward()
            results.append((total, {n: p.grad for n, p in model.named_parameters()}))
        (total_e, grads_e), (total_c, grads_c) = results
        assert_close(total_c, total_e, COMPILE_RTOL, f"step {step + 1} compiled collect")
        for name, grad in grads_e.items():
            if grad is not None:
                assert_close(grads_c[name], grad, COMPILE_RTOL, f"step {step + 1} {name}",
                             atol_scale=COMPILE_RTOL)
    record(zoo, compile=True)


@pytest.mark.parametrize("zoo", NO_RELU, ids=[z.id for z in NO_RELU])
def test_a_model_without_relu_is_reported(zoo):
    model = fresh(zoo)
    x, _ = zoo.input(0)
    assert relu_inputs(copy.deepcopy(model), x, seed=0) == []
    for convert_fn in (shade_ops.convert, shade_ops.convert_fx):
        with pytest.warns(UserWarning, match=r"no ReLU.*(ReLU6|SiLU)"):
            convert_fn(copy.deepcopy(model))
