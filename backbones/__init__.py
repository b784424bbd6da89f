"""Backbones: pure nn.Modules returning C3/C4/C5 features (strides 8, 16, 32), and their registry.

Importing the package registers every backbone: the modules below are imported explicitly (STYLE §5).
"""

from __future__ import annotations

from backbones import csp, csp11, csp26, resnet, timm_any, torchvision_any  # noqa: F401  (registration happens on import)
from backbones.registry import build_backbone, list_backbones, register_backbone

__all__ = ["build_backbone", "list_backbones", "register_backbone"]
