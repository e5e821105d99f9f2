"""Image references -> pixel_values, with a stage's squaring rule and a template's multi-image rule.

In:  image paths, PIL images or dataset cells (`LazyImage`), the processor of the run's vision tower.
Out: the model's vision inputs: `pixel_values`, one row per image the model is shown (a composite counts one); at
     native resolution (Qwen2.5-VL) the patches of every image in a row and `image_grid_thw`, each image's patch grid,
     which also gives its token count.
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

    def at_grid(self, img):
        """The image as the processor resizes it, where it squashes every image to one size (Gemma 3's 896 x 896):
        a server that resizes differently (llama.cpp keeps the aspect and pads) then has nothing to resize. A
        processor that resizes the short side and centre-crops (CLIP's) is left to do so: unchanged."""
        size = dict(getattr(self.processor, "size", None) or {})
        if "height" not in size or "width" not in size or getattr(self.processor, "do_center_crop", False):
            return img
        return self._resized(img, (int(size["width"]), int(size["height"])))

    def _resized(self, img, size: tuple[int, int]):
        """`img` at `size` (width, height) with the processor's own resampling filter (bicubic where it names none)."""
        from PIL import Image

        resample = getattr(self.processor, "resample", None)
        return img if img.size == size else img.resize(size, Image.Resampling(
            resample if resample is not None else Image.Resampling.BICUBIC))

    # --- what training and generation hand the model ---------------------------------------------------------

    def counts(self, pil: list) -> list[int] | None:
        """Each opened image's token count where it follows the image's size; None: the layout's fixed count."""
        return None

    def inputs(self, pil: list) -> dict[str, torch.Tensor]:
        """Opened images -> the model's vision keyword arguments."""
        return {"pixel_values": self.process(pil)}

    def split(self, inputs: dict[str, torch.Tensor], per_item: list[int]) -> list[dict[str, torch.Tensor]]:
        """`inputs` of a batch's images -> each item's, `per_item[i]` images each (in order)."""
        out, k = [], 0
        for n in per_item:
            out.append({"pixel_values": inputs["pixel_values"][k:k + n]} if n else {})
            k += n
        return out


class NativeImageLoader(ImageLoader):
    """Images at their own size (Qwen2.5-VL): the processor resizes each to multiples of patch x merge size inside
    its min / max pixels and cuts it into patches; an image's token count is its merged patches, known from its size
    alone (`tokens`), so lengths are exact before any pixel is processed. No squaring: the models train on images as
    they are."""

    def __init__(self, image_processor, min_pixels: int | None = None, max_pixels: int | None = None):
        self.processor = image_processor
        self.mode = "native"
        self.fill = None
        size = dict(image_processor.size) if getattr(image_processor, "size", None) else {}
        if min_pixels:
            size["shortest_edge"] = int(min_pixels)  # the Qwen processors' names for min_pixels / max_pixels
        if max_pixels:
            size["longest_edge"] = int(max_pixels)
        self.kwargs = {"size": size} if (min_pixels or max_pixels) else {}
        self.merge = int(getattr(image_processor, "merge_size", 1) or 1)

    def open(self, ref):
        return self.raw(ref)

    def open_record(self, refs, template: Template) -> list:
        return [self.raw(r) for r in refs]

    def tokens(self, width: int, height: int) -> int:
        patches = self.processor.get_number_of_image_patches(height, width, dict(self.kwargs))
        return int(patches) // self.merge ** 2

    def counts(self, pil: list) -> list[int]:
        return [self.tokens(*img.size) for img in pil]

    def at_grid(self, img):
        """The image resized as the processor resizes it (to its patch grid, aspect stretched), for a server that
        resizes differently (llama.cpp pads a Qwen image to keep its aspect): an image already at its grid passes
        through the processor unchanged."""
        _, h, w = (int(x) for x in self.inputs([img])["image_grid_thw"][0])
        patch = int(self.processor.patch_size)
        return self._resized(img, (w * patch, h * patch))

    def process(self, pil: list) -> torch.Tensor:
        return self.inputs(pil)["pixel_values"]

    def inputs(self, pil: list) -> dict[str, torch.Tensor]:
        out = self.processor(images=pil, return_tensors="pt", **self.kwargs)
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def split(self, inputs: dict[str, torch.Tensor], per_item: list[int]) -> list[dict[str, torch.Tensor]]:
        grid = inputs["image_grid_thw"]
        patches = grid.prod(-1).tolist()
        out, img, row = [], 0, 0
        for n in per_item:
            rows = int(sum(patches[img:img + n]))
            out.append({"pixel_values": inputs["pixel_values"][row:row + rows], "image_grid_thw": grid[img:img + n]}
                       if n else {})
            img, row = img + n, row + rows
        return out

    def identity(self) -> dict:
        """What decides every image's token count (part of the record cache's key)."""
        ip = self.processor
        return {"size": dict(ip.size) if getattr(ip, "size", None) else None, **self.kwargs,
                "patch": getattr(ip, "patch_size", None), "merge": self.merge}


def image_loader(image_processor, image_mode: str, min_pixels: int | None = None, max_pixels: int | None = None):
    """The loader a run's images go through: its recorded image mode (`native` for the Qwen-VL families)."""
    if image_mode == "native":
        return NativeImageLoader(image_processor, min_pixels, max_pixels)
    return ImageLoader(image_processor, image_mode)


def record_counts(images):
    """record -> its images' token counts, where they follow the images' sizes (native resolution), else None.
    Sizes come from the decoded image as training opens it (a DICOM's or a 16-bit PNG's own size)."""
    if images is None or images.mode != "native":
        return None

    def counts(rec) -> list[int]:
        return [images.tokens(*images.raw(ref).size) for ref in rec.images or ()]

    return counts


def set_pixel_bounds(image_processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """A recipe's `data.min_pixels` / `data.max_pixels` onto a native-resolution processor (its `size`'s shortest /
    longest edge, as the Qwen processors name them). The processor is saved with the run, so chat, eval and the web
    page resize images as training did."""
    if min_pixels is None and max_pixels is None:
        return
    from ..errors import UserError

    size = getattr(image_processor, "size", None)
    if not hasattr(image_processor, "merge_size") or size is None:
        raise UserError("data.min_pixels / data.max_pixels: this model's images are resized to one size (they "
                        "bound native-resolution models such as Qwen2.5-VL); drop the settings")
    new = dict(size)
    if min_pixels is not None:
        new["shortest_edge"] = int(min_pixels)
    if max_pixels is not None:
        new["longest_edge"] = int(max_pixels)
    if new["shortest_edge"] > new["longest_edge"]:
        raise UserError(f"data.min_pixels {new['shortest_edge']} is above data.max_pixels {new['longest_edge']}")
    image_processor.size = type(size)(**new) if not isinstance(size, dict) else new
