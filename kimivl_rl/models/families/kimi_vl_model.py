"""Kimi-VL (``kimi_vl``) for the learner, without the checkpoints' own code: MoonViT (native
resolution, learned position table resampled per image, 2-D rotary positions), the 2x2 patch
merger and projector, and transformers' DeepSeek-V3 language model.

transformers 5.19 has no Kimi-VL class. Its Kimi K2.5 classes compute the same vision maths but
hold it in another layout (split and permuted q/k for a half-split rotation, renamed projector,
a temporal position table) under another config, so a Kimi-VL checkpoint would need converting
both ways; here the modules carry the published parameter names (those vLLM's
``KimiVLForConditionalGeneration`` loads), so only the llava-style prefixes move
(``CHECKPOINT_PREFIXES``). The rotation is computed as vLLM's ``moonvit.py`` does.
Importing this module registers the classes with transformers' Auto classes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (AutoConfig, AutoModelForImageTextToText, DeepseekV3Config, DeepseekV3Model,
                          GenerationMixin, PreTrainedConfig, PreTrainedModel)
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import (BaseModelOutputWithPast, BaseModelOutputWithPooling,
                                           CausalLMOutputWithPast)

# (published name, in-memory name): the language model and vision side sit under ``model``,
# the output layer at the top, as in transformers' other vision-language models.
CHECKPOINT_PREFIXES = [("language_model.model.", "model.language_model."),
                       ("language_model.lm_head.", "lm_head."),
                       ("vision_tower.", "model.vision_tower."),
                       ("multi_modal_projector.", "model.multi_modal_projector.")]
ROPE_GRID = 512          # MoonViT's rotary table covers grids up to 512 x 512 patches
ROPE_THETA = 10000.0


@strict
class MoonViTConfig(PreTrainedConfig):
    """The published ``vision_config`` (Kimi-VL-A3B's sizes by default)."""

    model_type = "moonvit"
    patch_size: int = 14
    init_pos_emb_height: int = 64
    init_pos_emb_width: int = 64
    num_attention_heads: int = 16
    num_hidden_layers: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    merge_kernel_size: tuple[int, int] | list[int] = (2, 2)


@strict
class KimiVLConfig(PreTrainedConfig):
    """The published ``config.json``: a MoonViT and a DeepSeek-V3 ``text_config``."""

    model_type = "kimi_vl"
    sub_configs = {"vision_config": MoonViTConfig, "text_config": DeepseekV3Config}
    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    ignore_index: int = -100
    media_placeholder_token_id: int = 163605
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if not isinstance(self.vision_config, PreTrainedConfig):
            self.vision_config = MoonViTConfig(**(self.vision_config or {}))
        if not isinstance(self.text_config, PreTrainedConfig):
            self.text_config = DeepseekV3Config(**(self.text_config or {}))
        super().__post_init__(**kwargs)

    @property
    def image_token_id(self) -> int:
        return self.media_placeholder_token_id


def rotary_angles(grid_hws: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(patches, head_dim / 2) rotation angles of every image's patches, row-major: pair 2i
    turns with the patch's column and pair 2i + 1 with its row, both at theta^(-4i / head_dim)
    (vLLM's ``Rope2DPosEmb``)."""
    freqs = ROPE_THETA ** -(torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim)
    angles = []
    for h, w in grid_hws.tolist():
        assert h <= ROPE_GRID and w <= ROPE_GRID, f"a {h} x {w} patch grid exceeds MoonViT's rotary table"
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pairs = torch.stack([torch.outer(cols.flatten().float(), freqs),
                             torch.outer(rows.flatten().float(), freqs)], dim=-1)
        angles.append(pairs.flatten(1))
    return torch.cat(angles)


def rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """``x`` (patches, heads, head_dim) with each adjacent pair of elements turned by its angle,
    in float32 like vLLM's complex product."""
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    first, second = pairs[..., 0], pairs[..., 1]
    turned = torch.stack([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return turned.flatten(-2).type_as(x)


class MoonVisionPositions(nn.Module):
    """The learnt (height, width, hidden) table of patch positions, ``pos_emb.weight`` as published."""

    def __init__(self, config: MoonViTConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.init_pos_emb_height, config.init_pos_emb_width,
                                               config.hidden_size))


class MoonVisionPatchEmbed(nn.Module):
    def __init__(self, config: MoonViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, config.hidden_size, config.patch_size, stride=config.patch_size)
        self.pos_emb = MoonVisionPositions(config)

    def forward(self, pixel_values: torch.Tensor, grid_hws: torch.Tensor) -> torch.Tensor:
        hidden = self.proj(pixel_values).flatten(1)
        grids = [tuple(g) for g in grid_hws.tolist()]
        resized = {grid: self._positions(*grid) for grid in set(grids)}  # once per image size
        return hidden + torch.cat([resized[grid] for grid in grids])

    def _positions(self, h: int, w: int) -> torch.Tensor:
        """The table resampled bicubically to (h, w), flattened row-major; in float32, so that
        a bfloat16 table is rounded once, at the end."""
        table = self.pos_emb.weight
        if (h, w) == tuple(table.shape[:2]):
            return table.flatten(0, 1)
        resized = F.interpolate(table.float().permute(2, 0, 1)[None], size=(h, w), mode="bicubic")
        return resized[0].permute(1, 2, 0).flatten(0, 1).to(table.dtype)


class MoonViTMLP(nn.Module):
    def __init__(self, config: MoonViTConfig):
        super().__init__()
        self.fc0 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc1 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(ACT2FN["gelu_pytorch_tanh"](self.fc0(x)))


class MoonViTBlock(GradientCheckpointingLayer):
    def __init__(self, config: MoonViTConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.norm0 = nn.LayerNorm(config.hidden_size)
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.wo = nn.Linear(config.hidden_size, config.hidden_size)
        self.mlp = MoonViTMLP(config)

    def forward(self, hidden: torch.Tensor, angles: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        hidden = hidden + self.wo(self._attention(self.norm0(hidden), angles, lengths))
        return hidden + self.mlp(self.norm1(hidden))

    def _attention(self, x: torch.Tensor, angles: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Full attention among each image's patches (images never see each other); 4-D
        (1, heads, patches, head_dim) inputs, which SDPA's fused GPU kernels require."""
        q, k, v = self.wqkv(x).unflatten(-1, (3, self.heads, -1)).unbind(1)
        q, k = rotate_pairs(q, angles), rotate_pairs(k, angles)
        outputs = [F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in parts))[0].transpose(0, 1)
                   for parts in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
        return torch.cat(outputs).flatten(1)


class MoonViTEncoder(nn.Module):
    def __init__(self, config: MoonViTConfig):
        super().__init__()
        self.blocks = nn.ModuleList(MoonViTBlock(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size)


class MoonViT(nn.Module):
    """Patches (patches, 3, p, p) of images with patch grids (images, 2) -> per image its
    merged tokens, (h / kh * w / kw, kh * kw * hidden)."""

    def __init__(self, config: MoonViTConfig):
        super().__init__()
        self.config = config
        self.patch_embed = MoonVisionPatchEmbed(config)
        self.encoder = MoonViTEncoder(config)

    def forward(self, pixel_values: torch.Tensor, grid_hws: torch.Tensor) -> list[torch.Tensor]:
        hidden = self.patch_embed(pixel_values, grid_hws)
        # Made on the host, copied to the device once (not once per block).
        angles = rotary_angles(grid_hws, self.config.hidden_size // self.config.num_attention_heads)
        angles = angles.to(hidden.device)
        lengths = grid_hws.prod(-1).tolist()
        for block in self.encoder.blocks:
            hidden = block(hidden, angles, lengths)
        hidden = self.encoder.final_layernorm(hidden)
        return [self._merge(image, h, w) for image, (h, w) in zip(hidden.split(lengths), grid_hws.tolist())]

    def _merge(self, image: torch.Tensor, h: int, w: int) -> torch.Tensor:
        kh, kw = self.config.merge_kernel_size
        grid = image.view(h // kh, kh, w // kw, kw, -1).permute(0, 2, 1, 3, 4)
        return grid.reshape((h // kh) * (w // kw), -1)


class KimiVLProjector(nn.Module):
    def __init__(self, config: KimiVLConfig):
        super().__init__()
        vision = config.vision_config
        merged = vision.hidden_size * vision.merge_kernel_size[0] * vision.merge_kernel_size[1]
        self.pre_norm = nn.LayerNorm(vision.hidden_size)
        self.linear_1 = nn.Linear(merged, merged)
        self.linear_2 = nn.Linear(merged, config.text_config.hidden_size)

    def forward(self, merged: torch.Tensor) -> torch.Tensor:
        normed = self.pre_norm(merged.unflatten(-1, (-1, self.pre_norm.normalized_shape[0])))
        return self.linear_2(F.gelu(self.linear_1(normed.flatten(-2))))


class KimiVLPreTrainedModel(PreTrainedModel):
    config: KimiVLConfig
    config_class = KimiVLConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoonViTBlock", "DeepseekV3DecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        # Its own module: transformers initialises a module only by the parameters it holds itself.
        if isinstance(module, MoonVisionPositions):
            nn.init.normal_(module.weight, std=self.config.text_config.initializer_range)


class KimiVLModel(KimiVLPreTrainedModel):
    def __init__(self, config: KimiVLConfig):
        super().__init__(config)
        self.vision_tower = MoonViT(config.vision_config)
        self.multi_modal_projector = KimiVLProjector(config)
        self.language_model = DeepseekV3Model(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                           return_dict: bool = True, **kwargs) -> BaseModelOutputWithPooling:
        """Each image's vision tokens in the language model's space (``pooler_output``, a tuple).
        ``image_grid_thw`` is (images, 3) with t = 1: the processor's ``image_grid_hws`` under
        the name kimivl-rl's packing gives every family's grids."""
        merged = self.vision_tower(pixel_values.to(self.vision_tower.patch_embed.proj.weight.dtype),
                                   image_grid_thw[:, -2:])
        features = self.multi_modal_projector(torch.cat(merged)).split([len(m) for m in merged])
        return BaseModelOutputWithPooling(pooler_output=features)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, pixel_values=None, image_grid_thw=None,
                mm_encoder_outputs=None, **kwargs) -> BaseModelOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        images = (mm_encoder_outputs or {}).get("image")
        if images is None and pixel_values is not None:
            images = self.get_image_features(pixel_values, image_grid_thw)
        if images is not None:
            features = torch.cat(images.pooler_output).to(inputs_embeds)
            slots = (input_ids == self.config.media_placeholder_token_id)[..., None]
            assert int(slots.sum()) == len(features), "image placeholders and image tokens differ in number"
            inputs_embeds = inputs_embeds.masked_scatter(slots, features)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, past_key_values=past_key_values,
                                   use_cache=use_cache, **kwargs)


class KimiVLForConditionalGeneration(KimiVLPreTrainedModel, GenerationMixin):
    def __init__(self, config: KimiVLConfig):
        super().__init__(config)
        self.model = KimiVLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def get_image_features(self, pixel_values, image_grid_thw, **kwargs):
        return self.model.get_image_features(pixel_values, image_grid_thw, **kwargs)

    def forward(self, input_ids=None, labels=None, logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        outputs = self.model(input_ids=input_ids, **kwargs)
        hidden = outputs.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None if labels is None else self.loss_function(logits, labels, self.config.text_config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)


def register() -> None:
    """Our classes for ``kimi_vl`` in this process, again each time: an in-process vLLM engine
    registers its own config class under the same name."""
    AutoConfig.register(KimiVLConfig.model_type, KimiVLConfig, exist_ok=True)
    AutoConfig.register(MoonViTConfig.model_type, MoonViTConfig, exist_ok=True)
    AutoModelForImageTextToText.register(KimiVLConfig, KimiVLForConditionalGeneration, exist_ok=True)
    register_checkpoint_conversion_mapping(
        KimiVLConfig.model_type, [WeightRenaming(f"^{published}", inside)
                                  for published, inside in CHECKPOINT_PREFIXES], overwrite=True)


register()
