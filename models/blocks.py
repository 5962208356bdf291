"""Small networks, one per kind of coupling the dependency analysis handles (used by tests and
``bmrs-compress check``): residual addition with downsample, DenseNet concatenation, depthwise-
separable and inverted-residual blocks, ShuffleNet channel split and shuffle, and a transformer
(hand-written multi-head attention and ``nn.MultiheadAttention``). Inputs are 3x16x16 images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _cbr(cin, cout, k=3, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class _Head(nn.Module):
    def __init__(self, cin, classes):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(x), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = _cbr(cin, cout, 3, stride)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride > 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(self.bn2(self.conv2(self.conv1(x))) + shortcut)


def resnet_block(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(_cbr(3, 16), BasicBlock(16, 32, 2), BasicBlock(32, 32, 1), _Head(32, num_classes))


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.norm(x)))], 1)


def dense_block(num_classes: int = 10) -> nn.Module:
    layers = [nn.Conv2d(3, 8, 3, 1, 1, bias=False)] + [DenseLayer(8 + 4 * i, 4) for i in range(3)]
    transition = nn.Sequential(nn.BatchNorm2d(20), nn.ReLU(), nn.Conv2d(20, 12, 1, bias=False), nn.AvgPool2d(2))
    return nn.Sequential(*layers, transition, nn.BatchNorm2d(12), nn.ReLU(), _Head(12, num_classes))


class InvertedResidual(nn.Module):
    def __init__(self, c, expand):
        super().__init__()
        h = c * expand
        self.block = nn.Sequential(_cbr(c, h, 1), _cbr(h, h, 3, groups=h), nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.block(x)


def depthwise_separable(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        _cbr(3, 16), _cbr(16, 16, 3, 2, groups=16), _cbr(16, 32, 1),  # depthwise then pointwise
        InvertedResidual(32, 4), nn.Conv2d(32, 32, 3, 1, 1, groups=4), nn.ReLU(),  # and a grouped conv
        _Head(32, num_classes),
    )


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, c, stride):
        super().__init__()
        self.stride = stride
        half = c // 2
        cin = c if stride > 1 else half
        self.branch2 = nn.Sequential(_cbr(cin, half, 1), nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False),
                                     nn.BatchNorm2d(half), _cbr(half, half, 1))
        if stride > 1:
            self.branch1 = nn.Sequential(nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), nn.BatchNorm2d(c),
                                         _cbr(c, half, 1))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


def shuffle_block(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(_cbr(3, 16), ShuffleUnit(16, 2), ShuffleUnit(16, 1), ShuffleUnit(16, 1),
                         _cbr(16, 32, 1), _Head(32, num_classes))


class Attention(nn.Module):
    """Multi-head self-attention written out: separate q, k, v projections, heads by reshape."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t(x).view(b, n, self.heads, self.head_dim).transpose(1, 2) for t in (self.q, self.k, self.v))
        att = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
        out = att.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class TransformerBlock(nn.Module):
    def __init__(self, dim, heads, library_attention: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.library_attention = library_attention
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True) if library_attention else Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        h = self.attn(h, h, h, need_weights=False)[0] if self.library_attention else self.attn(h)
        x = x + h
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, dim=32, heads=4, num_classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.pos = nn.Parameter(torch.zeros(1, 16, dim))
        self.blocks = nn.Sequential(TransformerBlock(dim, heads, False), TransformerBlock(dim, heads, True))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


def transformer_block(num_classes: int = 10) -> nn.Module:
    return TinyViT(num_classes=num_classes)
