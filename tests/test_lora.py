"""LoRA files: kohya/A1111 and diffusers/PEFT layouts merge into sdcore's weights as diffusers applies them.

Each LoRA is made here with random up/down weights for layers chosen by their diffusers names (so sdcore's
renaming is checked against diffusers' own placement), written in a layout, and read back. The parity tests
load the same files into diffusers' StableDiffusionPipeline (`load_lora_weights`, `set_adapters`) and compare
the U-Net's eps and the text encoder's hidden states within the tolerance of tests/test_models.py, and check
that the LoRAs change those outputs visibly (otherwise agreement proves nothing).
"""

import copy
import gc
import hashlib
import json
import math
import pickle
import time

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from sdcore.checkpoints.layout import rename_keys
from sdcore.config import CLIPConfig, UNetConfig, tiny_clip, tiny_unet, tiny_vae
from sdcore.errors import CheckpointError
from sdcore.lora import LoRAMerge, read_lora
from sdcore.models import CLIPTextModel, UNetModel
from sdcore.models.winograd import use_winograd
from tests.reference import (
    original_layout,
    reference_text_encoder,
    reference_unet,
    reference_vae,
)
from tests.test_models import assert_close_to_reference, token_ids

# How far each LoRA layer moves its output, relative to the base layer's: up ~ N(0, GAIN / sqrt(rank)),
# down ~ N(0, 1 / sqrt(fan_in)) against base weights of std 1.4 / sqrt(fan_in) (sdcore.models.init).
GAIN = 0.3
MIN_EFFECT = 0.05  # a LoRA must change the output by more than this fraction of its std
LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d)


# ------------------------------------------------------------------------------------------ making LoRAs


def random_layers(reference: torch.nn.Module, names: list[str], rank: int, seed: int) -> dict:
    """{diffusers module name: (down, up)} for Linear / Conv2d layers of a diffusers or transformers model;
    a 3x3 conv gets a LoCon pair (3x3 down, 1x1 up)."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name in names:
        weight = reference.get_submodule(name).weight
        fan_in = math.prod(weight.shape[1:])
        down = torch.randn(rank, *weight.shape[1:], generator=g) / math.sqrt(fan_in)
        up = torch.randn(weight.shape[0], rank, *(1,) * (weight.ndim - 2), generator=g)
        up *= GAIN / math.sqrt(rank)
        layers[name] = (down, up)
    return layers


def kohya_state_dict(component: str, layers: dict, alpha: float | None, original_names: bool = False,
                     sdcore_names: dict | None = None) -> dict:
    """lora_unet_<name with _>.lora_down.weight / .lora_up.weight / .alpha, the layer named as diffusers
    (kohya's trainer) or, with original_names, as the original checkpoint (older files); text encoder
    layers under transformers 4's `text_model.` as kohya names them."""
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}[component]
    state = {}
    for name, (down, up) in layers.items():
        if original_names:
            name = sdcore_names[name]
        key = prefix + name.replace(".", "_")
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
        if alpha is not None:
            state[f"{key}.alpha"] = torch.tensor(float(alpha))
    return state


def peft_state_dict(component: str, layers: dict, style: str = "peft", text_model: bool = False) -> dict:
    """What diffusers writes: unet.<name>.lora_A.weight / lora_B.weight ("peft"), or the older
    unet.<name>.lora.down.weight ("lora"), <attention>.processor.to_q_lora.down.weight ("processor"),
    text_encoder.<name>.lora_linear_layer.down.weight ("linear_layer"). text_model: text encoder names
    under transformers 4's `text_model.` (transformers 5 has none)."""
    state = {}
    for name, (down, up) in layers.items():
        name = f"text_model.{name}" if text_model else name
        if style == "processor":
            head, projection = name.rsplit(".", 1) if not name.endswith("to_out.0") else (name[:-9], "to_out")
            projection = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}.get(
                projection, projection)
            base = f"{component}.{head}.processor.{projection}_lora" if component == "unet" else \
                f"{component}.{head}.{projection}_lora"
            state[f"{base}.down.weight"], state[f"{base}.up.weight"] = down, up
            continue
        down_part, up_part = {"peft": ("lora_A", "lora_B"), "lora": ("lora.down", "lora.up"),
                              "linear_layer": ("lora_linear_layer.down", "lora_linear_layer.up")}[style]
        state[f"{component}.{name}.{down_part}.weight"] = down
        state[f"{component}.{name}.{up_part}.weight"] = up
    return state


def write_lora(path, state: dict, metadata: dict | None = None):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=metadata)
    else:
        torch.save(state, path)
    return path


def peft_metadata(component: str, layers: dict, rank: int, alpha: float, alpha_pattern: dict | None = None
                  ) -> dict:
    """The lora_adapter_metadata header diffusers' save_lora_weights writes: the adapter's LoraConfig."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(layers),
                        alpha_pattern=alpha_pattern or {})
    fields = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    packed = {f"{component}.{k}": v for k, v in fields.items()}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(packed, sort_keys=True)}


def sdcore_copy(component: str, reference: torch.nn.Module, cfg) -> torch.nn.Module:
    """The sdcore model with the reference's weights in storage of its own (merging writes into it)."""
    with torch.device("meta"):
        model = {"unet": UNetModel, "text_encoder": CLIPTextModel}[component](cfg)
    state = {k: v.clone() for k, v in original_layout(component, reference).items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def original_names(component: str, reference: torch.nn.Module) -> dict[str, str]:
    """{diffusers/transformers module name: original module name} of a reference model's layers."""
    renamed = rename_keys(component, reference.state_dict().keys(), "original")
    return {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in renamed.items()
            if k.endswith(".weight")}


def unet_linear_names(reference) -> list[str]:
    """Every layer kohya's default LoRA trains in the U-Net: the transformer blocks' linears, proj_in/out."""
    return [n for n, m in reference.named_modules()
            if ".attentions." in n and isinstance(m, LAYER_TYPES)]


def unet_locon_names(reference) -> list[str]:
    """3x3 convs (and their 1x1 shortcut, time embedding) of one down and one up level, the resamplers,
    conv_in / conv_out: every kind of U-Net layer LoCon adds, without merging into the whole U-Net."""
    return [n for n, m in reference.named_modules()
            if isinstance(m, LAYER_TYPES) and (
                n.startswith(("down_blocks.1.resnets.", "up_blocks.2.resnets.", "mid_block.resnets.1."))
                or n in ("down_blocks.0.downsamplers.0.conv", "up_blocks.1.upsamplers.0.conv", "conv_in",
                         "conv_out", "time_embedding.linear_1"))]


def text_encoder_names(reference, projections=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")):
    return [n for n, m in reference.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in projections]


def relative_change(changed: torch.Tensor, base: torch.Tensor) -> float:
    return ((changed - base).std() / base.std()).item()


def reference_pipeline(unet, text_encoder) -> StableDiffusionPipeline:
    """diffusers' pipeline around the reference models, for its LoRA loader (the VAE is never run)."""
    return StableDiffusionPipeline(
        vae=reference_vae(tiny_vae(), seed=0), text_encoder=text_encoder, tokenizer=None, unet=unet,
        scheduler=DDPMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


# ------------------------------------------------------------------------------------- tiny-model tests


@pytest.fixture(scope="module")
def tiny():
    unet = reference_unet(tiny_unet(), seed=3)
    text_encoder = reference_text_encoder(tiny_clip(), seed=1)
    return {"unet": unet, "text_encoder": text_encoder}


@pytest.fixture(scope="module")
def tiny_files(tiny, tmp_path_factory):
    """Two LoRAs over every LoRA-able layer of the tiny models (LoCon on every conv), kohya and PEFT."""
    tmp = tmp_path_factory.mktemp("loras")
    unet, text_encoder = tiny["unet"], tiny["text_encoder"]
    every_unet_layer = [n for n, m in unet.named_modules() if isinstance(m, LAYER_TYPES)]
    first = {"unet": random_layers(unet, every_unet_layer, rank=4, seed=1),
             "text_encoder": random_layers(text_encoder, text_encoder_names(text_encoder), rank=4, seed=2)}
    q_projections = text_encoder_names(text_encoder, ("q_proj",))
    second = {"unet": random_layers(unet, unet_linear_names(unet), rank=8, seed=3),
              "text_encoder": random_layers(text_encoder, q_projections, rank=8, seed=4)}
    kohya = {**kohya_state_dict("unet", first["unet"], alpha=2),
             **kohya_state_dict("text_encoder", first["text_encoder"], alpha=2)}
    peft = {**peft_state_dict("unet", second["unet"]),
            **peft_state_dict("text_encoder", second["text_encoder"])}
    return {"kohya": write_lora(tmp / "style.safetensors", kohya),
            "peft": write_lora(tmp / "detail.safetensors", peft), "layers": first, "dir": tmp}


def tiny_sdcore(tiny) -> dict[str, torch.nn.Module]:
    return {"unet": sdcore_copy("unet", tiny["unet"], tiny_unet()),
            "text_encoder": sdcore_copy("text_encoder", tiny["text_encoder"], tiny_clip())}


def weights(models: dict) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c, m in models.items() for k, v in m.state_dict().items()}


def assert_same_weights(first: dict, second: dict) -> None:
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_lora_is_named_after_its_file_and_hashed(tiny_files):
    lora = read_lora(tiny_files["kohya"])
    assert lora.name == "style" and lora.layout == "kohya"
    assert lora.sha256 == hashlib.sha256(tiny_files["kohya"].read_bytes()).hexdigest()
    assert read_lora(tiny_files["peft"]).layout == "diffusers"


def addnet_hash(path) -> str:
    """sd-scripts' addnet hash, as A1111 hashes a .safetensors LoRA: the bytes after the JSON header."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def test_a1111_shorthash_is_the_addnet_hash_of_a_safetensors_lora_and_the_sha256_of_others(tiny_files,
                                                                                            tmp_path):
    state = load_file(tiny_files["kohya"])
    plain = read_lora(tiny_files["kohya"])
    assert plain.shorthash == addnet_hash(tiny_files["kohya"])[:12] != plain.sha256[:12]
    # A1111 keeps the hash when only the metadata changes, and takes a recorded sshs_model_hash first
    noted = read_lora(write_lora(tmp_path / "noted.safetensors", state, {"ss_output_name": "style"}))
    assert noted.shorthash == plain.shorthash and noted.sha256 != plain.sha256
    assert read_lora(write_lora(tmp_path / "sshs.safetensors", state,
                                {"sshs_model_hash": "feedc0de" * 8})).shorthash == "feedc0defeed"
    pickled = read_lora(write_lora(tmp_path / "style.pt", state))
    assert pickled.shorthash == pickled.sha256[:12]


def test_merge_is_base_plus_weight_times_alpha_over_rank_times_up_down(tiny, tiny_files):
    models = tiny_sdcore(tiny)
    base = weights(models)
    LoRAMerge(models["text_encoder"], models["unet"]).apply([(read_lora(tiny_files["kohya"]), 0.7)])
    scale = 0.7 * 2 / 4  # weight * alpha / rank
    names = original_names("unet", tiny["unet"])
    for name in ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                 "down_blocks.1.resnets.0.conv1", "up_blocks.1.upsamplers.0.conv"):
        down, up = tiny_files["layers"]["unet"][name]
        key = f"{names[name]}.weight"
        update = (up.flatten(1) @ down.flatten(1)).view(base[f"unet.{key}"].shape)
        torch.testing.assert_close(models["unet"].state_dict()[key], base[f"unet.{key}"] + scale * update,
                                   rtol=0, atol=1e-6)
    down, up = tiny_files["layers"]["text_encoder"]["encoder.layers.1.mlp.fc2"]
    torch.testing.assert_close(models["text_encoder"].encoder.layers[1].mlp.fc2.weight,
                               base["text_encoder.encoder.layers.1.mlp.fc2.weight"] + scale * up @ down,
                               rtol=0, atol=1e-6)


def test_kohya_original_and_diffusers_names_merge_the_same(tiny, tiny_files, tmp_path):
    layers = tiny_files["layers"]["unet"]
    old = write_lora(tmp_path / "old.safetensors", kohya_state_dict(
        "unet", layers, alpha=2, original_names=True, sdcore_names=original_names("unet", tiny["unet"])))
    assert sorted(layer.module for layer in read_lora(old).layers) == sorted(
        layer.module for layer in read_lora(tiny_files["kohya"]).layers if layer.component == "unet")
    merged = []
    for path in (old, tiny_files["kohya"]):
        models = tiny_sdcore(tiny)
        LoRAMerge(models["text_encoder"], models["unet"]).apply([(read_lora(path), 1.0)])
        merged.append(weights({"unet": models["unet"]}))
    assert_same_weights(*merged)


@pytest.mark.parametrize("style", ["peft", "lora", "processor", "linear_layer", "ckpt"])
def test_every_diffusers_layout_merges_like_kohya_without_alpha(tiny, tiny_files, tmp_path, style):
    unet_layers = {n: p for n, p in tiny_files["layers"]["unet"].items() if ".attn" in n}
    te_layers = {n: p for n, p in tiny_files["layers"]["text_encoder"].items() if "self_attn" in n}
    if style == "ckpt":  # a .ckpt pickle, read with weights_only
        state = {**peft_state_dict("unet", unet_layers), **peft_state_dict("text_encoder", te_layers)}
        path = write_lora(tmp_path / "lora.ckpt", state)
    else:
        unet_style = "lora" if style == "linear_layer" else style  # no U-Net file ever used lora_linear_layer
        state = {**peft_state_dict("unet", unet_layers, unet_style),  # older files: transformers 4 names
                 **peft_state_dict("text_encoder", te_layers, style, text_model=style != "peft")}
        path = write_lora(tmp_path / "lora.safetensors", state)
    kohya = write_lora(tmp_path / "kohya.safetensors", {**kohya_state_dict("unet", unet_layers, alpha=None),
                                                        **kohya_state_dict("text_encoder", te_layers, None)})
    merged = []
    for file in (path, kohya):
        models = tiny_sdcore(tiny)
        lora = read_lora(file)
        assert len(lora.layers) == len(unet_layers) + len(te_layers)
        LoRAMerge(models["text_encoder"], models["unet"]).apply([(lora, 0.5)])
        merged.append(weights(models))
    assert_same_weights(*merged)


def test_peft_metadata_sets_alpha_and_alpha_pattern(tiny, tmp_path):
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"]
    layers = random_layers(tiny["unet"], names, rank=8, seed=5)
    metadata = peft_metadata("unet", layers, rank=8, alpha=4, alpha_pattern={"attn1.to_k": 16})
    lora = read_lora(write_lora(tmp_path / "meta.safetensors", peft_state_dict("unet", layers), metadata))
    scales = {layer.module.rsplit(".", 1)[-1]: layer.scale for layer in lora.layers}
    assert scales == {"to_q": 0.5, "to_k": 2.0}


def test_locon_with_a_cp_core_adds_what_the_three_convolutions_compute(tiny, tmp_path):
    """lora_mid: down 1x1 -> mid 3x3 -> up 1x1; merged, one conv gives base(x) + scale * up(mid(down(x)))."""
    g = torch.Generator().manual_seed(6)
    conv = tiny["unet"].get_submodule("down_blocks.1.resnets.0.conv2")
    c_out, c_in = conv.weight.shape[:2]
    down, mid, up = (torch.randn(4, c_in, 1, 1, generator=g) / math.sqrt(c_in),
                     torch.randn(4, 4, 3, 3, generator=g) / 6, torch.randn(c_out, 4, 1, 1, generator=g) / 2)
    key = "lora_unet_down_blocks_1_resnets_0_conv2"
    path = write_lora(tmp_path / "cp.safetensors", {
        f"{key}.lora_down.weight": down, f"{key}.lora_mid.weight": mid, f"{key}.lora_up.weight": up,
        f"{key}.alpha": torch.tensor(2.0)})
    models = tiny_sdcore(tiny)
    ours = models["unet"].input_blocks[4][0].out_layers[3]
    x = torch.randn(1, c_in, 6, 6, generator=g)
    with torch.no_grad():
        base = ours(x)
        LoRAMerge(models["text_encoder"], models["unet"]).apply([(read_lora(path), 1.5)])
        conv2d = torch.nn.functional.conv2d
        branch = conv2d(conv2d(conv2d(x, down), mid, padding=1), up)
        torch.testing.assert_close(ours(x), base + 1.5 * 2 / 4 * branch, rtol=0, atol=1e-5)


def test_100_apply_and_remove_cycles_leave_the_base_weights_bit_for_bit(tiny, tiny_files, tmp_path):
    models = tiny_sdcore(tiny)
    base = weights(models)
    # Every 8th layer of each LoRA (linears, 1x1 and 3x3 convs, both components): 100 cycles stay fast.
    few = {c: dict(list(layers.items())[::8]) for c, layers in tiny_files["layers"].items()}
    style = read_lora(write_lora(tmp_path / "style.safetensors", {
        **kohya_state_dict("unet", few["unet"], alpha=2),
        **kohya_state_dict("text_encoder", few["text_encoder"], alpha=2)}))
    detail = read_lora(tiny_files["peft"])
    merge = LoRAMerge(models["text_encoder"], models["unet"])
    sets = [[(style, 1.0)], [(style, 0.5), (detail, -1.0)], [(detail, 2.0)], [(detail, 2.0), (style, 0.3)],
            []]
    for cycle in range(100):
        merge.apply(sets[cycle % len(sets)])
        if cycle % 7 == 0:
            merge.remove()
    merge.remove()
    assert merge.saved_bytes == 0 and merge.active == ()
    assert_same_weights(base, weights(models))
    # Switching never accumulates rounding: a set reached after many switches equals it merged once.
    merge.apply(sets[1])
    fresh = tiny_sdcore(tiny)
    LoRAMerge(fresh["text_encoder"], fresh["unet"]).apply(sets[1])
    assert_same_weights(weights(fresh), weights(models))


def test_copies_are_kept_only_for_weights_the_set_touches(tiny, tiny_files):
    models = tiny_sdcore(tiny)
    merge = LoRAMerge(models["text_encoder"], models["unet"])
    style, detail = read_lora(tiny_files["kohya"]), read_lora(tiny_files["peft"])
    merge.apply([(detail, 1.0)])
    touched = sum(models[layer.component].get_submodule(layer.module).weight.nbytes
                  for layer in detail.layers)
    assert merge.saved_bytes == touched
    merge.apply([(style, 1.0), (detail, 1.0)])
    assert merge.saved_bytes > touched
    merge.apply([(detail, 1.0)])
    assert merge.saved_bytes == touched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_merges_in_fp32_rounding_once(tiny, tiny_files, dtype):
    """The merged fp16/bf16 weight is the fp32 merge of the same (rounded) base weights, rounded once."""
    half = {c: m.to(dtype) for c, m in tiny_sdcore(tiny).items()}
    upcast = {c: copy.deepcopy(m).float() for c, m in half.items()}
    base = weights(half)
    loras = [(read_lora(tiny_files["kohya"]), 0.8), (read_lora(tiny_files["peft"]), -1.5)]
    merge = LoRAMerge(half["text_encoder"], half["unet"])
    merge.apply(loras)
    LoRAMerge(upcast["text_encoder"], upcast["unet"]).apply(loras)
    assert_same_weights(weights(half), {k: v.to(dtype) for k, v in weights(upcast).items()})
    merge.remove()
    assert_same_weights(base, weights(half))


def test_winograd_convolutions_see_the_merged_weights(tiny, tiny_files):
    """Weights made under inference_mode carry no version, which keys Winograd's transformed-weight cache."""
    with torch.inference_mode():
        models = tiny_sdcore(tiny)
    unet = models["unet"]
    use_winograd(unet, min_work=0)
    g = torch.Generator().manual_seed(7)
    latents, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g)
    merge = LoRAMerge(models["text_encoder"], unet)
    with torch.inference_mode():
        before = unet(latents, 500, context)
        merge.apply([(read_lora(tiny_files["kohya"]), 1.0)])
        merged = unet(latents, 500, context)
        use_winograd(unet, enabled=False)
        direct = unet(latents, 500, context)
        use_winograd(unet, min_work=0)
        merge.remove()
        restored = unet(latents, 500, context)
    assert relative_change(direct, before) > MIN_EFFECT
    torch.testing.assert_close(merged, direct, rtol=0, atol=1e-4 * direct.std().item())
    assert torch.equal(restored, before)


# ------------------------------------------------------------------------------------------ bad files


def test_keys_naming_no_layer_are_listed_not_skipped(tiny_files, tmp_path):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    state = {f"{name}.lora_down.weight": torch.zeros(4, 32), f"{name}.lora_up.weight": torch.zeros(32, 4)}
    for i in range(7):
        state[f"lora_unet_down_blocks_0_attentions_0_attn9_to_q_{i}.lora_down.weight"] = torch.zeros(4, 32)
    path = write_lora(tmp_path / "odd.safetensors", state)
    listed = r"lora_unet_down_blocks_0_attentions_0_attn9_to_q_0\.lora_down\.weight, .*, \.\.\."
    with pytest.raises(CheckpointError, match=r"odd\.safetensors: .*7 of 9 keys name no text encoder or "
                                              rf"U-Net layer of SD 1\.5 \({listed}\)"):
        read_lora(path)


@pytest.mark.parametrize("case, key, message", [
    ("loha", "lora_unet_conv_in.hada_w1_a", r"adapter kinds sdcore does not merge .*hada_w1_a \(LoHa"),
    ("dora", "lora_unet_conv_in.dora_scale", r"dora_scale \(DoRA\)"),
    ("sdxl", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", r"an SDXL LoRA"),
    ("up-missing", "lora_unet_conv_in.lora_down.weight", r"input_blocks\.0\.0 has lora_down but no lora_up"),
])  # fmt: skip
def test_other_adapters_and_broken_layers_are_named(tmp_path, case, key, message):
    path = write_lora(tmp_path / f"{case}.safetensors", {key: torch.zeros(4, 4, 3, 3)})
    with pytest.raises(CheckpointError, match=message):
        read_lora(path)


def test_a_rank_that_does_not_chain_is_named(tmp_path):
    key = "lora_unet_conv_in"
    path = write_lora(tmp_path / "rank.safetensors", {f"{key}.lora_down.weight": torch.zeros(4, 4, 3, 3),
                                                      f"{key}.lora_up.weight": torch.zeros(320, 8, 1, 1)})
    with pytest.raises(CheckpointError, match=r"input_blocks\.0\.0: down \[4, 4, 3, 3\], up \[320, 8, 1, 1\] "
                                              r"is no rank-r update"):
        read_lora(path)


def test_a_lora_of_other_shapes_is_refused_before_anything_changes(tiny, tiny_files):
    """A full-size SD 1.5 LoRA given to the tiny models: the shapes disagree, and no weight has moved."""
    models = tiny_sdcore(tiny)
    base = weights(models)
    merge = LoRAMerge(models["text_encoder"], models["unet"])
    merge.apply([(read_lora(tiny_files["peft"]), 1.0)])
    merged = weights(models)
    full_size = tiny_files["dir"] / "full.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    write_lora(full_size, {f"{name}.lora_down.weight": torch.zeros(4, 768),
                           f"{name}.lora_up.weight": torch.zeros(320, 4)})
    layer = r"input_blocks\.1\.1\.transformer_blocks\.0\.attn2\.to_k"
    with pytest.raises(CheckpointError, match=rf"full\.safetensors: does not fit this model: 1 of 1 layers "
                                              rf"\(unet {layer}: the LoRA makes \[320, 768\], the layer is "
                                              r"\[32, 64\]\)"):
        merge.apply([(read_lora(full_size), 1.0)])
    assert_same_weights(merged, weights(models))
    merge.remove()
    assert_same_weights(base, weights(models))


def test_pickle_that_runs_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"lora_unet_conv_in.alpha": Payload()}, protocol=2))
    with pytest.raises(CheckpointError, match=r"refused to load: its pickle would call (builtins\.)?print"):
        read_lora(path)


# ------------------------------------------------------------------------------- SD 1.5-sized parity


@pytest.fixture(scope="module")
def sd15_unet():
    reference = reference_unet(UNetConfig(), seed=20)
    yield reference, sdcore_copy("unet", reference, UNetConfig())
    gc.collect()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # diffusers' second adapter
@torch.no_grad()
def test_sd15_unet_loras_match_diffusers_in_both_layouts(sd15_unet, tmp_path):
    """A kohya LoRA (rank 8, alpha 4) on every transformer layer plus LoCon 3x3 on resnets and resamplers,
    and a PEFT LoRA (rank 32, lora_alpha 16 from its metadata) on the attention projections: alone and
    together with different weights, as diffusers applies them."""
    reference, ours = sd15_unet
    kohya_names = unet_linear_names(reference) + unet_locon_names(reference)
    kohya_layers = random_layers(reference, kohya_names, rank=8, seed=21)
    kohya = write_lora(tmp_path / "style.safetensors", kohya_state_dict("unet", kohya_layers, alpha=4))
    peft_names = [n for n in unet_linear_names(reference) if ".attn" in n]
    peft_layers = random_layers(reference, peft_names, rank=32, seed=22)
    peft = write_lora(tmp_path / "detail.safetensors", peft_state_dict("unet", peft_layers),
                      peft_metadata("unet", peft_layers, rank=32, alpha=16))
    g = torch.Generator().manual_seed(23)
    latents, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g)
    t = torch.tensor([400])
    base_weights = {k: v.clone() for k, v in ours.state_dict().items()}
    base = ours(latents, t, context)

    pipe = reference_pipeline(reference, reference_text_encoder(tiny_clip(), seed=0))
    pipe.load_lora_weights(str(kohya), adapter_name="style")
    pipe.load_lora_weights(str(peft), adapter_name="detail")
    merge = LoRAMerge(CLIPTextModel(tiny_clip()), ours)
    style, detail = read_lora(kohya), read_lora(peft)
    assert len(style.layers) == len(kohya_names) and len(detail.layers) == len(peft_names)
    for loras in ([(style, 0.8)], [(style, 0.8), (detail, -0.6)]):
        pipe.set_adapters([lora.name for lora, _ in loras], adapter_weights=[w for _, w in loras])
        expected = reference(latents, t, context).sample
        started = time.perf_counter()
        merge.apply(loras)
        merge_seconds = time.perf_counter() - started
        eps = ours(latents, t, context)
        error, effect = (eps - expected).abs().max().item(), relative_change(expected, base)
        print(f"\nU-Net {[(lora.name, w) for lora, w in loras]}: max abs error {error:.3g} (eps std "
              f"{expected.std():.3g}), LoRA effect {effect:.1%}, merge {merge_seconds:.2f} s, base copies "
              f"{merge.saved_bytes / 2**20:.0f} MiB")
        assert effect > MIN_EFFECT, f"the LoRAs change eps by {effect:.1%} only"
        assert_close_to_reference(eps, expected)
    merge.remove()
    assert all(torch.equal(v, base_weights[k]) for k, v in ours.state_dict().items())
    assert torch.equal(ours(latents, t, context), base)
    pipe.unload_lora_weights()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
@torch.no_grad()
def test_sd15_text_encoder_loras_match_transformers_in_both_layouts(tmp_path):
    reference = reference_text_encoder(CLIPConfig(), seed=30)
    ours = sdcore_copy("text_encoder", reference, CLIPConfig())
    kohya_layers = random_layers(reference, text_encoder_names(reference), rank=8, seed=31)
    kohya = write_lora(tmp_path / "style.safetensors", kohya_state_dict("text_encoder", kohya_layers, 4))
    q_and_v = text_encoder_names(reference, ("q_proj", "v_proj"))
    peft_layers = random_layers(reference, q_and_v, rank=16, seed=32)
    peft = write_lora(tmp_path / "detail.safetensors", peft_state_dict("text_encoder", peft_layers))
    ids = token_ids(batch=2, seed=33)
    base = ours(ids)

    pipe = reference_pipeline(reference_unet(tiny_unet(), seed=0), reference)
    pipe.load_lora_weights(str(kohya), adapter_name="style")
    pipe.load_lora_weights(str(peft), adapter_name="detail")
    merge = LoRAMerge(ours, UNetModel(tiny_unet()))
    style, detail = read_lora(kohya), read_lora(peft)
    for loras in ([(style, 0.7)], [(style, 0.7), (detail, 1.3)]):
        pipe.set_adapters([lora.name for lora, _ in loras], adapter_weights=[w for _, w in loras])
        expected = reference(ids).last_hidden_state
        merge.apply(loras)
        hidden = ours(ids)
        error, effect = (hidden - expected).abs().max().item(), relative_change(expected, base)
        print(f"\ntext encoder {[(lora.name, w) for lora, w in loras]}: max abs error {error:.3g} (hidden "
              f"std {expected.std():.3g}), LoRA effect {effect:.1%}")
        assert effect > MIN_EFFECT, f"the LoRAs change the hidden states by {effect:.1%} only"
        assert_close_to_reference(hidden, expected)
    merge.remove()
    assert torch.equal(ours(ids), base)
