"""Image references -> pixel_values, with a stage's squaring rule and a template's multi-image rule.

In:  image paths, PIL images or dataset cells (`LazyImage`), the processor of the run's vision tower.
Out: `pixel_values`, one row per image the model is shown (a composite counts one).
"""

from __future__ import annotations

import torch

from ..families import Template
from ..data.records import LazyImage


def pad_fill(image_mean) -> tuple[int, int, int]:
    """The padding colour for a processor's mean, truncated as LLaVA's expand2square: the authors' exact pixels."""
    return tuple(int(x * 255) for x in image_mean)


class ImageLoader:
    """Record images -> one processed `pixel_values` tensor per image, with the stage's squaring rule.

    `mode="pad"` pads to a square with the processor's mean colour (LLaVA's `pad`, stage 2);
    `mode="crop"` leaves it to the processor's resize + centre crop (LLaVA's default, stage 1).
    """

    def __init__(self, image_processor, mode: str = "pad"):
        if mode not in ("pad", "crop"):
            raise ValueError(f"image mode must be 'pad' or 'crop', not {mode!r}")
        self.processor = image_processor
        self.mode = mode
        mean = getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        self.fill = pad_fill(mean)

    def __call__(self, images) -> torch.Tensor:
        return self.process([self.open(ref) for ref in images])

    def open(self, ref):
        """One image reference -> the RGB PIL image, squared by the stage's rule (not yet resized or normalised)."""
        return self.square(self.raw(ref))

    def open_record(self, refs, template: Template) -> list:
        """A record's images as the template shows them: each squared on its own (`separate`), or several joined
        into one composite first (`composite`, ChiMed-VL's way; the text keeps one `<image>`: families.base.one_tag)."""
        if not template.separate_images and len(refs) > 1:
            from .decode import composite

            return [self.square(composite([self.raw(r) for r in refs]))]
        return [self.open(r) for r in refs]

    @staticmethod
    def raw(ref):
        from PIL import Image

        from .decode import load_image

        if isinstance(ref, Image.Image):
            img = ref
        elif isinstance(ref, LazyImage):
            img = ref.open()
        else:
            img = load_image(ref)
        return img if img.mode == "RGB" else img.convert("RGB")

    def square(self, img):
        from .decode import expand_to_square

        return expand_to_square(img, self.fill) if self.mode == "pad" else img

    def process(self, pil: list) -> torch.Tensor:
        """Opened images -> pixel_values, one processor call for all of them."""
        return self.processor(images=pil, return_tensors="pt")["pixel_values"]
