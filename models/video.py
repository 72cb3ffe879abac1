"""The TSN frame shared by every 2D model: a backbone over N*T frames, dropout, fc, average consensus.

Input layout "NTCHW": a batch (N, T*snippet_len, C, H, W), T segments of `snippet_len` consecutive
frames each, clip-major. The frame is folded to (N*T, snippet_len*C, H, W) for the backbone, so frames
of one clip stay adjacent (what temporal modules rely on) and a snippet arrives as one
stacked-channel image (snippet_len = 1 for TSN/TSM/TAM/CT-Net: plain frames; MSN/TDN take 5-frame
snippets, 15 channels, and split them inside their own backbone). The backbone returns pooled features
(N*T, F); dropout then `fc` (N(0, 0.001) weights, zero bias, as TSN/TSM) give per-segment logits, and
the consensus averages them over T ("avg" on logits, before any softmax).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

if TYPE_CHECKING:
    from engine.config import ModelConfig


class VideoClassifier(nn.Module):
    """`backbone` (needs `num_features`) + dropout + `fc` + average consensus; logits (N, num_classes).

    partial_bn: TSN's partial BN: every BatchNorm2d of the ResNet trunk but the first stays in eval
      mode with frozen affine parameters (temporal modules' norms keep training, as in the official
      code, whose CT-Net/TAM norms are BatchNorm3d/1d; the TSM/TAM/CT-Net recipes turn it off).
    freeze_bn: every BN layer of the backbone in eval mode with frozen affine parameters.
    """

    layout = "NTCHW"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        num_segments: int,
        dropout: float = 0.5,
        snippet_len: int = 1,
        partial_bn: bool = False,
        freeze_bn: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 1 or num_segments < 1 or snippet_len < 1:
            raise ValueError(
                f"num_classes, num_segments and snippet_len must be >= 1 "
                f"(got {num_classes}, {num_segments}, {snippet_len})"
            )
        self.backbone = backbone
        self.num_classes = num_classes
        self.num_segments = num_segments
        self.snippet_len = snippet_len
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(backbone.num_features, num_classes)
        nn.init.normal_(self.fc.weight, 0.0, 0.001)
        nn.init.zeros_(self.fc.bias)
        self.frozen_bn = self._frozen_bn_layers(partial_bn, freeze_bn)
        for m in self.frozen_bn:
            for p in m.parameters():
                p.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg: ModelConfig, backbone: nn.Module, snippet_len: int = 1) -> VideoClassifier:
        """The frame around `backbone` with the options of a `model:` config section."""
        return cls(
            backbone,
            num_classes=cfg.num_classes,
            num_segments=cfg.num_segments,
            dropout=cfg.dropout,
            snippet_len=snippet_len,
            partial_bn=cfg.partial_bn,
            freeze_bn=cfg.freeze_bn,
        )

    def _frozen_bn_layers(self, partial_bn: bool, freeze_bn: bool) -> list[nn.Module]:
        if freeze_bn:
            return [m for m in self.backbone.modules() if isinstance(m, _BatchNorm)]
        if partial_bn:  # the trunk's BatchNorm2d layers, as TSN counts them (not those of temporal modules)
            inside = {
                id(m)
                for name, slot in self.backbone.named_modules()
                if name.rsplit(".", 1)[-1] == "temporal"
                for m in slot.modules()
            }
            trunk = [
                m for m in self.backbone.modules() if isinstance(m, nn.BatchNorm2d) and id(m) not in inside
            ]
            return trunk[1:]
        return []

    def train(self, mode: bool = True) -> VideoClassifier:
        """Like nn.Module.train, but frozen BN layers stay in eval mode (running stats fixed)."""
        super().train(mode)
        for m in self.frozen_bn:
            m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, frames, c, h, w = x.shape
        t = self.num_segments
        if frames != t * self.snippet_len:
            raise ValueError(
                f"expected {t} segments x {self.snippet_len} frames = {t * self.snippet_len} frames per "
                f"clip (layout NTCHW), got input of shape {tuple(x.shape)}"
            )
        features = self.backbone(x.reshape(n * t, self.snippet_len * c, h, w))
        logits = self.fc(self.dropout(features))
        return logits.view(n, t, -1).mean(dim=1)
