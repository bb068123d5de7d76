"""The UNet++ encoder-decoder of LTDiff++: nested dense skip pathways and deep supervision.

A UNet++ (Zhou et al. 2018) of depth L has nodes X(i, j), i = row (resolution level 0..L, each row
half the resolution of the one above), j = column (0..L-i):

    X(i, 0) = H(D(X(i-1, 0)))                                the backbone column
    X(i, j) = H([X(i, 0), ..., X(i, j-1), U(X(i+1, j-1))])   nested dense skips

with D = 2x2 average pooling, U = 2x nearest upsampling,

H a convolution block and [.] channel concatenation. Deep supervision reads every top-row node
X(0, 1..L) through its own 1x1 head.

The autoencoder uses two such nested networks, both at half the image resolution:

    encoder   x (1 x H x W) --space-to-depth 2x2--> 4 x H/2 x W/2 --UNet++--> X(0, L)
              Z = E(x) = 1x1(X(0, L)) + 1x1(space-to-depth(x))        latent: C_z x H/2 x W/2
    decoder   X(0, 0) = H(Z) --UNet++--> heads_j = 1x1(X(0, j)) + 1x1(Z), j = 1..L
              image_j = depth-to-space(heads_j)                        one image per head

* Space-to-depth (`PixelUnshuffle`) is lossless: the 2 x 2 pixel block is kept as 4 channels, so a
  latent with C_z >= 4 channels at H/2 can carry every pixel, the fine-grain noise of a sharp kernel
  included. The linear 1x1 shortcuts start as that identity (`_init_lossless_start`), so the
  round trip is near-lossless from the first training step; the nested networks add context
  (edges, tissue) on top.
* The top row of the encoder's UNet++ aggregates every scale through the nested skips, so Z is a
  multiscale latent in one tensor, which the latent diffusion can transform as a whole.
* Precision: `encode` / `decode` can run the nested networks under bf16 autocast (`body_dtype`)
  while the shortcuts, their inputs and the sums stay float32: the values the shortcuts carry
  are never rounded to bf16's 8 significant bits, only the bodies' contributions are.
* The decoder sees nothing but Z: no skip connection reaches it from the encoder. When the diffusion
  replaces Z_A (source kernel) by a generated Z_B', the decoded image carries only what Z_B' holds,
  not source-kernel features smuggled around the latent (docs/METHOD.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from torch import Tensor, nn

HeadOutput = Literal["last", "mean"]
"""How the decoder turns its deep-supervision heads into one image: the deepest head X(0, L)
(UNet++ "fast mode" would prune; we keep all heads for training) or the mean of all heads."""


@dataclass(frozen=True)
class UNetPPConfig:
    """Architecture of the UNet++ autoencoder.

    latent_channels: C_z, channels of the latent Z at 1/`patch` resolution.
    patch: space-to-depth factor (1, 2 or 4): the latent is H/patch x W/patch.
    encoder_channels: channels per row of the encoder's UNet++ (depth = len - 1).
    decoder_channels: channels per row of the decoder's UNet++ (depth = len - 1; the number of
        deep-supervision heads equals the depth, or 1 for depth 0).
    groups: GroupNorm groups (capped to divide each block's channels).
    output: how the heads make the decoded image (see `HeadOutput`).
    """

    latent_channels: int = 8
    patch: int = 2
    encoder_channels: tuple[int, ...] = (16, 32)
    decoder_channels: tuple[int, ...] = (16, 32, 64)
    groups: int = 8
    output: HeadOutput = "last"

    def __post_init__(self) -> None:
        if self.patch not in (1, 2, 4):
            raise ValueError(f"UNetPPConfig.patch must be 1, 2 or 4, got {self.patch}")
        if self.latent_channels < self.patch * self.patch:
            raise ValueError(
                f"UNetPPConfig.latent_channels={self.latent_channels} cannot hold a "
                f"{self.patch}x{self.patch} pixel block losslessly; use >= {self.patch**2}"
            )
        for name in ("encoder_channels", "decoder_channels"):
            chans = getattr(self, name)
            if not chans or any(c <= 0 for c in chans):
                raise ValueError(f"UNetPPConfig.{name} must be positive integers, got {chans}")
        if self.output not in ("last", "mean"):
            raise ValueError(f"UNetPPConfig.output must be 'last' or 'mean', got {self.output!r}")

    @property
    def size_multiple(self) -> int:
        """Rows and columns of an input must be multiples of this (padding handles the rest)."""
        depth = max(len(self.encoder_channels), len(self.decoder_channels)) - 1
        return int(self.patch * 2**depth)

    @property
    def n_heads(self) -> int:
        return max(len(self.decoder_channels) - 1, 1)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> UNetPPConfig:
        d = dict(data)
        for key in ("encoder_channels", "decoder_channels"):
            if key in d:
                d[key] = tuple(int(c) for c in cast(list[int], d[key]))
        return cls(**d)  # type: ignore[arg-type]


def _precision_regions(
    body_dtype: torch.dtype | None, like: Tensor
) -> tuple[AbstractContextManager[object], AbstractContextManager[object]]:
    """(body, exact) contexts for `encode` / `decode_heads`. With a body dtype: autocast to it
    for the nested network, autocast off for the shortcuts and sums (which then compute in the
    dtype of their float32 inputs). Without: both leave the caller's precision as it is."""
    if body_dtype is None:
        return nullcontext(), nullcontext()
    device = like.device.type
    return (
        torch.autocast(device_type=device, dtype=body_dtype),
        torch.autocast(device_type=device, enabled=False),
    )


def _groups(groups: int, channels: int) -> int:
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


class ConvBlock(nn.Module):
    """H: two 3x3 convolutions with GroupNorm and SiLU, and a residual (1x1 if widths differ)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(_groups(groups, out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(groups, out_channels), out_channels)
        self.skip: nn.Module = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        # In place where nothing needs the input for a backward pass (inference): the same
        # numbers without a second activation-sized buffer per call (the activations, not the
        # convolutions, dominate the CPU time of these small networks).
        inplace = not torch.is_grad_enabled()
        h = F.silu(self.norm1(self.conv1(x)), inplace=inplace)
        h = self.norm2(self.conv2(h))
        return F.silu(h + self.skip(x), inplace=inplace)


class NestedUNet(nn.Module):
    """The UNet++ grid of nodes X(i, j) (module docstring). Input and top row at one resolution."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], groups: int) -> None:
        super().__init__()
        self.depth = len(channels) - 1
        self.channels = channels
        nodes: dict[str, nn.Module] = {}
        for i in range(self.depth + 1):
            for j in range(self.depth + 1 - i):
                if j == 0:
                    cin = in_channels if i == 0 else channels[i - 1]
                else:
                    cin = channels[i] * j + channels[i + 1]
                nodes[f"x{i}_{j}"] = ConvBlock(cin, channels[i], groups)
        self.nodes = nn.ModuleDict(nodes)

    def forward_nodes(self, x: Tensor) -> dict[tuple[int, int], Tensor]:
        """Every node X(i, j), keyed by (i, j). Rows and columns of x: multiples of 2**depth."""
        out: dict[tuple[int, int], Tensor] = {}
        for i in range(self.depth + 1):
            below = x if i == 0 else F.avg_pool2d(out[(i - 1, 0)], 2)
            out[(i, 0)] = self.nodes[f"x{i}_0"](below)
        # Column by column: X(i, j) needs X(i, 0..j-1) and X(i+1, j-1), computed in column j-1.
        for j in range(1, self.depth + 1):
            for i in range(self.depth + 1 - j):
                up = F.interpolate(out[(i + 1, j - 1)], scale_factor=2.0, mode="nearest")
                same_row = [out[(i, k)] for k in range(j)]
                out[(i, j)] = self.nodes[f"x{i}_{j}"](torch.cat([*same_row, up], dim=1))
        return out

    def forward(self, x: Tensor) -> list[Tensor]:
        """The top-row nodes that carry deep supervision: X(0, 1..L), or [X(0, 0)] for L = 0."""
        nodes = self.forward_nodes(x)
        if self.depth == 0:
            return [nodes[(0, 0)]]
        return [nodes[(0, j)] for j in range(1, self.depth + 1)]


class UNetPlusPlusAutoencoder(nn.Module):
    """E and D of LTDiff++ (module docstring). Images are normalized HU, shape [N, 1, H, W]."""

    def __init__(self, config: UNetPPConfig) -> None:
        super().__init__()
        self.config = config
        p2 = config.patch * config.patch
        c_z = config.latent_channels
        self.to_blocks = nn.PixelUnshuffle(config.patch)
        self.from_blocks = nn.PixelShuffle(config.patch)
        self.encoder = NestedUNet(p2, config.encoder_channels, config.groups)
        self.to_latent = nn.Conv2d(config.encoder_channels[0], c_z, 1)
        self.encoder_shortcut = nn.Conv2d(p2, c_z, 1, bias=False)
        self.from_latent = nn.Conv2d(c_z, config.decoder_channels[0], 3, padding=1)
        self.decoder = NestedUNet(
            config.decoder_channels[0], config.decoder_channels, config.groups
        )
        self.heads = nn.ModuleList(
            nn.Conv2d(config.decoder_channels[0], p2, 1) for _ in range(config.n_heads)
        )
        self.decoder_shortcut = nn.Conv2d(c_z, p2, 1, bias=False)
        self._init_lossless_start()

    def _init_lossless_start(self) -> None:
        """Start as a lossless rearrangement: the shortcuts copy the 2x2 pixel block into the
        first latent channels and back (identity round trip), the encoder's non-linear path
        starts small (x0.1) and the decoder's heads at zero, so training begins near a perfect
        reconstruction of the fine grain and learns the multiscale features on top instead of
        first having to learn the identity."""
        p2 = self.config.patch * self.config.patch
        with torch.no_grad():
            self.encoder_shortcut.weight.zero_()
            self.decoder_shortcut.weight.zero_()
            for k in range(p2):
                self.encoder_shortcut.weight[k, k] = 1.0
                self.decoder_shortcut.weight[k, k] = 1.0
            self.to_latent.weight.mul_(0.1)
            if self.to_latent.bias is not None:
                self.to_latent.bias.zero_()
            for head in self.heads:
                for param in head.parameters():
                    param.zero_()

    def encode(self, image: Tensor, body_dtype: torch.dtype | None = None) -> Tensor:
        """Z = E(x): [N, 1, H, W] -> [N, C_z, H/patch, W/patch].

        body_dtype: None computes everything in the caller's precision (training's autocast, if
        any). A dtype (bfloat16, float16) runs only the nested network under autocast to it: the
        space-to-depth blocks, the linear shortcut, the 1x1 projection of X(0, L) and the sum
        stay float32 (`_precision_regions`), so the values the shortcut carries are not rounded."""
        blocks = self.to_blocks(image)
        body, exact = _precision_regions(body_dtype, blocks)
        with body:
            top = self.encoder(blocks)[-1]
        with exact:  # .float(): a no-op in float32, an exact widening of autocast outputs
            z: Tensor = self.to_latent(top.float()) + self.encoder_shortcut(blocks.float())
        return z

    def decode_heads(self, latent: Tensor, body_dtype: torch.dtype | None = None) -> list[Tensor]:
        """One image per deep-supervision head, shallowest first: each [N, 1, H, W].

        body_dtype: as in `encode`: only the nested network (and its 3x3 input convolution) runs
        under autocast; the linear shortcut of Z, the 1x1 heads and the sums stay float32."""
        body, exact = _precision_regions(body_dtype, latent)
        with body:
            top = self.decoder(self.from_latent(latent))
        with exact:
            shortcut = self.decoder_shortcut(latent.float())
            return [
                self.from_blocks(head(x.float()) + shortcut)
                for head, x in zip(self.heads, top, strict=True)
            ]

    def decode(self, latent: Tensor, body_dtype: torch.dtype | None = None) -> Tensor:
        """D(Z): the image the configured `output` mode makes of the heads (body_dtype: as in
        `decode_heads`)."""
        heads = self.decode_heads(latent, body_dtype)
        if self.config.output == "mean":
            return torch.stack(heads, dim=0).mean(dim=0)
        return heads[-1]

    def forward(self, image: Tensor) -> list[Tensor]:
        """Round trip D(E(x)), all heads (training with deep supervision)."""
        return self.decode_heads(self.encode(image))
