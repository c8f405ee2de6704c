"""Images preloaded into uint8 tensors with the inference engine's own preprocessing.

Every image goes through ``inference.preprocess`` exactly as at inference time: ``square_resize`` (pad to
square with a fixed value, resize) for stage 1 and for the whole-image mode, ``postprocess_mask`` on stage 1's
probability map and ``lung_crop`` for the lung-segmented mode, ``centre_crop`` for the square mode. Nothing
depends on the label or the source.

A *shape-normalised* copy of each image (its centre square, resized to a fixed size) is kept beside it: a
model that scores well only on the originals is using the image's shape, not its content.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from training.datasets import Sample
from training.loops import predict

log = logging.getLogger(__name__)


def _workers() -> int:
    """Threads for per-image CPU work (NumPy, SciPy and Pillow release the GIL for most of it)."""
    return max(1, min(8, os.cpu_count() or 1))


def to_uint8(a: np.ndarray) -> np.ndarray:
    """float in [0, 1] -> uint8 (rounded, clipped)."""
    return np.clip(np.rint(np.asarray(a, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def load_pixels(sample: Sample) -> np.ndarray:
    """The image as float32 in [0, 1] via ``inference.imaging.load_any`` (DICOM, PNG, JPEG)."""
    from inference.imaging import load_any

    return np.asarray(load_any(sample.file).pixels, dtype=np.float32)


def load_mask(path: str, shape: tuple[int, int]) -> np.ndarray:
    """A binary mask PNG as bool, resized (nearest) to ``shape`` when it differs."""
    with Image.open(path) as im:
        m = np.asarray(im.convert("L")) > 127
    if m.shape != tuple(shape):
        from inference.preprocess import resize_mask

        m = resize_mask(m, shape)
    return m


def centre_square(pixels: np.ndarray) -> np.ndarray:
    """The largest centred square of an image (the shape-normalised view): ``preprocess.centre_box``."""
    from inference.preprocess import centre_box

    r0, c0, r1, c1 = centre_box(pixels.shape[:2])
    return pixels[r0:r1, c0:c1]


@dataclass
class ImageSet:
    """Preloaded images of a list of samples (tensors uint8, N x 1 x S x S, on the CPU)."""

    samples: list[Sample]
    pixels: list[np.ndarray]  # source images as uint8 (lung crops are cut from these, as at inference)
    seg_input: torch.Tensor  # square_resize(pixels, seg_size): stage 1 input
    whole: torch.Tensor  # square_resize(pixels, cls_size): whole-image mode input
    square: torch.Tensor  # centre_crop(pixels, cls_size): square mode input
    masks: torch.Tensor | None = None  # ground-truth lung masks at seg_size (segmentation samples)
    centre: ImageSet | None = None  # the same images' centre squares (shape-normalised copies)

    @property
    def shapes(self) -> np.ndarray:
        """(N, 2) source rows, columns."""
        return np.asarray([p.shape[:2] for p in self.pixels], dtype=np.int64).reshape(-1, 2)

    @property
    def y(self) -> torch.Tensor:
        """Class ids (0 normal, 1 covid); only for classification samples."""
        return torch.tensor([s.target for s in self.samples], dtype=torch.long)

    @property
    def sources(self) -> list[str]:
        return [s.source for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, index: Sequence[int]) -> ImageSet:
        idx = torch.as_tensor(list(index), dtype=torch.long)
        return ImageSet(samples=[self.samples[i] for i in index], pixels=[self.pixels[i] for i in index],
                        seg_input=self.seg_input[idx], whole=self.whole[idx], square=self.square[idx],
                        masks=None if self.masks is None else self.masks[idx],
                        centre=None if self.centre is None else self.centre.subset(index))


def _stack(arrs: list[np.ndarray], size: int) -> torch.Tensor:
    if not arrs:
        return torch.zeros((0, 1, size, size), dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrs))[:, None].contiguous()


def _from_pixels(samples: list[Sample], pixels: list[np.ndarray], seg_size: int, cls_size: int) -> ImageSet:
    from inference.preprocess import centre_crop, square_resize

    def one(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        f = p.astype(np.float32) / 255.0
        return (to_uint8(square_resize(f, seg_size)), to_uint8(square_resize(f, cls_size)),
                to_uint8(centre_crop(f, cls_size)))

    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        rows = list(pool.map(one, pixels))
    return ImageSet(samples=samples, pixels=pixels, seg_input=_stack([r[0] for r in rows], seg_size),
                    whole=_stack([r[1] for r in rows], cls_size),
                    square=_stack([r[2] for r in rows], cls_size))


def build_image_set(samples: Sequence[Sample], *, seg_size: int, cls_size: int, with_masks: bool = False,
                    centre_size: int = 0) -> ImageSet:
    """Decode and preprocess ``samples``.

    ``with_masks`` also loads their lung masks (segmentation rows). ``centre_size`` > 0 adds the
    shape-normalised copies: each image's centre square resized to ``centre_size`` x ``centre_size``.
    """
    from inference.preprocess import centre_crop, square_resize

    for name, v in (("seg_size", seg_size), ("cls_size", cls_size)):
        if not 32 <= int(v) <= 2048:
            raise ValueError(f'Argument "{name}" must be between 32 and 2048.')
    samples = list(samples)

    def one(s: Sample) -> tuple[np.ndarray, np.ndarray | None]:
        px = load_pixels(s)
        if not with_masks:
            return to_uint8(px), None
        if s.mask_file is None:
            raise ValueError(f"sample {s.key or s.file} has no mask_file")
        m = load_mask(str(s.mask_file), px.shape[:2])
        return to_uint8(px), (square_resize(m.astype(np.float32), seg_size) > 0.5).astype(np.uint8)

    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        rows = list(pool.map(one, samples))
    pixels = [r[0] for r in rows]
    masks = [r[1] for r in rows if r[1] is not None]
    out = _from_pixels(samples, pixels, seg_size, cls_size)
    if with_masks:
        out.masks = _stack(masks, seg_size)
    if centre_size:
        centres = [to_uint8(centre_crop(p.astype(np.float32) / 255.0, centre_size))
                   for p in pixels]
        out.centre = _from_pixels(samples, centres, seg_size, cls_size)
    return out


@dataclass
class LungCrops:
    """Stage 2 inputs in lung mode, with what stage 1 found."""

    crops: torch.Tensor  # uint8 (N, 1, cls_size, cls_size): lung_crop of the source image
    crop_masks: torch.Tensor  # bool (N, 1, cls_size, cls_size): the lung mask in the crop's frame
    whole_masks: torch.Tensor  # bool (N, 1, cls_size, cls_size): the lung mask in the whole square's frame
    square_masks: torch.Tensor  # bool (N, 1, cls_size, cls_size): the lung mask in the centre square's frame
    lung_fraction: np.ndarray  # mask area / image area
    found: np.ndarray  # bool: stage 1 found lungs (else the crop is the whole square)


@torch.inference_mode()
def lung_crops(segmenter: nn.Module, images: ImageSet, *, cls_size: int, device: torch.device,
               mean: float = 0.5, std: float = 0.25, batch_size: int = 32) -> LungCrops:
    """Run stage 1 on ``images.seg_input`` and cut the stage 2 inputs exactly as the pipeline does.

    ``postprocess_mask`` on the probability map (two largest components, holes filled), mapped back to the
    source image (``unsquare``, as ``inference.pipeline`` does), then ``lung_crop`` of the source image.
    The mask is also given in the frames of the whole-image and square modes' inputs.
    """
    from inference.preprocess import centre_crop, lung_crop, postprocess_mask, square_resize, unsquare

    prob = predict(segmenter, images.seg_input, kind="segmentation", device=device, mean=mean, std=std,
                   batch_size=batch_size)
    def one(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, bool]:
        px = images.pixels[i].astype(np.float32) / 255.0
        small = np.asarray(postprocess_mask(prob[i, 0].numpy(), threshold=0.5), dtype=bool)
        if not small.any():  # the pipeline calls this not assessable; keep the image so every case is scored
            empty = np.zeros((cls_size, cls_size), dtype=bool)
            return to_uint8(square_resize(px, cls_size)), empty, empty, empty, 0.0, False
        mask = unsquare(small.astype(np.float32), px.shape) >= 0.5
        m = mask.astype(np.float32)
        return (to_uint8(lung_crop(px, mask, cls_size)), lung_crop(m, mask, cls_size) > 0.5,
                square_resize(m, cls_size) > 0.5, centre_crop(m, cls_size) > 0.5, float(mask.mean()), True)

    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        rows = list(pool.map(one, range(len(images.pixels))))

    def masks(k: int) -> torch.Tensor:
        return _stack([r[k] for r in rows], cls_size).bool()  # type: ignore[misc]

    return LungCrops(crops=_stack([r[0] for r in rows], cls_size), crop_masks=masks(1), whole_masks=masks(2),
                     square_masks=masks(3), lung_fraction=np.asarray([r[4] for r in rows]),
                     found=np.asarray([r[5] for r in rows], dtype=bool))
