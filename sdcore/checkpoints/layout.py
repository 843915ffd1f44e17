"""Key layouts: the original (CompVis) single-file names <-> the diffusers/transformers names.

sdcore's modules use the original names, so this is only needed for diffusers folders and for
`sdcore convert --layout diffusers`. State dicts here are per component and carry no checkpoint prefix:
original keys look like `input_blocks.1.0.in_layers.0.weight` (prefix ORIGINAL_PREFIXES[component] stripped),
diffusers keys like `down_blocks.0.resnets.0.norm1.weight`. Text encoder keys are written with the
`text_model.` prefix, as diffusers' single-file converter writes them, and read with or without it.

Each model's mapping is a table of block prefixes built by a loop over the levels found in the keys, plus a
few renames inside a block type. Both directions read the same table.
"""

import re

import torch

ORIGINAL_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.text_model.",
}

UNET_RESNET = {
    "in_layers.0.": "norm1.",
    "in_layers.2.": "conv1.",
    "emb_layers.1.": "time_emb_proj.",
    "out_layers.0.": "norm2.",
    "out_layers.3.": "conv2.",
    "skip_connection.": "conv_shortcut.",
}
VAE_RESNET = {"nin_shortcut.": "conv_shortcut."}
VAE_ATTENTION = {
    "norm.": "group_norm.",
    "q.": "to_q.",
    "k.": "to_k.",
    "v.": "to_v.",
    "proj_out.": "to_out.0.",
}

# (original prefix, diffusers prefix, renames inside the block)
Rule = tuple[str, str, dict[str, str]]


def _max_index(keys, pattern: str) -> int:
    """Largest integer captured by `pattern` over `keys` (-1 when none matches)."""
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found, default=-1)


def _unet_rules(keys, layout: str) -> list[Rule]:
    if layout == "original":
        # The first downsampler sits right after the resnets of level 0: input_blocks.{1 + n_res}.0.op
        n_res = min(int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))) - 1
        levels = (_max_index(keys, r"output_blocks\.(\d+)\.") + 1) // (n_res + 1)
        attention = [
            any(k.startswith(f"input_blocks.{1 + i * (n_res + 1)}.1.") for k in keys) for i in range(levels)
        ]
    else:
        n_res = _max_index(keys, r"down_blocks\.0\.resnets\.(\d+)\.") + 1
        levels = _max_index(keys, r"down_blocks\.(\d+)\.") + 1
        attention = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in keys) for i in range(levels)]

    rules: list[Rule] = [
        ("time_embed.0.", "time_embedding.linear_1.", {}),
        ("time_embed.2.", "time_embedding.linear_2.", {}),
        ("input_blocks.0.0.", "conv_in.", {}),
        ("middle_block.0.", "mid_block.resnets.0.", UNET_RESNET),
        ("middle_block.1.", "mid_block.attentions.0.", {}),
        ("middle_block.2.", "mid_block.resnets.1.", UNET_RESNET),
        ("out.0.", "conv_norm_out.", {}),
        ("out.2.", "conv_out.", {}),
    ]
    for i in range(levels):
        for j in range(n_res):
            n = 1 + i * (n_res + 1) + j
            rules.append((f"input_blocks.{n}.0.", f"down_blocks.{i}.resnets.{j}.", UNET_RESNET))
            rules.append((f"input_blocks.{n}.1.", f"down_blocks.{i}.attentions.{j}.", {}))
        if i < levels - 1:
            rules.append(
                (
                    f"input_blocks.{1 + i * (n_res + 1) + n_res}.0.op.",
                    f"down_blocks.{i}.downsamplers.0.conv.",
                    {},
                )
            )
    for up in range(levels):  # diffusers counts up blocks from the lowest resolution, like output_blocks
        level = levels - 1 - up
        for j in range(n_res + 1):
            n = up * (n_res + 1) + j
            rules.append((f"output_blocks.{n}.0.", f"up_blocks.{up}.resnets.{j}.", UNET_RESNET))
            if attention[level]:
                rules.append((f"output_blocks.{n}.1.", f"up_blocks.{up}.attentions.{j}.", {}))
        if level > 0:
            n, slot = up * (n_res + 1) + n_res, 2 if attention[level] else 1
            rules.append((f"output_blocks.{n}.{slot}.conv.", f"up_blocks.{up}.upsamplers.0.conv.", {}))
    return rules


def _vae_rules(keys, layout: str) -> list[Rule]:
    pattern = r"encoder\.down\.(\d+)\." if layout == "original" else r"encoder\.down_blocks\.(\d+)\."
    levels = _max_index(keys, pattern) + 1
    rules: list[Rule] = [("quant_conv.", "quant_conv.", {}), ("post_quant_conv.", "post_quant_conv.", {})]
    for part in ("encoder", "decoder"):
        rules += [
            (f"{part}.conv_in.", f"{part}.conv_in.", {}),
            (f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", VAE_RESNET),
            (f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", VAE_ATTENTION),
            (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", VAE_RESNET),
            (f"{part}.norm_out.", f"{part}.conv_norm_out.", {}),
            (f"{part}.conv_out.", f"{part}.conv_out.", {}),
        ]
    for i in range(levels):
        up = levels - 1 - i  # decoder.up.i is the level of encoder.down.i; diffusers orders up blocks by use
        rules += [
            (f"encoder.down.{i}.block.", f"encoder.down_blocks.{i}.resnets.", VAE_RESNET),
            (f"encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv.", {}),
            (f"decoder.up.{i}.block.", f"decoder.up_blocks.{up}.resnets.", VAE_RESNET),
            (f"decoder.up.{i}.upsample.conv.", f"decoder.up_blocks.{up}.upsamplers.0.conv.", {}),
        ]
    return rules


def _rename(component: str, key: str, rules: list[Rule], src: int) -> str:
    """Rename `key` by its longest matching rule prefix; src 0 reads original names, 1 diffusers names."""
    best = max((r for r in rules if key.startswith(r[src])), key=lambda r: len(r[src]), default=None)
    if best is None:
        layout = "original" if src == 0 else "diffusers"
        raise ValueError(f"{component} key {key!r} is not a known {layout}-layout {component} weight name")
    rest = key[len(best[src]) :]
    # VAE resnet prefixes stop before the index within the level ("0.nin_shortcut.weight"): keep it as is.
    index, dot, tail = rest.partition(".") if rest.split(".", 1)[0].isdigit() else ("", "", rest)
    for original, diffusers in best[2].items():
        old, new = (original, diffusers) if src == 0 else (diffusers, original)
        if tail.startswith(old):
            tail = new + tail[len(old) :]
            break
    return best[1 - src] + index + dot + tail


COMPONENTS = ("unet", "vae", "text_encoder")
TEXT_MODEL = "text_model."


def original_to_diffusers(component: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original-layout component state dict (no checkpoint prefix) -> diffusers/transformers names."""
    _check_component(component)
    if component == "text_encoder":
        return {TEXT_MODEL + k: v for k, v in state_dict.items()}
    rules = _rules(component, state_dict.keys(), "original")
    converted = {}
    for key, value in state_dict.items():
        new_key = _rename(component, key, rules, 0)
        if ".mid_block.attentions." in new_key and value.ndim == 4:  # 1x1 conv [C, C, 1, 1] -> linear [C, C]
            value = value.flatten(1)
        converted[new_key] = value
    return converted


def diffusers_to_original(component: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers/transformers component state dict -> original names (no checkpoint prefix)."""
    _check_component(component)
    if (
        component == "text_encoder"
    ):  # transformers 5 saves without the `text_model.` prefix, older ones with it
        return {k.removeprefix(TEXT_MODEL): v for k, v in state_dict.items()}
    rules = _rules(component, state_dict.keys(), "diffusers")
    converted = {}
    for key, value in state_dict.items():
        if ".mid_block.attentions." in key and value.ndim == 2:  # linear [C, C] -> 1x1 conv [C, C, 1, 1]
            value = value[:, :, None, None]
        converted[_rename(component, key, rules, 1)] = value
    return converted


def rename_keys(component: str, keys, to: str) -> dict[str, str]:
    """{key: its name in the other layout} for one component's keys (no checkpoint prefix); `to` is
    "diffusers" or "original". Names only: the VAE's mid-block attention also changes shape, which
    `original_to_diffusers` / `diffusers_to_original` do."""
    _check_component(component)
    if to not in ("diffusers", "original"):
        raise ValueError(f"to={to!r} is not accepted; use 'diffusers' or 'original'")
    keys = list(keys)
    if component == "text_encoder":
        return {k: TEXT_MODEL + k if to == "diffusers" else k.removeprefix(TEXT_MODEL) for k in keys}
    src = 0 if to == "diffusers" else 1
    rules = _rules(component, keys, "original" if src == 0 else "diffusers")
    return {k: _rename(component, k, rules, src) for k in keys}


def _rules(component: str, keys, layout: str) -> list[Rule]:
    keys = list(keys)
    return _unet_rules(keys, layout) if component == "unet" else _vae_rules(keys, layout)


def _check_component(component: str) -> None:
    if component not in COMPONENTS:
        raise ValueError(f"component {component!r} is not one of {', '.join(COMPONENTS)}")
