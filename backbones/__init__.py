"""Backbones: pure nn.Modules returning C3/C4/C5 features, and their registry."""
