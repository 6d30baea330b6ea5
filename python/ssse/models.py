"""The model registry: architectures rebuilt from a JSON spec (what model files store) and the
per-sample losses by name."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

__all__ = ["LOSSES", "SmallResNet", "build_model", "loss_function"]


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
        if x.dim() == 2:  # flat features -> images
            x = x.view(x.shape[0], self.in_channels, self.image_size, self.image_size)
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool)
        x = F.relu(self.norm(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.head(x.mean(dim=(2, 3)))


def build_model(spec: dict) -> nn.Module:
    """A model from its spec: ``{"arch": "linear", "in_features", "out_features", "bias"}`` or
    ``{"arch": "small_resnet", "in_channels", "num_classes", "width", "image_size"[, "pool"]}``."""
    spec = dict(spec)
    arch = spec.pop("arch", None)
    if arch == "linear":
        return nn.Linear(int(spec["in_features"]), int(spec["out_features"]),
                         bias=bool(spec.get("bias", True)))
    if arch == "small_resnet":
        return SmallResNet(**{k: int(v) for k, v in spec.items()})
    raise ValueError(f"unknown model arch {arch!r} (expected 'linear' or 'small_resnet')")


def _cross_entropy(logits, targets):
    return F.cross_entropy(logits, targets, reduction="none")


def _bce(logits, targets):
    # One binary loss per attribute, summed: the per-sample loss of a multi-attribute model.
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype),
                                              reduction="none").sum(-1)


#: Losses by name, each ``loss(outputs, targets) -> (batch,)`` per-sample losses.
LOSSES = {"cross_entropy": _cross_entropy, "bce": _bce}


def loss_function(name: str):
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r} (expected one of {sorted(LOSSES)})") from None
