"""Plain-torch CNNs: a ResNet-50-like classifier (a chain of stages) and a U-Net (skips: not a chain).

Both take ``forward(x, labels=None)`` and return logits, or the mean cross-entropy when labels are given,
so ``model(**batch)`` is the loss of a sample batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from tightfit.zoo.batches import image_batch_factory
from tightfit.zoo.registry import ModelSpec, dataclass_model_factory, register


# ------------------------------------------------------------------------------------------------ ResNet
@dataclass(frozen=True)
class ResNetConfig:
    layers: tuple[int, ...] = (3, 4, 6, 3)  # bottleneck blocks per stage: ResNet-50
    width: int = 64  # stem channels; stage i has width * 2**i inner channels, 4x that outside
    num_classes: int = 1000
    in_channels: int = 3


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand (x4), each with BatchNorm; identity or projected shortcut."""

    expansion = 4

    def __init__(self, in_ch: int, mid: int, stride: int = 1) -> None:
        super().__init__()
        out = mid * self.expansion
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)  # in place, as in torchvision: part of the real memory profile
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_ch, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
            if stride != 1 or in_ch != out
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet(nn.Module):
    """ResNet-v1.5 with bottleneck blocks: stem, four stages (``stages[i]`` is an nn.Sequential), pool, fc."""

    def __init__(self, config: ResNetConfig = ResNetConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, w, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages = []
        in_ch = w
        for i, n in enumerate(config.layers):
            mid = w * 2**i
            blocks = [Bottleneck(in_ch, mid, stride=1 if i == 0 else 2)]
            in_ch = mid * Bottleneck.expansion
            blocks += [Bottleneck(in_ch, mid) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, config.num_classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))
        return logits if labels is None else F.cross_entropy(logits, labels)


# ------------------------------------------------------------------------------------------------ U-Net
@dataclass(frozen=True)
class UNetConfig:
    width: int = 64  # channels at full resolution, doubled at each level down
    depth: int = 4  # number of 2x downsamplings; the image side must be a multiple of 2**depth
    in_channels: int = 3
    num_classes: int = 2  # per-pixel classes


class DoubleConv(nn.Sequential):
    """(3x3 conv, BatchNorm, ReLU) twice."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """2x transposed-conv upsampling, concatenation with the encoder's skip tensor, DoubleConv."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2)
        self.conv = DoubleConv(2 * out_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015, padded convs): encoder outputs are kept until the decoder uses them,
    so the forward graph is not a chain. Returns per-pixel logits, or the cross-entropy given (B, N, N) labels
    """

    def __init__(self, config: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.inc = DoubleConv(config.in_channels, w)
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(w * 2**i, w * 2 ** (i + 1)))
            for i in range(config.depth)
        )
        self.ups = nn.ModuleList(Up(w * 2 ** (i + 1), w * 2**i) for i in reversed(range(config.depth)))
        self.outc = nn.Conv2d(w, config.num_classes, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        side = 2**self.config.depth
        if x.shape[-1] % side or x.shape[-2] % side:
            raise ValueError(
                f"UNet with depth {self.config.depth} needs image sides divisible by {side}, "
                f"got input shape {tuple(x.shape)}"
            )
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        logits = self.outc(y)
        return logits if labels is None else F.cross_entropy(logits, labels)


# ------------------------------------------------------------------------------------------ registration
_RESNET = ResNetConfig()
_RESNET_TINY = ResNetConfig(layers=(1, 1, 1, 1), width=8, num_classes=10)
_UNET = UNetConfig()
_UNET_TINY = UNetConfig(width=8, depth=2)

for _name, _cls, _cfg, _batch, _size, _dense, _desc in (
    (
        "resnet50",
        ResNet,
        _RESNET,
        8,
        224,
        False,
        "ResNet-50-like CNN: bottleneck stages (3,4,6,3), 25.6M params",
    ),
    (
        "resnet50-tiny",
        ResNet,
        _RESNET_TINY,
        2,
        32,
        False,
        "resnet50 wiring at test size: 1 block per stage, width 8",
    ),
    ("unet", UNet, _UNET, 4, 256, True, "U-Net: 4 levels, width 64, skip connections, 31.0M params"),
    ("unet-tiny", UNet, _UNET_TINY, 2, 32, True, "unet wiring at test size: 2 levels, width 8"),
):
    register(
        ModelSpec(
            name=_name,
            model_factory=dataclass_model_factory(_name, _cls, _cfg),
            batch_factory=image_batch_factory(
                _name,
                _cfg.in_channels,
                _cfg.num_classes,
                _batch,
                _size,
                dense=_dense,
                multiple_of=2**_cfg.depth if isinstance(_cfg, UNetConfig) else 1,
            ),
            input_kind="image",
            description=_desc,
            family="unet" if _cls is UNet else "resnet",
        )
    )
