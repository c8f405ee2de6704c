"""The two-stage pipeline: a batch of decoded radiographs in, one :class:`Result` per image out.

Per image: header check -> stage 1 (lung segmentation on the square-resized image) -> mask
post-processing and mapping to source resolution -> plausibility (lung fraction in range, two
lungs side by side) -> stage 2 (classifier on the lung crop, or the whole image) -> P(covid19)
against the bundle's threshold -> Grad-CAM(++) mapped back to source resolution -> lung attention.

Images that fail a check get ``finding="not_assessable"`` with a reason code and text instead of
a guess. Models are loaded once, in :meth:`Pipeline.from_bundle`; ``run`` is called per batch.
Per-image work between the two networks runs in a small thread pool (NumPy and Pillow release
the GIL), so a GPU is not left waiting on one CPU core.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from scipy import ndimage

from inference import gpu_preprocess as gp
from inference import imaging
from inference.bundle import ModelBundle
from inference.explain import CAM_METHODS, cam_forward, lung_attention
from inference.models.classifiers import cam_layers
from inference.types import Finding, Result, XrayImage

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MIN_LUNG_FRACTION = 0.05
DEFAULT_MAX_LUNG_FRACTION = 0.70


@dataclass
class _Work:
    """Per-image state while a batch moves through the stages."""

    image: XrayImage
    timings: dict[str, float] = field(default_factory=dict)
    result: Result | None = None  # set once the image is finished (not assessable, or done)
    x1: np.ndarray | torch.Tensor | None = None  # stage 1 input
    mask: np.ndarray | None = None  # lung mask at source resolution
    lung_fraction: float | None = None
    x2: np.ndarray | torch.Tensor | None = None  # stage 2 input
    box: tuple[int, int, int, int] | None = None  # stage 2 crop box in source pixels (r0, c0, r1, c1)
    pixels_dev: torch.Tensor | None = None  # device copies for device-side preprocessing
    mask_dev: torch.Tensor | None = None


def _resolve_device(device: str) -> torch.device:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f'Argument "device" must be auto, cpu or cuda; got {device!r}.')
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError('Argument "device" is cuda, but no CUDA device is available.')
    return torch.device(device)


class Pipeline:
    """Both stages of one model bundle on one device, ready for batches.

    ``cpu_threads`` > 0 sets torch's intra-op threads for the process (0 keeps torch's default).
    ``prep_workers`` threads do the per-image NumPy work (default: up to 8, one per core).
    ``device_preprocess`` resizes and crops on the model's device (default: on CUDA only; the
    CPU path uses :mod:`inference.preprocess`, exactly as training does).
    """

    def __init__(
        self,
        bundle: ModelBundle,
        device: str = "auto",
        cam: str = "gradcam++",
        cpu_threads: int = 0,
        *,
        max_batch: int = 64,
        prep_workers: int | None = None,
        min_lung_fraction: float = DEFAULT_MIN_LUNG_FRACTION,
        max_lung_fraction: float = DEFAULT_MAX_LUNG_FRACTION,
        device_preprocess: bool | None = None,
    ) -> None:
        if cam not in CAM_METHODS:
            raise ValueError(f'Argument "cam" must be one of {", ".join(CAM_METHODS)}; got {cam!r}.')
        if not isinstance(cpu_threads, int) or cpu_threads < 0:
            raise ValueError('Argument "cpu_threads" must be a non-negative integer.')
        if max_batch < 1:
            raise ValueError('Argument "max_batch" must be at least 1.')
        if not 0.0 <= min_lung_fraction < max_lung_fraction <= 1.0:
            raise ValueError(
                'Arguments "min_lung_fraction" and "max_lung_fraction" must satisfy 0 <= min < max <= 1.'
            )
        self.bundle = bundle
        self.device = _resolve_device(device)
        self.cam = cam
        self.max_batch = max_batch
        self.min_lung_fraction = min_lung_fraction
        self.max_lung_fraction = max_lung_fraction
        self._lock = threading.Lock()  # one batch at a time: the CAM hooks the shared model
        self.device_preprocess = (
            self.device.type == "cuda" if device_preprocess is None else device_preprocess
        )
        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        workers = prep_workers if prep_workers is not None else min(8, os.cpu_count() or 1)
        self._pool = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cxr-prep") if workers > 1 else None
        )
        self.amp_dtype: torch.dtype | None = None
        if self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.covid_index = bundle.targets.index("covid19")
        self.segmenter = bundle.segmenter.to(self.device).eval()
        self.classifier = bundle.classifier.to(self.device).eval()
        if self.device.type == "cuda":
            self.segmenter.to(memory_format=torch.channels_last)
            self.classifier.to(memory_format=torch.channels_last)
        self.target_layer, grad_layer = cam_layers(bundle.classifier_arch, self.classifier)
        # Gradients are needed only from the CAM's target layer onwards: freeze everything else so
        # the backward pass covers just the network's head.
        for p in self.segmenter.parameters():
            p.requires_grad_(False)
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        for p in grad_layer.parameters():
            p.requires_grad_(True)
        log.info(
            "pipeline ready",
            extra={
                "action": "pipeline_ready",
                "bundle_version": bundle.version,
                "device": str(self.device),
                "cam": cam,
            },
        )

    @classmethod
    def from_bundle(
        cls,
        path: str | Path | None = None,
        device: str = "auto",
        cam: str = "gradcam++",
        cpu_threads: int = 0,
        **kwargs: Any,
    ) -> Pipeline:
        """Load the bundle at ``path`` (None: the shipped default) and build the pipeline.

        Raises :class:`~dicom_node.errors.ModelBundleError` when the bundle is missing or invalid.
        """
        return cls(ModelBundle.load(path), device=device, cam=cam, cpu_threads=cpu_threads, **kwargs)

    def close(self) -> None:
        """Stop the preprocessing threads (the pipeline cannot run afterwards)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # -- helpers ------------------------------------------------------------------------------

    def _map(self, fn: Callable[[_Work], T], items: list[_Work]) -> list[T]:
        if self._pool is None or len(items) < 2:
            return [fn(w) for w in items]
        return list(self._pool.map(fn, items))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _tensor(self, arrays: Sequence[np.ndarray | torch.Tensor | None]) -> torch.Tensor:
        """Stack stage inputs into a normalised (N, 1, S, S) batch on the model's device."""
        if isinstance(arrays[0], torch.Tensor):
            x = torch.stack(arrays)[:, None].to(self.device)  # type: ignore[arg-type,misc]
        else:
            x = torch.from_numpy(np.stack(arrays).astype(np.float32, copy=False))[:, None]  # type: ignore[arg-type]
            if self.device.type == "cuda":
                x = x.pin_memory().to(self.device, non_blocking=True)
        x = (x - self.bundle.mean) / self.bundle.std
        if self.device.type == "cuda":
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _not_assessable(self, w: _Work, code: str, text: str) -> None:
        w.pixels_dev = w.mask_dev = None
        w.result = Result(
            finding="not_assessable",
            probability=None,
            threshold=self.bundle.threshold,
            reason=text,
            reason_code=code,
            lung_fraction=w.lung_fraction,
            lung_mask=w.mask,
            model_name=self.bundle.name,
            model_version=self.bundle.version,
            timings=w.timings,
        )
        log.info(
            "image not assessable",
            extra={"action": "not_assessable", "reason_code": code, "source": w.image.source},
        )

    # -- per-image steps ----------------------------------------------------------------------

    def _prepare(self, w: _Work) -> None:
        t0 = time.perf_counter()
        reason = imaging.header_reason(w.image)
        t1 = time.perf_counter()
        w.timings["header"] = t1 - t0
        if reason is not None:
            self._not_assessable(w, *reason)
            return
        if self.device_preprocess:
            w.pixels_dev = torch.from_numpy(np.ascontiguousarray(w.image.pixels, dtype=np.float32)).to(
                self.device
            )
            w.x1 = gp.square_resize(w.pixels_dev, self.bundle.segmenter_size)
        else:
            w.x1 = imaging.square_resize(w.image.pixels, self.bundle.segmenter_size)
        w.timings["preprocess"] = time.perf_counter() - t1

    def _after_stage1(self, w: _Work, prob: np.ndarray) -> None:
        t0 = time.perf_counter()
        shape = w.image.pixels.shape
        small = imaging.postprocess_mask(prob, threshold=0.5)
        left, top, right, bottom = imaging.square_region(shape, small.shape[0])
        small_region = small[int(round(top)) : int(round(bottom)), int(round(left)) : int(round(right))]
        if self.device_preprocess:
            w.mask_dev = gp.unsquare(torch.from_numpy(small).to(self.device).float(), shape) >= 0.5
            w.lung_fraction = float(w.mask_dev.float().mean())
            w.mask = w.mask_dev.cpu().numpy()
        else:
            w.mask = imaging.unsquare(small.astype(np.float32), shape) >= 0.5
            w.lung_fraction = float(w.mask.mean())
        t1 = time.perf_counter()
        w.timings["postprocess"] = t1 - t0
        problem = self._implausible(small_region, w.lung_fraction)
        w.timings["plausibility"] = time.perf_counter() - t1
        if problem is not None:
            self._not_assessable(w, *problem)
            return
        t2 = time.perf_counter()
        size = self.bundle.classifier_size
        if self.device_preprocess:
            if self.bundle.crop_mode == "lung":
                w.box = gp.lung_box(w.mask_dev)  # type: ignore[arg-type]
                w.x2 = gp.lung_crop(w.pixels_dev, w.mask_dev, size, w.box)  # type: ignore[arg-type]
            else:
                w.x2 = gp.square_resize(w.pixels_dev, size)  # type: ignore[arg-type]
            w.pixels_dev = None
        elif self.bundle.crop_mode == "lung":
            w.box = imaging.lung_box(w.mask)
            w.x2 = imaging.lung_crop(w.image.pixels, w.mask, size)
        else:
            w.x2 = imaging.square_resize(w.image.pixels, size)
        w.timings["preprocess"] = w.timings.get("preprocess", 0.0) + time.perf_counter() - t2

    def _implausible(self, mask: np.ndarray, fraction: float) -> tuple[str, str] | None:
        """(reason code, text) when the mask is not a plausible pair of lungs; None when it is."""
        if fraction < self.min_lung_fraction:
            return "no_lungs", f"no lung fields found (lung area {fraction:.1%} of the image)"
        if fraction > self.max_lung_fraction:
            return "no_lungs", f"implausible lung segmentation (lung area {fraction:.1%} of the image)"
        labels, n = ndimage.label(mask)
        sizes = np.bincount(labels.ravel())[1:]
        order = np.argsort(sizes)[::-1]
        if n < 2 or sizes[order[1]] < 0.2 * sizes[order[0]]:
            return "lateral", "one lung field only: a lateral view or not a frontal chest radiograph"
        rows, cols = mask.shape
        (ya, xa), (yb, xb) = ndimage.center_of_mass(mask, labels, [int(order[0]) + 1, int(order[1]) + 1])
        if abs(xa - xb) < 0.15 * cols or abs(ya - yb) > 0.25 * rows:
            return "no_lungs", "the segmented regions are not two lungs side by side"
        return None

    def _finish(self, w: _Work, prob: float, cam: np.ndarray | None) -> None:
        t0 = time.perf_counter()
        heat = att = None
        if cam is not None and w.mask is not None:
            shape = w.image.pixels.shape
            if w.mask_dev is not None:
                cam_dev = torch.from_numpy(cam).to(self.device)
                heat_dev = (
                    gp.uncrop(cam_dev, w.box, shape) if w.box is not None else gp.unsquare(cam_dev, shape)
                )
                heat_dev.clamp_(0.0, 1.0)
                total = float(heat_dev.sum(dtype=torch.float64))
                inside = float(heat_dev[w.mask_dev].sum(dtype=torch.float64))
                att = min(1.0, max(0.0, inside / total)) if total > 0 else None
                heat = heat_dev.cpu().numpy()
            else:
                heat = (
                    imaging.uncrop(cam, w.box, shape) if w.box is not None else imaging.unsquare(cam, shape)
                )
                np.clip(heat, 0.0, 1.0, out=heat)
                att = lung_attention(heat, w.mask)
        w.mask_dev = None
        w.timings["explain_map"] = time.perf_counter() - t0
        finding: Finding = "positive" if prob >= self.bundle.threshold else "negative"
        w.result = Result(
            finding=finding,
            probability=prob,
            threshold=self.bundle.threshold,
            lung_attention=att,
            lung_fraction=w.lung_fraction,
            heatmap=heat,
            lung_mask=w.mask,
            model_name=self.bundle.name,
            model_version=self.bundle.version,
            timings=w.timings,
        )

    # -- batches ------------------------------------------------------------------------------

    def run(self, images: Sequence[XrayImage], explain: bool = True) -> list[Result]:
        """One :class:`Result` per image, in order. ``explain`` adds the heatmap and lung attention.

        ``Result.timings`` holds seconds per stage; batched stages (``stage1``, ``stage2``, ``cam``)
        are the batch's time divided by the number of images that went through them. Calls from
        several threads are served one after the other.
        """
        if isinstance(images, XrayImage):
            raise TypeError('Argument "images" must be a sequence of XrayImage, not one image.')
        out: list[Result] = []
        with self._lock:
            for start in range(0, len(images), self.max_batch):
                out.extend(self._run_batch(list(images[start : start + self.max_batch]), explain))
        return out

    def _run_batch(self, images: list[XrayImage], explain: bool) -> list[Result]:
        t_start = time.perf_counter()
        work = [_Work(img) for img in images]
        self._map(self._prepare, work)

        todo = [w for w in work if w.result is None]
        if todo:
            t0 = time.perf_counter()
            x = self._tensor([w.x1 for w in todo])
            # Stage 1 stays in fp32 on every device: its mask decides "not assessable" and the crop, and the
            # small U-Net costs little; bf16 moved mask borders on ambiguous images (benchmarks/gpu_check.py).
            with torch.inference_mode():
                probs = torch.sigmoid(self.segmenter(x.float()).float())[:, 0].cpu().numpy()
            dt = (time.perf_counter() - t0) / len(todo)
            for w in todo:
                w.timings["stage1"] = dt
                w.x1 = None
            index = {id(w): i for i, w in enumerate(todo)}
            self._map(lambda w: self._after_stage1(w, probs[index[id(w)]]), todo)

        todo = [w for w in work if w.result is None]
        if todo:
            t0 = time.perf_counter()
            x = self._tensor([w.x2 for w in todo])
            cams: np.ndarray | None = None
            if explain:
                cams, logits, t_fwd = cam_forward(
                    self.classifier,
                    self.target_layer,
                    x,
                    self.covid_index,
                    self.cam,
                    self.amp_dtype,
                    sync=self._sync,
                )
            else:
                with torch.inference_mode(), self._autocast():
                    logits = self.classifier(x).float()
                self._sync()
                t_fwd = time.perf_counter() - t0
            p = torch.softmax(logits, dim=1)[:, self.covid_index].cpu().numpy()
            total = time.perf_counter() - t0
            for w in todo:
                w.timings["stage2"] = t_fwd / len(todo)
                if explain:
                    w.timings["cam"] = (total - t_fwd) / len(todo)
                w.x2 = None
            index = {id(w): i for i, w in enumerate(todo)}
            self._map(
                lambda w: self._finish(
                    w, float(p[index[id(w)]]), None if cams is None else cams[index[id(w)]]
                ),
                todo,
            )
        total = time.perf_counter() - t_start
        for w in work:
            w.timings["total"] = total / len(work)
        return [w.result for w in work]  # type: ignore[misc]

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return torch.autocast(device_type="cpu", enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
