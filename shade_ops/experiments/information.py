"""The mechanism, measured: per layer H(Y), H(Y | C) and I(Y; C) (the paper's Fig. 1), and the
penalty's own Var(Y | Z), on a labelled data set.

    rows = layer_information(model, (x, labels))     # or a DataLoader of (x, labels) batches
    rows[0]["h_y_given_c"], rows[0]["i_y_c"], rows[0]["var_y_given_z"]

A layer is a call site (SPEC section 5) of a SHADE module (``ShadeReLU``, ``ShadePenalty``) or,
for a model without SHADE (the baseline), of an ``nn.ReLU`` module, so that the two are measured
at the same places. Y is the layer's input: for a ``ShadeReLU`` (or ``nn.ReLU``) the
pre-activation the paper regularises; for a ``ShadePenalty`` the output it penalises. A unit is a
channel, and every position of every image is a sample of it, as for the penalty itself.

**Estimator** (:func:`binned_entropies`): per unit, plug-in entropies in nats of Y quantised into
``bins`` equal-width bins (by default, per layer, ``auto_bins``: 30, or fewer where the layer has
fewer than 10 samples per class and bin, never under 2: a fully-connected layer measured on 500
images gets 5) spanning the unit's 0.5 % to 99.5 % quantiles on the data (values
outside fall into the end bins). The range follows the unit's own scale, so the entropies compare
the *shape* of distributions across layers, models and epochs, and each lies in [0, ln bins].
H(Y | C) = sum_c p(c) H(Y | C=c); I(Y; C) = H(Y) - H(Y | C), at most ln(classes). The layer's
values are the sums over its units, as the paper's layer-wise bound sums unit terms
(``*_per_unit`` are the means). Plug-in estimates are biased down by about
(occupied bins - 1) / (2 samples) per entropy, so H(Y | C) is biased down and I(Y; C) up by
about bins (classes - 1) / (2 samples) nats a unit: 0.05 at 10 samples per cell, under 1e-3
for a conv layer's 200,000 samples (``max_samples``). Values are comparable for one layer across
epochs and models (same samples, same bin count), not across layers of different bin counts.

**Var(Y | Z)**: ``var_y_given_z`` is, summed over units, E[s (y - mu1)^2 + q (y - mu0)^2] with
s = 1 - exp(-relu(y)), q = 1 - s and mu1 = E[s y] / E[s], mu0 = E[q y] / E[q] estimated on the
data set itself (the quantity whose log bounds H(Y | Z) in the paper), for every layer;
``penalty`` is SHADE's own term (SPEC section 2, reduction "mean") with the moving averages of
the layer's state, for SHADE layers only (None for an ``nn.ReLU``).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..modules import _ShadeLayer

__all__ = ["auto_bins", "binned_entropies", "layer_information"]


def binned_entropies(y: torch.Tensor, labels: torch.Tensor, bins: int = 30,
                     num_classes: int | None = None) -> dict[str, torch.Tensor]:
    """Per-unit H(Y), H(Y | C), I(Y; C) in nats of ``y`` ``(K, units)`` given integer ``labels``
    ``(K,)`` (see the module's docstring for the bin rule). Returns float64 tensors of shape
    ``(units,)`` under the keys ``h_y``, ``h_y_given_c``, ``i_y_c``."""
    if y.dim() == 1:
        y = y[:, None]
    if y.dim() != 2 or labels.shape != y.shape[:1]:
        raise ValueError(f"y must be (samples, units) and labels (samples,), got {tuple(y.shape)}"
                         f" and {tuple(labels.shape)}")
    if bins < 1:
        raise ValueError(f"bins must be positive, got {bins}")
    y = y.double()
    samples, units = y.shape
    classes = int(num_classes if num_classes is not None else labels.max().item() + 1)
    lo, hi = torch.quantile(y, torch.tensor([0.005, 0.995], dtype=y.dtype), dim=0)
    width = (hi - lo).clamp_min(1e-12) / bins
    index = ((y - lo) / width).floor().clamp(0, bins - 1).long()          # (K, units)
    flat = (torch.arange(units)[None, :] * classes + labels.long()[:, None]) * bins + index
    joint = torch.bincount(flat.reshape(-1), minlength=units * classes * bins)
    joint = joint.reshape(units, classes, bins).double() / samples      # p(c, y) per unit
    p_c = joint.sum(2)                                                  # (units, classes)
    h_y = _entropy(joint.sum(1))
    h_joint = _entropy(joint.reshape(units, -1))
    h_c = _entropy(p_c)
    h_y_given_c = h_joint - h_c
    return {"h_y": h_y, "h_y_given_c": h_y_given_c, "i_y_c": h_y - h_y_given_c}


def auto_bins(samples: int, classes: int, most: int = 30) -> int:
    """The bin count :func:`layer_information` uses by default: ``most``, or as many as leave 10
    samples per (class, bin) cell on average, at least 2."""
    return max(2, min(most, samples // (10 * max(classes, 1))))


def _entropy(p: torch.Tensor) -> torch.Tensor:
    terms = torch.where(p > 0, -p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))
    return terms.sum(-1)


def _units_first(y: torch.Tensor, module: nn.Module, site: int) -> torch.Tensor:
    """``y`` as ``(samples, units)`` with the module's unit dim."""
    unit_dim = getattr(module, "unit_dim", None)
    if unit_dim is None:
        unit_dim = 1
        if y.dim() == 3 and isinstance(module, _ShadeLayer) and site < len(module.states) and \
                y.shape[1] != module.states[site].num_units:
            unit_dim = -1
    if y.dim() == 1:
        return y[:, None]
    return y.movedim(unit_dim, -1).reshape(-1, y.shape[unit_dim])


def _measured_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    shade = [(n, m) for n, m in model.named_modules() if isinstance(m, _ShadeLayer)]
    if shade:
        return shade
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ReLU)]


@torch.no_grad()
def layer_information(model: nn.Module,
                      data: tuple[torch.Tensor, torch.Tensor] | Iterable,
                      *, bins: int | None = None, num_classes: int | None = None,
                      max_samples: int = 200_000, batch_size: int = 500,
                      seed: int = 0) -> list[dict]:
    """H(Y), H(Y | C), I(Y; C) and Var(Y | Z) of every layer (call site) of ``model`` on
    ``data``: a pair ``(inputs, labels)`` of tensors, or an iterable of such batches.

    The model runs in eval mode (dropout off, BatchNorm's running statistics, no SHADE state
    update) and is put back in the mode it was in. Layers are the call sites of its SHADE modules
    or, where it has none, of its ``nn.ReLU`` modules. At most ``max_samples`` samples of each
    layer are kept (positions drawn at random, by ``seed``, from every batch in proportion).

    Returns one dict a layer, in call order: ``name`` (module name, ``#k`` for call site k > 0),
    ``site``, ``units``, ``samples``, ``bins`` (``None``: :func:`auto_bins`), and, in nats summed over units, ``h_y``, ``h_y_given_c``,
    ``i_y_c`` (``*_per_unit``: the means), plus ``var_y_given_z`` and ``penalty`` (see the
    module's docstring).
    """
    modules = _measured_modules(model)
    if not modules:
        raise ValueError(f"this {type(model).__name__} has no SHADE layer and no nn.ReLU module "
                         f"to measure")
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x_all, y_all = data
        batches: Iterable = ((x_all[i:i + batch_size], y_all[i:i + batch_size])
                             for i in range(0, len(y_all), batch_size))
        total_images = len(y_all)
    else:
        batches, total_images = data, None

    captured: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    calls = {id(m): 0 for _, m in modules}
    current: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(seed)

    def hook(module, inputs, output):
        site = calls[id(module)]
        calls[id(module)] += 1
        units = _units_first(inputs[0].detach().float(), module, site)
        per_image = units.shape[0] // max(len(current["labels"]), 1)
        labels = current["labels"].repeat_interleave(per_image)
        keep = current["keep_fraction"](per_image)
        if keep < 1.0:
            chosen = torch.randperm(len(labels), generator=generator)[:max(1, int(keep *
                                                                               len(labels)))]
            units, labels = units[chosen], labels[chosen]
        captured.setdefault((id(module), site), []).append((units.cpu(), labels.cpu()))

    handles = [m.register_forward_hook(hook) for _, m in modules]
    was_training = model.training
    model.eval()
    try:
        for x, labels in batches:
            for key in calls:
                calls[key] = 0
            current["labels"] = labels
            total = total_images or len(labels)
            current["keep_fraction"] = lambda per_image, total=total: min(
                1.0, max_samples / max(per_image * total, 1))
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    names = {id(m): n for n, m in modules}
    by_module = {id(m): m for _, m in modules}
    rows = []
    for (key, site), parts in captured.items():
        y = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        classes = int(num_classes if num_classes is not None else labels.max().item() + 1)
        layer_bins = bins if bins is not None else auto_bins(len(labels), classes)
        entropies = binned_entropies(y, labels, layer_bins, classes)
        module = by_module[key]
        units = y.shape[1]
        row = {"name": names[key] + (f"#{site}" if site else ""), "site": site, "units": units,
               "samples": len(labels), "bins": layer_bins}
        for k, v in entropies.items():
            row[k] = v.sum().item()
            row[f"{k}_per_unit"] = v.mean().item()
        row["var_y_given_z"] = _conditional_variance(y, None).sum().item()
        state = module.states[site] if isinstance(module, _ShadeLayer) and \
            site < len(module.states) else None
        row["penalty"] = (_conditional_variance(y, state).sum().item()
                          if state is not None else None)
        rows.append(row)
    return rows   # in call order: the dict keeps the order of the first batch's calls


def _conditional_variance(y: torch.Tensor, state) -> torch.Tensor:
    """Per unit E[s (y - mu1)^2 + q (y - mu0)^2] over the samples of ``y`` ``(K, units)``; mu
    from ``state`` (SHADE's penalty) or, when None, from ``y`` itself."""
    y = y.double()
    s = 1 - torch.exp(-y.clamp_min(0))
    q = 1 - s
    if state is None:
        mu1 = (s * y).sum(0) / s.sum(0).clamp_min(1e-12)
        mu0 = (q * y).sum(0) / q.sum(0).clamp_min(1e-12)
    else:
        mu0, mu1 = state.mu.detach().double().cpu()
    return (s * (y - mu1) ** 2 + q * (y - mu0) ** 2).mean(0)

