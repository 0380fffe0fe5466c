"""Nested-feature network (backbone + tree of gained segments) and the conventional baseline."""

from __future__ import annotations

import math

import torch
from torch import nn

from .tree import CategoryTree, SegmentSpec

EPS = 1e-12


def conv_bn_relu(cin: int, cout: int, k: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


# What a segment's gain does in this code (Segment.forward and HomogeneousHead), as the package
# manifest declares it (docs/model-package.md, "gain").
GAIN_SEMANTICS = {"multiplies": "segment_output", "zero_is_cutout": True, "logit_effect": "adds_log_gain"}


class Backbone(nn.Module):
    """Edge part: normalised image [N,C,H,W] -> bounded bottleneck [N,B,H/4,W/4] in (-1, 1).

    `widths` (w1, w2, ...): conv(w1) at full resolution, 2x2 max-pool, conv(w2) ... at half
    resolution, 2x2 max-pool, then `low_widths` convs at the bottleneck's resolution (a quarter),
    then a 1x1 projection to the bottleneck. (32, 64, 64) is the v1 stem; (16, 48) the cheaper
    v2 stem (about 1.5 M instead of 11 M MACs at 28x28); a conv at the quarter resolution costs
    a quarter of the same conv at half resolution, so depth is cheapest there.
    """

    OUTPUT_RANGE = (-1.0, 1.0)  # the final tanh

    def __init__(self, in_channels: int = 1, widths=(32, 64, 64), bottleneck: int = 8,
                 low_widths=()):
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"backbone widths {tuple(widths)}: need at least two convolutions")
        layers: list[nn.Module] = [*conv_bn_relu(in_channels, widths[0]), nn.MaxPool2d(2)]
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += conv_bn_relu(cin, cout)
        layers.append(nn.MaxPool2d(2))
        cin = widths[-1]
        for cout in low_widths:
            layers += conv_bn_relu(cin, cout)
            cin = cout
        layers += [nn.Conv2d(cin, bottleneck, 1, bias=False),
                   nn.BatchNorm2d(bottleneck), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.out_channels = bottleneck

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)


class HomogeneousHead(nn.Module):
    """phi = GAP(f); r = sqrt(|phi|^2 + eps^2); logit = scale * <w_c, phi> / r + log r.

    w_c is kept unit-norm (normalised in forward), scale is a learnable scalar, no bias.
    Multiplying f by g >= 0 adds log(g) to every logit (exactly, up to eps).
    """

    def __init__(self, channels: int, k: int, scale: float = 10.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, channels) / math.sqrt(channels))
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        phi = f.mean(dim=(2, 3))
        r = torch.sqrt((phi * phi).sum(dim=1, keepdim=True) + EPS * EPS)
        w = self.weight / self.weight.norm(dim=1, keepdim=True)
        return self.scale * (phi @ w.t()) / r + torch.log(r)


class Segment(nn.Module):
    """One high-level segment.

    Top-level (reads the bottleneck): conv-BN-ReLU stack, then * gain.
    Nested (reads the parent's gained features): bias-free conv + ReLU only (positively
    homogeneous), then * gain.
    """

    def __init__(self, spec: SegmentSpec, in_channels: int):
        super().__init__()
        self.spec = spec
        layers: list[nn.Module] = []
        cin = in_channels
        for c in spec.channels:
            if spec.parent is None:
                layers += conv_bn_relu(cin, c)
            else:
                layers += [nn.Conv2d(cin, c, 3, padding=1, bias=False), nn.ReLU()]
            cin = c
        self.body = nn.Sequential(*layers)
        self.out_channels = cin
        self.head = HomogeneousHead(cin, len(spec.direct_categories)) if spec.direct_categories else None

    def forward(self, x: torch.Tensor, gain: torch.Tensor):
        f = self.body(x) * gain[:, :, None, None]
        logits = self.head(f) if self.head is not None else None
        return f, logits


class NestedNet(nn.Module):
    def __init__(self, tree: CategoryTree, in_channels: int = 1, bottleneck: int = 8,
                 backbone_widths=(32, 64, 64), backbone_low_widths=()):
        super().__init__()
        self.tree = tree
        self.backbone = Backbone(in_channels, backbone_widths, bottleneck, backbone_low_widths)
        self.segment_ids = [s.id for s in tree.segments]
        self.segments = nn.ModuleDict()
        out_ch = {}
        for s in tree.segments:
            cin = bottleneck if s.parent is None else out_ch[s.parent]
            seg = Segment(s, cin)
            out_ch[s.id] = seg.out_channels
            self.segments[_key(s.id)] = seg
        # category c -> (segment index, column)
        self._where = {}
        for j, s in enumerate(tree.segments):
            for col, c in enumerate(s.direct_categories):
                self._where[c] = (j, col)

    def segment(self, sid: str) -> Segment:
        return self.segments[_key(sid)]

    def run_segments(self, feats: torch.Tensor, gains: torch.Tensor):
        """Returns list (manifest order) of per-segment direct logits (or None)."""
        outs: dict[str, torch.Tensor] = {}
        logits = []
        for j, s in enumerate(self.tree.segments):
            x = feats if s.parent is None else outs[s.parent]
            f, lg = self.segment(s.id)(x, gains[:, j:j + 1])
            outs[s.id] = f
            logits.append(lg)
        return logits

    def forward(self, image: torch.Tensor, gains: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.backbone(image)
        if gains is None:
            gains = torch.ones(image.shape[0], len(self.segment_ids), dtype=image.dtype,
                               device=image.device)
        seg_logits = self.run_segments(feats, gains)
        cols = []
        for c in range(len(self.tree.categories)):
            j, col = self._where[c]
            cols.append(seg_logits[j][:, col:col + 1])
        return torch.cat(cols, dim=1)


def _key(sid: str) -> str:
    return sid.replace(".", "__")


BASELINE_CHANNELS = (96, 128, 144)


class Baseline(nn.Module):
    """Same backbone + conventional head (conv-BN-ReLU stack, GAP, Linear with bias)."""

    def __init__(self, num_classes: int, in_channels: int = 1, bottleneck: int = 8,
                 channels=BASELINE_CHANNELS, backbone_widths=(32, 64, 64), backbone_low_widths=()):
        super().__init__()
        self.backbone = Backbone(in_channels, backbone_widths, bottleneck, backbone_low_widths)
        layers: list[nn.Module] = []
        cin = bottleneck
        for c in channels:
            layers += conv_bn_relu(cin, c)
            cin = c
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        f = self.body(self.backbone(image))
        return self.fc(f.mean(dim=(2, 3)))


# ---------------------------------------------------------------- params / MACs


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(module: nn.Module, *inputs) -> int:
    """Per-sample multiply-accumulates of Conv2d and Linear layers (batch of 1)."""
    total = 0
    hooks = []

    def conv_hook(m, inp, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += out.shape[1] * out.shape[2] * out.shape[3] * k

    def lin_hook(m, inp, out):
        nonlocal total
        total += m.in_features * m.out_features

    def head_hook(m, inp, out):
        nonlocal total
        total += m.weight.shape[0] * m.weight.shape[1]

    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(lin_hook))
        elif isinstance(m, HomogeneousHead):
            hooks.append(m.register_forward_hook(head_hook))
    was = module.training
    module.eval()
    with torch.no_grad():
        module(*inputs)
    module.train(was)
    for h in hooks:
        h.remove()
    return int(total)


def nested_costs(model: NestedNet, image_shape) -> dict:
    """params/MACs of the backbone and of each segment (own layers only)."""
    c, h, w = image_shape
    img = torch.zeros(1, c, h, w)
    out = {"backbone": {"params": count_params(model.backbone),
                        "macs": count_macs(model.backbone, img)}}
    with torch.no_grad():
        feats = model.backbone.eval()(img)
    xs = {}
    for s in model.tree.segments:
        x = feats if s.parent is None else xs[s.parent]
        seg = model.segment(s.id)
        g = torch.ones(1, 1)
        out[s.id] = {"params": count_params(seg), "macs": count_macs(seg, x, g)}
        with torch.no_grad():
            xs[s.id] = seg.eval()(x, g)[0]
    return out


def baseline_costs(model: Baseline, image_shape) -> dict:
    c, h, w = image_shape
    img = torch.zeros(1, c, h, w)
    total_p, total_m = count_params(model), count_macs(model, img)
    bp, bm = count_params(model.backbone), count_macs(model.backbone, img)
    return {"edge": {"params": bp, "macs": bm},
            "cloud": {"params": total_p - bp, "macs": total_m - bm},
            "total": {"params": total_p, "macs": total_m}}
