"""Winograd convolution for 3x3, stride-1 convolutions on the CPU (opt-in: `use_winograd`).

F(m x m, 3 x 3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015) makes each m x m
output tile from an (m+2) x (m+2) input tile:

    Y = A^T [ (G g G^T) * (B^T d B) ] A        g: 3x3 kernel, d: input tile, *: elementwise

Summed over input channels, the elementwise products become (m+2)^2 matmuls [tiles, Cin] @ [Cin, Cout], with
(m+2)^2 / (9 m^2) of the direct convolution's multiplications: 0.44 for F(2x2), 0.25 for F(4x4). The tile
transforms B and A are a few additions each. The U-Net spends ~65 % of a step in 3x3 convolutions, and
oneDNN's direct convolution already runs them near the CPU's matmul peak, so fewer multiplications is the
lever left. Errors against a float64 convolution, measured: F(2x2) as small as oneDNN's direct (~2e-6 on
unit-scale outputs), F(4x4) ~20x that (~4e-5), still far below fp16 rounding.
"""

import torch
from torch import nn

# Points 0, +-1 (F(2x2)) and 0, +-1, +-2 (F(4x4)), as in Lavin & Gray. Column 1 of every A^T is all ones.
TRANSFORMS = {
    2: {
        "BT": [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        "G": [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        "AT": [[1, 1, 1, 0], [0, 1, -1, -1]],
    },
    4: {
        "BT": [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
               [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        "G": [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
              [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        "AT": [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    },
}

# Below this much work (N * Cin * Cout * H * W; 0.6 GFLOP direct) the transforms cost about what the saved
# multiplications do (python -m bench.winograd: 320 channels at 9x9, 2**23, ran 0.84x; 1280 channels at 4x4
# batch 2, 2**25.6, 1.1-2.9x across runs).
MIN_WORK = 1 << 25
# F(4x4) on maps of >= 1024 pixels, F(2x2) below: F(4x4)'s 6x6 tiles waste work on small maps (1280 channels
# at 8x8: 1.9x with F(4x4), 2.3x with F(2x2); 320 channels at 64x64: 1.9x vs 1.0x). At 16x16 F(4x4) is ~25 %
# faster, but there the weights are 1280-channel ones, and F(4x4) would hold 4x instead of 16/9x of them.
F4_MIN_PIXELS = 1024
# The transformed tiles are (m+2)^2 / m^2 times a map (2.25x-4x): big batches of big maps run in slices of
# the batch that keep them under this, so a 2048x2048 CFG batch does not hold gigabytes of tiles at once.
MAX_TILE_BYTES = 256 << 20


def transform_weight(weight: torch.Tensor, m: int) -> torch.Tensor:
    """[Cout, Cin, 3, 3] -> G g G^T as [(m+2)^2, Cin, Cout].

    One matmul, [(k,l), (i,j)] = G[k,i] G[l,j] times the taps as [(i,j), Cin * Cout], writes the result in
    the layout the tile products want (0.2 s for SD 1.5's largest convolution; an einsum took 1-1.4 s)."""
    g = torch.tensor(TRANSFORMS[m]["G"], dtype=weight.dtype, device=weight.device)
    a = m + 2
    kron = torch.einsum("ki,lj->klij", g, g).reshape(a * a, 9)
    taps = weight.permute(2, 3, 1, 0).reshape(9, -1)
    return (kron @ taps).view(a * a, weight.shape[1], weight.shape[0])


def _combine(row: list, terms: list[torch.Tensor], out: torch.Tensor) -> None:
    """out = sum(c * t for c, t in zip(row, terms)), in len(nonzero terms) - 1 passes over memory.

    Every row of the tables has a coefficient 1 and at least two nonzero ones, so the first pass is
    out = t1 + c2 * t2."""
    nonzero = [(c, t) for c, t in zip(row, terms, strict=True) if c]
    (_, first), (c, t), *rest = sorted(nonzero, key=lambda ct: ct[0] != 1)
    torch.add(first, t, alpha=c, out=out)
    for c, t in rest:
        out.add_(t, alpha=c)


def winograd_conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, m: int) -> torch.Tensor:
    """conv2d(x, weight, bias, padding=1) for x [N, Cin, H, W], with u = transform_weight(weight, m).

    The transforms work on channels-last copies, so every strided tile view still reads whole runs of
    channels, and the (m+2)^2 tile products are one batched matmul."""
    bt, at = TRANSFORMS[m]["BT"], TRANSFORMS[m]["AT"]
    a = m + 2
    n, c, h, w = x.shape
    c_out = u.shape[2]
    th, tw = -(-h // m), -(-w // m)  # tiles down and across; the last ones may hang over the zero padding

    padded = x.new_empty(n, th * m + 2, tw * m + 2, c)
    padded[:, 1:h + 1, 1:w + 1] = x.permute(0, 2, 3, 1)
    for border in (padded[:, :1], padded[:, h + 1:], padded[:, 1:h + 1, :1], padded[:, 1:h + 1, w + 1:]):
        border.zero_()  # only the frame: zeroing all of it first would be one more pass over the map
    # Input transform B^T d B, rows then columns: v[k, l] is component (k, l) of every tile, [N, th, tw, C].
    rows = [padded[:, i:i + m * th:m] for i in range(a)]
    half = x.new_empty(n, th, tw * m + 2, c)
    v = x.new_empty(a, a, n, th, tw, c)
    for k in range(a):
        _combine(bt[k], rows, half)
        cols = [half[:, :, j:j + m * tw:m] for j in range(a)]
        for l in range(a):
            _combine(bt[l], cols, v[k, l])

    prod = torch.bmm(v.view(a * a, n * th * tw, c), u).view(a, a, n, th, tw, c_out)
    if bias is not None:
        prod[1, 1] += bias  # every output of a tile takes component (1, 1) with weight 1

    # Output transform A^T M A, written straight into the strided output positions of each tile.
    y = x.new_empty(n, th * m, tw * m, c_out)
    half = x.new_empty(a, n, th, tw, c_out)
    for p in range(m):
        for l in range(a):
            _combine(at[p], [prod[k, l] for k in range(a)], half[l])
        for q in range(m):
            _combine(at[q], list(half), y[:, p::m, q::m])
    return y[:, :h, :w].permute(0, 3, 1, 2).contiguous()


class WinogradConv2d(nn.Conv2d):
    """nn.Conv2d(in_ch, out_ch, 3, padding=1), the same parameters and state dict, whose forward runs as
    Winograd on the CPU in fp32 once `use_winograd` turns it on and the work is large enough."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(in_ch, out_ch, 3, padding=1)
        self.winograd = False
        self.min_work = MIN_WORK
        self._transformed = {}  # m -> (weight identity, transformed weight), made on first use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        differentiable = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if (not self.winograd or x.device.type != "cpu" or x.dtype != torch.float32 or differentiable
                or x.dim() != 4 or x.numel() * self.out_channels < self.min_work):
            return super().forward(x)  # the Winograd path writes into buffers: inference only
        h, w = x.shape[2:]
        m = 4 if h * w >= F4_MIN_PIXELS else 2
        u = self.transformed_weight(m)
        tile_bytes = (m + 2) ** 2 * -(-h // m) * -(-w // m) * max(u.shape[1:]) * x.element_size()
        per_slice = max(1, MAX_TILE_BYTES // tile_bytes)
        if x.shape[0] <= per_slice:
            return winograd_conv3x3(x, u, self.bias, m)
        return torch.cat([winograd_conv3x3(part, u, self.bias, m) for part in x.split(per_slice)])

    def transformed_weight(self, m: int) -> torch.Tensor:
        # Keyed on the weight's storage and version, so loading new weights or moving the module remakes it
        # (weights made under torch.inference_mode keep no version: their storage and dtype must do).
        weight = self.weight
        identity = (weight.data_ptr(), None if weight.is_inference() else weight._version, weight.dtype)
        cached = self._transformed.get(m)
        if cached is None or cached[0] != identity:
            with torch.no_grad():
                cached = self._transformed[m] = (identity, transform_weight(self.weight, m))
        return cached[1]


def use_winograd(model: nn.Module, enabled: bool = True, min_work: int = MIN_WORK) -> int:
    """Turn Winograd on or off for every WinogradConv2d in `model`; returns how many there are.

    Costs memory: the transformed weights, made on first use, are 16/9 (F(2x2)) or 4x (F(4x4)) the size of
    the weights they come from; turning Winograd off frees them."""
    convs = [mod for mod in model.modules() if isinstance(mod, WinogradConv2d)]
    for conv in convs:
        conv.winograd, conv.min_work = enabled, min_work
        if not enabled:
            conv._transformed.clear()
    return len(convs)

