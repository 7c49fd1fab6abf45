"""Kimi-VL's image processor and processor, without the checkpoints' own code: what the
published ``image_processing_kimi_vl.py`` and ``processing_kimi_vl.py`` compute, under their
class names, so that a checkpoint's ``preprocessor_config.json`` (``KimiVLImageProcessor``,
``KimiVLProcessor``) resolves to these. vLLM 0.32's Kimi-VL input processing asks transformers'
``AutoProcessor`` for the processor (vLLM ships none for Kimi-VL), so this module must be
imported in each process that builds one: importing it registers both classes.

An image is scaled down to at most ``in_token_limit`` patches, padded on the right and bottom to
whole merge windows (``pad_input``, as the published config sets and vLLM's token count assumes),
normalised and cut into patches in row-major order.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, BatchFeature, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor

from kimivl_rl.models.families.kimi_vl_model import KimiVLConfig, register as register_model

IMAGE_TOKEN = "<|media_pad|>"


class KimiVLImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values", "image_grid_hws"]

    def __init__(self, patch_size: int = 14, pad_input: bool = True, image_mean=(0.5, 0.5, 0.5),
                 image_std=(0.5, 0.5, 0.5), in_token_limit: int = 4096, merge_kernel_size=(2, 2),
                 **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.pad_input = pad_input
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.in_token_limit = in_token_limit
        self.merge_kernel_size = list(merge_kernel_size)

    def preprocess(self, images, return_tensors=None, **kwargs) -> BatchFeature:
        images = images if isinstance(images, (list, tuple)) else [images]
        patches, grids = zip(*(self._patches(image) for image in images))
        return BatchFeature({"pixel_values": torch.cat(patches), "image_grid_hws": np.array(grids)},
                            tensor_type=return_tensors)

    def _patches(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        pixels = torch.from_numpy(np.asarray(self._fit(image.convert("RGB")), dtype=np.float32) / 255.0)
        mean, std = torch.tensor(self.image_mean), torch.tensor(self.image_std)
        pixels = ((pixels - mean) / std).permute(2, 0, 1)
        p = self.patch_size
        grid = (pixels.shape[1] // p, pixels.shape[2] // p)
        patches = pixels.reshape(3, grid[0], p, grid[1], p).permute(1, 3, 0, 2, 4).reshape(-1, 3, p, p)
        return patches, grid

    def _fit(self, image: Image.Image) -> Image.Image:
        """Scaled to the patch limit, then padded with black (zeros before normalising) to whole
        merge windows, or cropped about its centre to whole patches without ``pad_input``."""
        p = self.patch_size
        w, h = image.size
        if (w // p) * (h // p) > self.in_token_limit:
            scale = math.sqrt(self.in_token_limit / ((w // p) * (h // p)))
            image = image.resize((int(w * scale), int(h * scale)), Image.Resampling.BICUBIC)
        w, h = image.size
        if self.pad_input:
            ph, pw = (k * p for k in self.merge_kernel_size)
            padded = Image.new("RGB", (w + (pw - w % pw) % pw, h + (ph - h % ph) % ph))
            padded.paste(image, (0, 0))
            return padded
        left, top = round((w % p) / 2), round((h % p) / 2)   # torchvision's center_crop
        return image.crop((left, top, left + w - w % p, top + h - h % p))


class KimiVLProcessor(ProcessorMixin):
    """The tokenizer with the image processor: each ``<|media_pad|>`` of the text becomes as
    many as its image has merged vision tokens."""

    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token = IMAGE_TOKEN

    def __call__(self, images=None, text=None, **kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [])
        image_inputs = {}
        if images is not None:
            image_inputs = self.image_processor(images, return_tensors=kwargs.get("return_tensors"))
            texts = self._expand(texts, image_inputs["image_grid_hws"])
        text_kwargs = {k: v for k, v in kwargs.items() if k not in ("images_kwargs",)}
        return BatchFeature({**self.tokenizer(texts, **text_kwargs), **image_inputs})

    def _expand(self, texts: list[str], grids) -> list[str]:
        merge = math.prod(self.image_processor.merge_kernel_size)
        counts = iter(int(np.prod(g)) // merge for g in np.asarray(grids))
        return ["".join(part + (IMAGE_TOKEN * next(counts) if i < text.count(IMAGE_TOKEN) else "")
                        for i, part in enumerate(text.split(IMAGE_TOKEN))) for text in texts]


def register() -> None:
    """The model's classes, then the processor's, for ``KimiVLConfig`` (again each time, as
    ``kimi_vl_model.register``)."""
    register_model()
    AutoImageProcessor.register(KimiVLConfig, slow_image_processor_class=KimiVLImageProcessor,
                                exist_ok=True)
    AutoProcessor.register(KimiVLConfig, KimiVLProcessor, exist_ok=True)


register()
