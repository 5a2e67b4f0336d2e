"""The paper's four architectures (Table 1), at a scale a CPU trains in seconds.

Every hidden layer is followed by its own ``nn.ReLU`` module (never one shared by two layers),
so ``shade_ops.convert(model)`` puts SHADE on every layer, as the paper does. ``dropout`` is the
rate of the dropout layers placed where the classic networks have them (before the
fully-connected layers); 0 leaves them out.

    model = shade_ops.convert(build_model("alexnet", in_shape=(3, 28, 28)))
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["MODELS", "AlexNet", "Inception", "MLP", "ResNet", "build_model"]

MODELS = ("mlp", "alexnet", "resnet", "inception")


def _dropout(rate: float) -> nn.Module:
    return nn.Dropout(rate) if rate > 0 else nn.Identity()


class MLP(nn.Module):
    """Three hidden fully-connected layers ("MLP 3x512" of Zhang et al., the paper's [6])."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int = 10, *, width: int = 512,
                 dropout: float = 0.0) -> None:
        super().__init__()
        in_features = int(torch.Size(in_shape).numel())
        layers: list[nn.Module] = [nn.Flatten()]
        for i in range(3):
            layers += [nn.Linear(in_features if i == 0 else width, width), nn.ReLU(),
                       _dropout(dropout)]
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AlexNet(nn.Module):
    """Three convolutional layers (each with a 2x2 max-pool) and two fully-connected ones."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int = 10, *, width: int = 32,
                 dropout: float = 0.0) -> None:
        super().__init__()
        channels = in_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten())
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *in_shape)).shape[1]
        self.classifier = nn.Sequential(
            _dropout(dropout), nn.Linear(flat, 8 * width), nn.ReLU(),
            _dropout(dropout), nn.Linear(8 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False),
                                          nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """The CIFAR ResNet of He et al. (the paper's [20]): three stages of ``blocks`` basic blocks,
    ``width``, 2x and 4x channels; ``blocks=1`` is ResNet-8."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int = 10, *, width: int = 16,
                 blocks: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_shape[0], width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        stages, inputs = [], width
        for stage in range(3):
            outputs = width * 2 ** stage
            for block in range(blocks):
                stages.append(_BasicBlock(inputs, outputs, 2 if stage and not block else 1))
                inputs = outputs
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), _dropout(dropout),
                                  nn.Linear(inputs, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class _ConvModule(nn.Sequential):
    def __init__(self, inputs: int, outputs: int, kernel: int, stride: int = 1) -> None:
        super().__init__(nn.Conv2d(inputs, outputs, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(outputs), nn.ReLU())


class _InceptionModule(nn.Module):
    """A 1x1 and a 3x3 conv module side by side, concatenated."""

    def __init__(self, inputs: int, ones: int, threes: int) -> None:
        super().__init__()
        self.branch1 = _ConvModule(inputs, ones, 1)
        self.branch3 = _ConvModule(inputs, threes, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x)], dim=1)


class _DownsampleModule(nn.Module):
    """A stride-2 3x3 conv module beside a 3x3 max-pool, concatenated."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.conv = _ConvModule(inputs, outputs, 3, stride=2)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.pool(x)], dim=1)


class Inception(nn.Module):
    """The small Inception of Zhang et al. (the paper's [6]), its middle stage cut from four
    inception modules to two: conv, 2 inception, downsample, 2 inception, downsample,
    2 inception, global mean pool, linear. ``width`` is the first conv's (96 in [6]); every
    other width scales with it."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int = 10, *, width: int = 24,
                 dropout: float = 0.0) -> None:
        super().__init__()

        def w(channels: int) -> int:
            return max(4, int(round(channels * width / 96)))

        def inception(inputs: int, ones: int, threes: int) -> tuple[nn.Module, int]:
            return _InceptionModule(inputs, w(ones), w(threes)), w(ones) + w(threes)

        layers: list[nn.Module] = [_ConvModule(in_shape[0], w(96), 3)]
        channels = w(96)
        plan = [("i", 32, 32), ("i", 32, 48), ("d", 80), ("i", 112, 48), ("i", 96, 64),
                ("d", 96), ("i", 176, 160), ("i", 176, 160)]
        for step in plan:
            if step[0] == "i":
                module, channels = inception(channels, step[1], step[2])
            else:
                module, channels = _DownsampleModule(channels, w(step[1])), channels + w(step[1])
            layers.append(module)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), _dropout(dropout),
                                  nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


_BUILDERS = {"mlp": MLP, "alexnet": AlexNet, "resnet": ResNet, "inception": Inception}


def build_model(name: str, in_shape: tuple[int, ...] = (3, 28, 28), num_classes: int = 10, *,
                dropout: float = 0.0, **kwargs) -> nn.Module:
    """One of :data:`MODELS` for ``(C, H, W)`` inputs; ``kwargs`` go to its class (``width``,
    and ``blocks`` for the ResNet)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
    return _BUILDERS[name](tuple(in_shape), num_classes, dropout=dropout, **kwargs)
