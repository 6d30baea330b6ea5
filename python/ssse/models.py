"""The model registry: architectures rebuilt from a JSON spec (what model files store) and the
per-sample losses by name."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

__all__ = ["ARCHITECTURES", "LOSSES", "LOSS_LIKELIHOODS", "ResNet", "SmallResNet", "build_model",
           "loss_function"]


def _images(x, channels: int, size: int, pool: int):
    """Flat features as ``(m, channels, size, size)`` images, average-pooled by ``pool``."""
    if x.dim() == 2:
        x = x.view(x.shape[0], channels, size, size)
    return F.avg_pool2d(x, pool) if pool > 1 else x


def _groups(channels: int) -> int:
    """GroupNorm groups: 32 where the channels allow, with at least 4 channels per group."""
    return max(1, min(32, channels // 4))


class _Residual(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(groups, channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(groups, channels_out)
        self.skip = (nn.Conv2d(channels_in, channels_out, 1, stride, bias=False)
                     if stride != 1 or channels_in != channels_out else nn.Identity())

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(out)) + self.skip(x))


class SmallResNet(nn.Module):
    """A ResNet-style CNN small enough for per-sample gradients on a CPU.

    GroupNorm instead of BatchNorm: every sample's output (and gradient) depends on that sample
    only, which per-sample gradients and the empirical Fisher assume. ``pool > 1`` average-pools
    the input images by that factor first (Fashion-MNIST's 28x28 at 14x14 fits a CPU budget).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8,
                 image_size: int = 28, pool: int = 1):
        super().__init__()
        if pool < 1 or image_size % pool:
            raise ValueError(f"pool must be a positive divisor of image_size={image_size}, "
                             f"got {pool}")
        self.pool = pool
        groups = max(1, width // 4)
        self.stem = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.norm = nn.GroupNorm(groups, width)
        self.layer1 = _Residual(width, width, 1, groups)
        self.layer2 = _Residual(width, 2 * width, 2, groups)
        self.head = nn.Linear(2 * width, num_classes)
        self.image_size = image_size
        self.in_channels = in_channels

    def forward(self, x):
        x = F.relu(self.norm(self.stem(_images(x, self.in_channels, self.image_size,
                                               self.pool))))
        x = self.layer2(self.layer1(x))
        return self.head(x.mean(dim=(2, 3)))


class ResNet(nn.Module):
    """A ResNet of basic blocks for small images, with GroupNorm (so per-sample gradients are
    defined: a sample's output depends on that sample only).

    ``depth=18``: four stages of two blocks, widths ``w, 2w, 4w, 8w`` (``w = 64``: the
    ResNet-18 of He et al. with a 3x3 stem for 32x32 inputs, 11.2 M parameters for 10
    classes). ``depth=20``: the CIFAR ResNet-20, three stages of three blocks, widths
    ``w, 2w, 4w`` (``w = 16``: 0.27 M parameters), as in paper §5.3. ``pool > 1``
    average-pools the input images by that factor first.
    """

    _STAGES = {18: (2, 2, 2, 2), 20: (3, 3, 3)}

    def __init__(self, depth: int = 18, in_channels: int = 3, num_classes: int = 10,
                 width: int | None = None, image_size: int = 32, pool: int = 1):
        super().__init__()
        if depth not in self._STAGES:
            raise ValueError(f"depth must be one of {sorted(self._STAGES)}, got {depth}")
        if pool < 1 or image_size % pool:
            raise ValueError(f"pool must be a positive divisor of image_size={image_size}, "
                             f"got {pool}")
        width = width or (64 if depth == 18 else 16)
        self.in_channels, self.image_size, self.pool = in_channels, image_size, pool
        self.stem = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.norm = nn.GroupNorm(_groups(width), width)
        layers, c = [], width
        for i, blocks in enumerate(self._STAGES[depth]):
            out = width * 2 ** i
            for j in range(blocks):
                layers.append(_Residual(c, out, 2 if (j == 0 and i > 0) else 1, _groups(out)))
                c = out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        x = F.relu(self.norm(self.stem(_images(x, self.in_channels, self.image_size,
                                               self.pool))))
        return self.head(self.layers(x).mean(dim=(2, 3)))


def _linear(in_features, out_features, bias=True, **_) -> nn.Linear:
    return nn.Linear(int(in_features), int(out_features), bias=bool(bias))


def _integers(cls):
    def build(**spec):
        return cls(**{k: int(v) for k, v in spec.items()})
    return build


#: The built-in architectures by the ``arch`` of a spec, each ``build(**rest of the spec)``.
ARCHITECTURES = {"linear": _linear, "small_resnet": _integers(SmallResNet),
                 "resnet": _integers(ResNet)}


def build_model(spec: dict) -> nn.Module:
    """A model from its spec: ``{"arch": "linear", "in_features", "out_features", "bias"}``,
    ``{"arch": "small_resnet", "in_channels", "num_classes", "width", "image_size"[, "pool"]}``
    or ``{"arch": "resnet", "depth", "in_channels", "num_classes"[, "width", "image_size"]}``
    (:data:`ARCHITECTURES`)."""
    spec = dict(spec)
    arch = spec.pop("arch", None)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model arch {arch!r} (expected one of "
                         f"{', '.join(map(repr, ARCHITECTURES))})")
    return ARCHITECTURES[arch](**spec)


def _cross_entropy(logits, targets):
    return F.cross_entropy(logits, targets, reduction="none")


def _bce(logits, targets):
    # One binary loss per attribute, summed: the per-sample loss of a multi-attribute model.
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype),
                                              reduction="none").sum(-1)


#: Losses by name, each ``loss(outputs, targets) -> (batch,)`` per-sample losses.
LOSSES = {"cross_entropy": _cross_entropy, "bce": _bce}
#: The output distribution each loss is the negative log-likelihood of (what the Gauss–Newton
#: and Monte-Carlo curvatures sample from).
LOSS_LIKELIHOODS = {"cross_entropy": "categorical", "bce": "bernoulli"}


def loss_function(name: str):
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r} (expected one of {sorted(LOSSES)})") from None
