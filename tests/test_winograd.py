"""Winograd convolution (sdcore.models.winograd): equal to a float64 convolution within fp32 rounding for
every shape, a drop-in nn.Conv2d (same parameters, direct path unless turned on), and a pipeline option that
keeps images within a level of the direct path."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdcore
from sdcore.models import winograd
from sdcore.models.winograd import WinogradConv2d, transform_weight, use_winograd, winograd_conv3x3
from sdcore.params import Request
from sdcore.png import read_settings

# Measured worst errors on unit-scale outputs: F(2x2) ~2e-6 (as oneDNN's direct convolution), F(4x4) ~5e-5.
TOLERANCE = {2: 1e-5, 4: 2e-4}


def conv_case(n, c_in, c_out, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g) / (9 * c_in) ** 0.5  # unit-scale outputs
    bias = torch.randn(c_out, generator=g)
    return x, weight, bias


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize(("n", "c_in", "c_out", "h", "w"), [
    (2, 64, 64, 16, 16),   # whole tiles
    (1, 32, 48, 7, 9),     # sides that are no multiple of the tile, Cin != Cout
    (3, 8, 4, 1, 1),       # one pixel: all of the tile is padding but its centre
    (2, 16, 16, 5, 12),    # one side shorter than an F(4x4) tile
])  # fmt: skip
@pytest.mark.parametrize("with_bias", [True, False])
def test_winograd_equals_a_float64_convolution(m, n, c_in, c_out, h, w, with_bias):
    x, weight, bias = conv_case(n, c_in, c_out, h, w)
    bias = bias if with_bias else None
    exact = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    ours = winograd_conv3x3(x, transform_weight(weight, m), bias, m)
    assert ours.shape == exact.shape and ours.dtype == torch.float32 and ours.is_contiguous()
    assert (ours.double() - exact).abs().max().item() <= TOLERANCE[m]


def test_transformed_weights_have_one_matrix_per_tile_component():
    weight = conv_case(1, 5, 7, 4, 4)[1]
    assert transform_weight(weight, 2).shape == (16, 5, 7)
    assert transform_weight(weight, 4).shape == (36, 5, 7)


def test_the_module_is_an_nn_conv2d_with_the_same_state_dict():
    plain = nn.Conv2d(24, 40, 3, padding=1)
    ours = WinogradConv2d(24, 40)
    assert isinstance(ours, nn.Conv2d)
    shapes = {key: value.shape for key, value in plain.state_dict().items()}
    assert {key: value.shape for key, value in ours.state_dict().items()} == shapes
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(2, 24, 20, 20)
    with torch.no_grad():
        assert torch.equal(ours(x), plain(x))  # off by default: the direct convolution itself


def test_turned_on_it_runs_winograd_where_the_work_is_large_enough():
    conv = WinogradConv2d(64, 64).requires_grad_(False)
    assert use_winograd(conv) == 1
    small, large = torch.randn(1, 64, 8, 8), torch.randn(2, 64, 64, 64)  # 2**18 and 2**25 units of work
    assert torch.equal(conv(small), F.conv2d(small, conv.weight, conv.bias, padding=1))
    direct = F.conv2d(large, conv.weight, conv.bias, padding=1)
    winograd = conv(large)
    assert not torch.equal(winograd, direct)  # the other algorithm ran (and rounded differently) ...
    assert (winograd - direct).abs().max().item() <= TOLERANCE[4]  # ... to the same result
    assert set(conv._transformed) == {4}  # 64x64 maps take F(4x4)


def test_new_weights_replace_the_transformed_ones():
    conv = WinogradConv2d(16, 16).requires_grad_(False)
    use_winograd(conv, min_work=0)
    x = torch.randn(1, 16, 12, 12)
    conv(x)
    with torch.no_grad():
        conv.weight.mul_(-2.0)
    assert (conv(x) - F.conv2d(x, conv.weight, conv.bias, padding=1)).abs().max().item() <= TOLERANCE[2]
    conv.load_state_dict(nn.Conv2d(16, 16, 3, padding=1).state_dict())
    assert (conv(x) - F.conv2d(x, conv.weight, conv.bias, padding=1)).abs().max().item() <= TOLERANCE[2]


def test_training_and_half_precision_take_the_direct_path():
    conv = WinogradConv2d(16, 16)
    use_winograd(conv, min_work=0)
    x = torch.randn(1, 16, 12, 12, requires_grad=True)
    out = conv(x)  # weights require grad: the buffers Winograd writes into cannot be differentiated
    out.sum().backward()
    assert x.grad is not None and conv.weight.grad is not None
    half = conv.to(torch.bfloat16).requires_grad_(False)
    xb = x.detach().bfloat16()
    assert torch.equal(half(xb), F.conv2d(xb, half.weight, half.bias, padding=1))
    assert not half._transformed


def test_big_batches_run_in_slices_with_the_same_result(monkeypatch):
    conv = WinogradConv2d(32, 32).requires_grad_(False)
    use_winograd(conv, min_work=0)
    x = torch.randn(5, 32, 16, 16)
    whole = conv(x)
    monkeypatch.setattr(winograd, "MAX_TILE_BYTES", 1)  # one image a slice
    calls = []
    monkeypatch.setattr(winograd, "winograd_conv3x3", lambda part, *args: calls.append(len(part))
                        or winograd_conv3x3(part, *args))
    sliced = conv(x)
    assert calls == [1] * 5
    assert (sliced - whole).abs().max().item() <= TOLERANCE[2]


def test_a_module_made_under_inference_mode_works():
    with torch.inference_mode():  # its weights are inference tensors, which have no version counter
        conv = WinogradConv2d(16, 16)
        use_winograd(conv, min_work=0)
        x = torch.randn(1, 16, 12, 12)
        assert (conv(x) - F.conv2d(x, conv.weight, conv.bias, padding=1)).abs().max().item() <= TOLERANCE[2]


def test_unbatched_input_works_as_in_nn_conv2d():
    conv = WinogradConv2d(16, 16).requires_grad_(False)
    use_winograd(conv, min_work=0)
    x = torch.randn(16, 10, 10)
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))


def test_turning_it_off_frees_the_transformed_weights():
    conv = WinogradConv2d(16, 16).requires_grad_(False)
    use_winograd(conv, min_work=0)
    conv(torch.randn(1, 16, 40, 40))
    assert conv._transformed
    use_winograd(conv, False)
    assert not conv._transformed and not conv.winograd


def test_the_unet_uses_it_for_every_stride_1_3x3_convolution():
    unet = sdcore.load("tiny-random").unet
    three_by_three = [m for m in unet.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    stride_1 = [m for m in three_by_three if m.stride == (1, 1)]
    assert all(isinstance(m, WinogradConv2d) for m in stride_1)
    assert not any(isinstance(m, WinogradConv2d) for m in three_by_three if m.stride != (1, 1))
    assert use_winograd(unet) == len(stride_1)


def test_a_winograd_unet_equals_the_direct_one_within_fp32_rounding():
    pipe = sdcore.load("tiny-random")
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 64, generator=g)
    with torch.inference_mode():
        direct = pipe.unet(x, torch.tensor([500, 500]), context)
        use_winograd(pipe.unet, min_work=0)  # the tiny model's convolutions are below the default threshold
        winograd = pipe.unet(x, torch.tensor([500, 500]), context)
    assert not torch.equal(winograd, direct)
    assert (winograd - direct).abs().max().item() <= 1e-4 * direct.abs().max().item()


def test_pipeline_images_stay_within_a_level_of_the_direct_path():
    # 256x256: 32x32 latents, so the first level takes F(4x4) and the deeper ones F(2x2).
    settings = dict(steps=4, sampler="euler_a", width=256, height=256, progress=False)
    direct = sdcore.load("tiny-random")
    fast = sdcore.load("tiny-random", winograd=True)
    assert fast.winograd and "winograd" in repr(fast)
    use_winograd(fast.unet, min_work=0)
    ours = np.array(fast.generate(["a red boat"], [5], **settings)[0], dtype=int)
    theirs = np.array(direct.generate(["a red boat"], [5], **settings)[0], dtype=int)
    assert np.abs(ours - theirs).max() <= 1
    assert fast.metadata(Request("a red boat", 5))["winograd"] is True
    assert "winograd" not in direct.metadata(Request("a red boat", 5))


def test_in_winograd_mode_cfg_passes_the_latents_once():
    pipe = sdcore.load("tiny-random", winograd=True)
    rows = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda module, args: rows.append((len(args[0]), len(args[2]))))
    pipe.generate(["a", "b"], [1, 2], steps=2, width=64, height=64, progress=False)
    pipe.generate(["a", "b"], [1, 2], steps=1, width=64, height=64, guidance_scale=1.0, progress=False)
    handle.remove()
    assert rows == [(2, 4), (2, 4), (2, 2)]


def test_winograd_refuses_half_precision_and_gpus():
    with pytest.raises(ValueError, match="winograd runs on the CPU in fp32 only"):
        sdcore.load("tiny-random", dtype="fp16", winograd=True)
    pipe = sdcore.load("tiny-random", dtype="bf16")
    with pytest.raises(ValueError, match="not on cpu in torch.bfloat16"):
        pipe.use_winograd()
    pipe.use_winograd(False)  # turning it off is always fine


def test_cli_records_winograd_and_a_rerun_from_the_png_uses_it(tmp_path):
    from sdcore.cli import main

    first, again = tmp_path / "w.png", tmp_path / "again.png"
    common = ["--steps", "2", "--width", "64", "--height", "64", "--no-progress", "--device", "cpu"]
    assert main(["generate", "a kite", "--checkpoint", "tiny-random", "--seed", "4", "--winograd", *common,
                 "--out", str(first)]) == 0
    assert read_settings(first)["winograd"] is True
    assert main(["generate", "--from-png", str(first), "--no-progress", "--out", str(again)]) == 0
    assert again.read_bytes() == first.read_bytes()
