"""`tv:<name>`: any torchvision classification model as a three-level feature extractor.

The model is traced with `torchvision.models.feature_extraction` and probed once, at build time, with a
non-square dummy input (1x3x128x384): every node whose output is a 4-D map gets a stride from the difference of its
sides, (W - H) / (w - h), which padding-free layers do not disturb and which rejects fixed-size maps (an adaptive
pool's 7x7). Among *block outputs* (the last node of each module at one nesting depth, the shallowest depth that
reaches all three strides), the deepest one at each of strides 8, 16 and 32 is returned: block outputs rather than
any node, so that a tap is e.g. MobileNet's `features.6` and not the expansion conv that opens the next,
downsampling block. Maps stored channels-last (B, H, W, C) are permuted to (B, C, H, W).

torchvision is imported only when a `tv:` backbone is built: importing it pulls in torch._dynamo (through
`torchvision.ops`), about 1.5 s that every tool would otherwise pay at start-up, while registering the `tv:` names
needs none of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from backbones.checkpoint import is_backbone_checkpoint, load_backbone_weights, read_weights
from backbones.errors import UserError
from backbones.registry import register_backbone, register_backbone_family

# Probe inputs (H, W), tried in order: non-square so that strides show in the side difference; the second suits
# models whose windows need sides divisible by 7 * 32 (MaxViT).
PROBE_SIZES = ((128, 384), (224, 448))
TARGET_STRIDES = (8, 16, 32)
# Builder arguments that keep construction fast and the graph free of training-only branches.
DEFAULT_MODEL_KWARGS: dict[str, dict[str, object]] = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
}
REGISTERED_MODELS = (
    "vgg16_bn",
    "googlenet",
    "densenet121",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
    "alexnet",
)


def contract_map(y: torch.Tensor, x: torch.Tensor, stride: int, channels_last: bool) -> torch.Tensor:
    """A feature map as the backbone contract wants it: NCHW (permuted from [B, h, w, C] when `channels_last`), at
    ceil(H / stride) x ceil(W / stride) of the input `x` (bilinear resize where padding-free layers lose cells)."""
    if channels_last:
        y = y.permute(0, 3, 1, 2)  # [B, h, w, C] -> [B, C, h, w]
    size = (math.ceil(x.shape[-2] / stride), math.ceil(x.shape[-1] / stride))
    if tuple(y.shape[-2:]) != size:
        y = nn.functional.interpolate(y, size=size, mode="bilinear", align_corners=False)
    return y


@dataclass(frozen=True)
class MapInfo:
    """What the probe learned about one node's output: stride, channels, and whether it is channels-last."""

    stride: int
    channels: int
    channels_last: bool


def map_info(shape: tuple[int, ...], size: tuple[int, int]) -> MapInfo | None:
    """Interprets a node's output shape as a feature map of the probe input, if it is one.

    The stride is read from the difference of the two sides: (W - H) / (w - h). Padding-free layers (Inception's,
    AlexNet's) lose a few cells on both sides alike, so the difference survives them, and a fixed-size map (an
    adaptive pool's 7x7) has w - h = 0 and is rejected.

    Args:
        shape: the output shape, [1, C, h, w] or [1, h, w, C].
        size: the probe input's (H, W), with W - H a multiple of 64.

    Returns:
        The map's stride (a power of two), channels and layout; None when the shape is no feature map.
    """
    if len(shape) != 4:
        return None
    best: tuple[float, MapInfo] | None = None
    for channels_last, (h, w, c) in ((False, (shape[2], shape[3], shape[1])), (True, (shape[1], shape[2], shape[3]))):
        if h <= 0 or w <= h:
            continue
        estimate = math.log2((size[1] - size[0]) / (w - h))
        stride = 2 ** round(estimate)
        misfit = [abs(got - full / stride) for full, got in zip(size, (h, w), strict=True)]
        if abs(estimate - round(estimate)) >= 0.25 or any(
            m > 3 + 0.1 * full / stride for m, full in zip(misfit, size, strict=True)
        ):
            continue
        # Both layouts may fit by chance (a channels-last map whose C looks like a width): keep the closer fit.
        score = abs(estimate - round(estimate)) + misfit[0] * stride / size[0]
        if best is None or score < best[0]:
            best = (score, MapInfo(stride, c, channels_last))
    return None if best is None else best[1]


def probe_maps(model: nn.Module, order: list[str], size: tuple[int, int]) -> dict[str, MapInfo]:
    """Runs the traced model once on zeros [1, 3, H, W] and returns the nodes whose output is a feature map."""
    from torchvision.models.feature_extraction import create_feature_extractor

    probe = create_feature_extractor(model, return_nodes=order)
    with torch.no_grad():
        outputs = probe(torch.zeros(1, 3, *size))
    infos = {}
    for node, value in outputs.items():
        info = map_info(tuple(value.shape), size) if isinstance(value, torch.Tensor) else None
        if info is not None:
            infos[node] = info
    return infos


def block_prefix(node: str, depth: int) -> str:
    """The module path of `node` cut to `depth` components: "features.7.block.0" at depth 2 -> "features.7"."""
    return ".".join(node.split(".")[:depth])


def choose_taps(order: list[str], infos: dict[str, MapInfo]) -> tuple[dict[int, str], int] | None:
    """Picks the deepest block output at each target stride, at the shallowest nesting depth that has them all.

    Args:
        order: node names in execution order.
        infos: probe results of the nodes whose output is a feature map.

    Returns:
        ({stride: node}, depth), or None when no depth reaches strides 8, 16 and 32 in order.
    """
    position = {node: i for i, node in enumerate(order)}
    max_depth = max(len(n.split(".")) for n in order)
    for depth in range(1, max_depth + 1):
        last: dict[str, str] = {}
        for node in order:
            last[block_prefix(node, depth)] = node
        taps: dict[int, str] = {}
        for node in sorted(set(last.values()), key=position.__getitem__):
            if node in infos:
                taps[infos[node].stride] = node
        if all(s in taps for s in TARGET_STRIDES):
            positions = [position[taps[s]] for s in TARGET_STRIDES]
            if positions == sorted(positions):
                return {s: taps[s] for s in TARGET_STRIDES}, depth
    return None


class TorchvisionBackbone(nn.Module):
    """A torchvision classifier cut to its stride-8/16/32 block outputs.

    Args:
        name: a torchvision classification model name, e.g. "efficientnet_b0".
        model: the built classifier (weights already in it, if any).

    Attributes:
        body: the traced `GraphModule`; unused layers (the classifier head) are gone.
        out_channels: channels of the three maps.
        strides: (8, 16, 32).
        return_nodes: the traced node behind each map.
    """

    def __init__(self, name: str, model: nn.Module) -> None:
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        super().__init__()
        self.name = name
        model.eval()
        train_nodes, eval_nodes = get_graph_node_names(model)
        order = [n for n in eval_nodes if n in set(train_nodes)]
        chosen, infos, error = None, {}, None
        for size in PROBE_SIZES:
            try:
                infos = probe_maps(model, order, size)
            except RuntimeError as e:  # e.g. a reshape into fixed windows that this size does not fill
                error = e
                continue
            chosen = choose_taps(order, infos)
            if chosen is not None:
                break
        if chosen is None and not infos and error is not None:
            raise error
        if chosen is None:
            available = sorted({i.stride for i in infos.values() if i.stride <= 64})
            raise UserError(
                f"backbone tv:{name} cannot give feature maps at strides 8, 16 and 32: its maps have strides "
                f"{', '.join(map(str, available)) or 'none'}"
            )
        taps, self.depth = chosen
        self.return_nodes: tuple[str, str, str] = tuple(taps[s] for s in TARGET_STRIDES)
        self.body = create_feature_extractor(model, return_nodes={n: f"c{i + 3}" for i, n in enumerate(taps.values())})
        self.out_channels: tuple[int, int, int] = tuple(infos[n].channels for n in self.return_nodes)
        self.strides: tuple[int, int, int] = TARGET_STRIDES
        self.channels_last: tuple[bool, bool, bool] = tuple(infos[n].channels_last for n in self.return_nodes)
        self._unit_strides = self._block_strides(order, infos)
        self.train()  # a fresh module trains, like any other; the probe ran in eval mode

    def _block_strides(self, order: list[str], infos: dict[str, MapInfo]) -> dict[str, int]:
        """Stride of each block output at the chosen depth (for `stage_modules`)."""
        last: dict[str, str] = {}
        for node in order:
            last[block_prefix(node, self.depth)] = node
        return {prefix: infos[node].stride for prefix, node in last.items() if node in infos}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Args: x [B, 3, H, W]. Returns: three maps [B, c_i, ceil(H/s_i), ceil(W/s_i)] for s = 8, 16, 32.

        Where the model's own padding gives another size (AlexNet: 19x27 instead of 20x28 at stride 8 for a
        160x224 input), the map is resized bilinearly, so that every backbone meets the same size contract and
        a PAN neck can upsample by 2 and concatenate.
        """
        features = self.body(x)
        maps = []
        for key, stride, channels_last in zip(("c3", "c4", "c5"), self.strides, self.channels_last, strict=True):
            maps.append(contract_map(features[key], x, stride, channels_last))
        return maps

    def stage_modules(self) -> list[nn.Module]:
        """Returns [up to stride 4, up to C3, up to C4, up to C5] as containers of the traced blocks.

        The containers are made on each call and hold the body's own modules. Where the blocks cannot be
        grouped so (a parameter owned by the top module, say), returns `[body]`: one stage.
        """
        groups: list[list[nn.Module]] = [[], [], [], []]
        group = 0
        seen: set[str] = set()
        for key, _ in self.body.named_parameters():
            parts = key.split(".")[:-1]
            prefix = ".".join(parts[: self.depth])
            if not prefix:
                return [self.body]
            if prefix in seen:
                continue
            seen.add(prefix)
            stride = self._unit_strides.get(prefix)
            if stride is not None:
                group = max(group, min(3, max(0, int(math.log2(stride)) - 2)))
            groups[group].append(self.body.get_submodule(prefix))
        return [nn.ModuleList(g) for g in groups]


def build_torchvision_backbone(name: str, weights: str | None = None, **model_kwargs: object) -> TorchvisionBackbone:
    """Builds `tv:<name>`, optionally with weights. Never downloads.

    Args:
        name: a torchvision classification model name (`torchvision.models.list_models(torchvision.models)`).
        weights: None; a local file (the torchvision model's state dict, or a backbone checkpoint); or a
            torchvision weights name such as "IMAGENET1K_V1", read only from the torch cache.
        **model_kwargs: passed to the torchvision builder (e.g. `transform_input=True` for googlenet's ImageNet
            weights).

    Returns:
        The backbone.

    Raises:
        UserError: not a torchvision classification model, untraceable, no strides 8/16/32, or bad weights.
    """
    import torchvision

    arch = f"tv:{name}"
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise UserError(f"unknown backbone {arch!r}: torchvision classification models are {', '.join(known)}")
    kwargs = {**DEFAULT_MODEL_KWARGS.get(name, {}), **model_kwargs}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    loaded = read_weights(weights, arch, torchvision_model=name) if weights is not None else None
    try:
        backbone = TorchvisionBackbone(name, model)
    except UserError:
        raise
    except Exception as e:  # tracing failures come as many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"backbone {arch} cannot be traced and probed by torch.fx: {type(e).__name__}: {first}") from e
    if loaded is not None:
        if not is_backbone_checkpoint(loaded) and not any(k.startswith("body.") for k in loaded):
            # A torchvision state dict: keep the keys the traced body still uses (the classifier head is gone).
            wanted = set(backbone.state_dict())
            loaded = {f"body.{k}": v for k, v in loaded.items() if f"body.{k}" in wanted}
        load_backbone_weights(backbone, loaded, arch=arch, source_name=str(weights))
    return backbone


@register_backbone_family("tv:")
def _resolve_torchvision(name: str, **kwargs: object) -> TorchvisionBackbone:
    """Resolves any `tv:<name>` not registered explicitly."""
    return build_torchvision_backbone(name, **kwargs)


def _register(name: str) -> None:
    """Registers `tv:<name>` so that it is listed and covered by the contract test."""

    def factory(weights: str | None = None, **model_kwargs: object) -> TorchvisionBackbone:
        return build_torchvision_backbone(name, weights, **model_kwargs)

    factory.__doc__ = f"torchvision {name} as a stride-8/16/32 feature extractor."
    register_backbone(f"tv:{name}")(factory)


for _name in REGISTERED_MODELS:
    _register(_name)
