"""The two-stage pipeline: a batch of decoded radiographs in, one :class:`Result` per image out.

Per image: header check -> stage 1 (lung segmentation on the square-resized image) -> mask
post-processing and mapping to source resolution -> plausibility (lung fraction in range, two
lungs side by side) -> stage 2 (classifier on the lung crop, or the whole image) -> P(covid19)
against the bundle's threshold -> Grad-CAM(++) mapped back to source resolution -> lung attention.

Images that fail a check get ``finding="not_assessable"`` with a reason code and text instead of
a guess. Models are loaded once, in :meth:`Pipeline.from_bundle`; ``run`` is called per batch.
Per-image work between the two networks runs in a small thread pool (NumPy and Pillow release
the GIL), so a GPU is not left waiting on one CPU core.

With ``device_preprocess`` (the default on CUDA) a batch is uploaded, resized, cropped and scored on
the device, group by group (:mod:`inference.device_path`); decoders write into :meth:`Pipeline.host_array`
so that the upload needs no pass over the host memory.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import torch

from inference import imaging, preprocess
from inference.batch import Work, heatmap_at_source, make_result, mask_at_source
from inference.bundle import ModelBundle
from inference.device_path import run_device
from inference.explain import CAM_METHODS, explain_forward, lung_attention
from inference.models.classifiers import prepare_cam
from inference.types import Finding, MapFactory, Result, XrayImage

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MIN_LUNG_FRACTION = 0.05
DEFAULT_MAX_LUNG_FRACTION = 0.70


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
    ``prep_workers`` threads do the per-image NumPy work (default: up to 8, one per core); with more
    than one, OpenCV is set to one thread for the process (the images are the parallel unit).
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
        self._uploader = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxr-upload")
            if self.device_preprocess
            else None
        )
        # Images decoded into page-locked memory (host_array) go to the device on their own stream.
        self._copy_stream = (
            torch.cuda.Stream(self.device) if self.device_preprocess and self.device.type == "cuda" else None
        )
        self._page_lock_failed = False
        if self._pool is not None:
            # The pool already works on several images at once; OpenCV's own threads (connected components)
            # would only compete with it: on a 16-core host, 64 masks took 52 ms with them, 34 ms without.
            cv2.setNumThreads(1)
        self.amp_dtype: torch.dtype | None = None
        if self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.covid_index = bundle.targets.index("covid19")
        self.segmenter = bundle.segmenter.to(self.device).eval()
        self.classifier = bundle.classifier.to(self.device).eval()
        # Channels-last convolutions; on the CPU too for stage 1 (the U-Net at 256 px: 24 ms instead of 33 ms
        # on a 2-core machine), not for stage 2, whose CAM backward was slower so on the CPU (59 ms, not 49).
        self.segmenter.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            self.classifier.to(memory_format=torch.channels_last)
        # Gradients are needed only from the CAM's target layers onwards: everything else is frozen.
        self.target_layers = prepare_cam(bundle.classifier_arch, self.classifier)
        for p in self.segmenter.parameters():
            p.requires_grad_(False)
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
        for pool in (self._pool, self._uploader):
            if pool is not None:
                pool.shutdown(wait=True)
        self._pool = self._uploader = None

    def host_array(self, shape: tuple[int, int], dtype: Any = np.float32) -> np.ndarray | None:
        """An empty array of ``shape`` and ``dtype`` for a decoder to write into
        (``imaging.load_dicom(ds, allocate=pipeline.host_array)``, :data:`inference.imaging.Allocator`):
        float32 for an image's pixels; an integer dtype of ``imaging.STORED_DTYPES`` for its stored values,
        which only the device path takes (elsewhere None: the decoder then keeps no stored values).

        On the CUDA device path the array is page-locked, and a batch of such images goes to the GPU as it is,
        on a copy stream beside the networks, with no pass over the host memory. Stored values cross the bus
        at 1 or 2 bytes a pixel and are looked up in their table on the GPU: on an H100 the copy of 64
        2000 x 2000 float32 images took 19 ms of the batch's 46 ms of GPU work without the CAM, more than both
        networks, and converting them to float16 on the host took longer still (``benchmarks/gpu_upload.py``).
        The page-locked memory is kept by torch's host cache for the next images. Elsewhere the array is an
        ordinary one, and so it is when page-locked memory cannot be had (logged once).
        """
        if (
            not isinstance(shape, tuple) or len(shape) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
        ):
            raise ValueError('Argument "shape" must be a tuple of two positive integers (rows, columns).')
        kind = np.dtype(dtype)
        if kind != np.float32 and kind not in imaging.STORED_DTYPES:
            names = ", ".join(sorted(map(str, imaging.STORED_DTYPES)))
            raise ValueError(f'Argument "dtype" must be float32 or one of {names}.')
        if kind != np.float32 and not self.device_preprocess:
            return None
        if self._copy_stream is not None:
            try:
                size = shape[0] * shape[1] * kind.itemsize
                return torch.empty(size, dtype=torch.uint8, pin_memory=True).numpy().view(kind).reshape(shape)
            except RuntimeError as exc:  # exhausted, or refused by the host (a container's limits)
                if not self._page_lock_failed:
                    self._page_lock_failed = True
                    log.warning("page-locked host memory unavailable (%s); decoding into ordinary memory",
                                " ".join(str(exc).split())[:200], extra={"action": "page_locked_unavailable"})
        return np.empty(shape, dtype=kind)

    # -- helpers ------------------------------------------------------------------------------

    def _map(self, fn: Callable[[Work], T], items: list[Work]) -> list[T]:
        if self._pool is None or len(items) < 2:
            return [fn(w) for w in items]
        return list(self._pool.map(fn, items))

    def _start(self, fn: Callable[[Work], None], items: list[Work]) -> Callable[[], None]:
        """Start ``fn`` on every item in the pool; returns a function that waits for all (and re-raises).

        Without a pool (or with one item) the work is done now and the function returned does nothing.
        """
        if self._pool is None or len(items) < 2:
            for w in items:
                fn(w)
            return lambda: None
        futures = [self._pool.submit(fn, w) for w in items]

        def wait() -> None:
            for f in futures:
                f.result()

        return wait

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _tensor(self, arrays: Sequence[np.ndarray | None]) -> torch.Tensor:
        """Stack stage inputs into a normalised (N, 1, S, S) batch on the model's device."""
        x = torch.from_numpy(np.stack(arrays).astype(np.float32, copy=False))[:, None]  # type: ignore[arg-type]
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        return self._normalise(x)

    def _not_assessable(self, w: Work, code: str, text: str) -> None:
        w.result = make_result(
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

    # -- per-image steps (host) ---------------------------------------------------------------

    def _check_header(self, w: Work) -> None:
        t0 = time.perf_counter()
        reason = imaging.header_reason(w.image)
        w.timings["header"] = time.perf_counter() - t0
        if reason is not None:
            self._not_assessable(w, *reason)

    def _prepare(self, w: Work) -> None:
        self._check_header(w)
        if w.result is None:
            t0 = time.perf_counter()
            w.x1 = imaging.square_resize(w.image.pixels, self.bundle.segmenter_size)
            w.timings["preprocess"] = time.perf_counter() - t0

    def _small_mask(self, w: Work, ready: Callable[[], None] | None = None) -> None:
        """Stage 1's probability map (in ``w.x1``) -> the post-processed mask on the square grid, and
        whether its part over the image looks like two lungs side by side (``w.shape_problem``).

        ``ready`` (from :meth:`_stage1_async`) waits until the map in ``w.x1`` has arrived from the device.
        """
        if ready is not None:
            ready()
        t0 = time.perf_counter()
        small = w.small = imaging.postprocess_mask(w.x1, threshold=0.5)  # type: ignore[arg-type]
        w.x1 = None
        t1 = time.perf_counter()
        left, top, right, bottom = imaging.square_region(w.image.pixels.shape, small.shape[0])
        region = small[int(round(top)) : int(round(bottom)), int(round(left)) : int(round(right))]
        w.shape_problem = self._shape_problem(region)
        w.timings["postprocess"] = t1 - t0
        w.timings["plausibility"] = time.perf_counter() - t1

    def _check_plausible(self, w: Work) -> None:
        """Not assessable when the lung area is out of range, else when the mask is not two lungs."""
        assert w.lung_fraction is not None
        problem = self._fraction_problem(w.lung_fraction) or w.shape_problem
        if problem is not None:
            self._not_assessable(w, *problem)

    def _after_stage1(self, w: Work) -> None:
        self._small_mask(w)
        t0 = time.perf_counter()
        w.mask = mask_at_source(w.small, w.image.pixels.shape)  # type: ignore[arg-type]
        w.lung_fraction = float(w.mask.mean())
        w.timings["postprocess"] += time.perf_counter() - t0
        self._check_plausible(w)
        if w.result is not None:
            return
        t1 = time.perf_counter()
        size = self.bundle.classifier_size
        if self.bundle.crop_mode == "lung":
            w.box = imaging.lung_box(w.mask)
            w.x2 = imaging.lung_crop(w.image.pixels, w.mask, size)
        elif self.bundle.crop_mode == "square":
            w.box = imaging.centre_box(w.image.pixels.shape)
            w.x2 = imaging.centre_crop(w.image.pixels, size)
        else:
            w.x2 = imaging.square_resize(w.image.pixels, size)
        w.timings["preprocess"] = w.timings.get("preprocess", 0.0) + time.perf_counter() - t1

    def _fraction_problem(self, fraction: float) -> tuple[str, str] | None:
        """(reason code, text) when the lung area is out of the plausible range; None when it is in."""
        if fraction < self.min_lung_fraction:
            return "no_lungs", f"no lung fields found (lung area {fraction:.1%} of the image)"
        if fraction > self.max_lung_fraction:
            return "no_lungs", f"implausible lung segmentation (lung area {fraction:.1%} of the image)"
        return None

    @staticmethod
    def _shape_problem(mask: np.ndarray) -> tuple[str, str] | None:
        """(reason code, text) when the mask is not two lungs side by side; None when it is."""
        one_lung = ("lateral", "one lung field only: a lateral view or not a frontal chest radiograph")
        _, areas, centroids = preprocess.components(mask, 4)
        if len(areas) < 3:
            return one_lung
        first, second = preprocess.largest(areas, 2)
        if areas[second] < 0.2 * areas[first]:
            return one_lung
        rows, cols = mask.shape
        (xa, ya), (xb, yb) = centroids[first], centroids[second]
        if abs(xa - xb) < 0.15 * cols or abs(ya - yb) > 0.25 * rows:
            return "no_lungs", "the segmented regions are not two lungs side by side"
        return None

    def _finish(self, w: Work) -> None:
        t0 = time.perf_counter()
        heat = att = None
        if w.cam is not None and isinstance(w.mask, np.ndarray):
            heat = heatmap_at_source(w.cam, w.box, w.image.pixels.shape)
            att = lung_attention(heat, w.mask)
        w.cam = None
        w.timings["explain_map"] = time.perf_counter() - t0
        self._done(w, w.prob, att, heat)  # type: ignore[arg-type]

    def _done(self, w: Work, prob: float, att: float | None, heat: np.ndarray | MapFactory | None) -> None:
        finding: Finding = "positive" if prob >= self.bundle.threshold else "negative"
        w.result = make_result(
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

        ``Result.timings`` holds seconds per stage; batched stages (``stage1``, ``stage2``, ``cam``,
        and on the device path also ``preprocess`` and ``explain_map``) are the batch's time divided
        by the number of images that went through them; the device path adds ``mask_wait``, its wall time
        waiting for the thread pool's masks once its own work is done. Calls from several threads are
        served one after the other.
        """
        if isinstance(images, XrayImage):
            raise TypeError('Argument "images" must be a sequence of XrayImage, not one image.')
        out: list[Result] = []
        with self._lock:
            for start in range(0, len(images), self.max_batch):
                batch = list(images[start : start + self.max_batch])
                t0 = time.perf_counter()
                work = [Work(img) for img in batch]
                if self.device_preprocess:
                    run_device(self, work, explain)
                else:
                    self._run_host(work, explain)
                total = time.perf_counter() - t0
                for w in work:
                    w.timings["total"] = total / len(work)
                out.extend(w.result for w in work)  # type: ignore[misc]
        return out

    @staticmethod
    def _share(items: list[Work], key: str, seconds: float) -> None:
        for w in items:
            w.timings[key] = w.timings.get(key, 0.0) + seconds / len(items)

    def _stage1(self, x: torch.Tensor) -> np.ndarray:
        """Stage 1's probability maps (N, S, S) on the host."""
        probs, arrived = self._stage1_async(x)
        arrived()
        return probs

    def _stage1_async(self, x: torch.Tensor) -> tuple[np.ndarray, Callable[[], None]]:
        """:meth:`_stage1` without waiting for the device: the maps, and a function that returns once they
        have arrived (on CUDA they are copied into page-locked memory behind the network; on the CPU they
        are there at once)."""
        # Stage 1 stays in fp32 on every device: its mask decides "not assessable" and the crop, and the
        # small U-Net costs little; bf16 moved mask borders on ambiguous images (benchmarks/gpu_check.py).
        with torch.inference_mode():
            x = x.float().contiguous(memory_format=torch.channels_last)
            prob = torch.sigmoid(self.segmenter(x).float())[:, 0]
            if self.device.type != "cuda":
                return prob.numpy(), lambda: None
            host = torch.empty(prob.shape, dtype=prob.dtype, pin_memory=True)
            host.copy_(prob, non_blocking=True)
        arrived = torch.cuda.Event()
        arrived.record()
        return host.numpy(), arrived.synchronize

    def _stage2(
        self, todo: list[Work], x: torch.Tensor, explain: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """P(covid19) per image, and the CAMs on the stage 2 grid when ``explain``."""
        t0 = time.perf_counter()
        cams: np.ndarray | None = None
        if explain:
            cams, logits, t_fwd = explain_forward(
                self.classifier, self.target_layers, x, self.covid_index, self.cam, self.amp_dtype,
                sync=self._sync,
            )
        else:
            with torch.inference_mode(), self._autocast():
                logits = self.classifier(x).float()
            self._sync()
            t_fwd = time.perf_counter() - t0
        p = torch.softmax(logits, dim=1)[:, self.covid_index].cpu().numpy()
        self._share(todo, "stage2", t_fwd)
        if explain:
            self._share(todo, "cam", time.perf_counter() - t0 - t_fwd)
        return p, cams

    def _probabilities(self, todo: list[Work], x: torch.Tensor) -> torch.Tensor:
        """P(covid19) per image without the CAM, left on the device and not waited for: the ``stage2`` timing
        is the host's time to queue the network (on the CPU, to run it)."""
        t0 = time.perf_counter()
        with torch.inference_mode(), self._autocast():
            p = torch.softmax(self.classifier(x).float(), dim=1)[:, self.covid_index]
        self._share(todo, "stage2", time.perf_counter() - t0)
        return p

    def _run_host(self, work: list[Work], explain: bool) -> None:
        """NumPy/Pillow preprocessing per image (exactly as training), networks batched."""
        self._map(self._prepare, work)
        todo = [w for w in work if w.result is None]
        if todo:
            t0 = time.perf_counter()
            probs = self._stage1(self._tensor([w.x1 for w in todo]))
            self._share(todo, "stage1", time.perf_counter() - t0)
            for w, prob in zip(todo, probs, strict=True):
                w.x1 = prob
            self._map(self._after_stage1, todo)
        todo = [w for w in work if w.result is None]
        if todo:
            p, cams = self._stage2(todo, self._tensor([w.x2 for w in todo]), explain)
            for i, w in enumerate(todo):
                w.x2 = None
                w.prob = float(p[i])
                w.cam = None if cams is None else cams[i]
            self._map(self._finish, todo)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.bundle.mean) / self.bundle.std
        if self.device.type == "cuda":
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return torch.autocast(device_type="cpu", enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def run_isolated(pipeline: Any, images: Sequence[XrayImage],
                 explain: bool = True) -> list[Result | Exception]:
    """``pipeline.run`` on the batch; when the batch fails, on each image alone, so that one image (out of
    memory, a shape no stage takes) costs only its own result: an image that fails gives its exception in its
    place. One result or exception per image, in order."""
    if not images:
        return []
    try:
        return list(pipeline.run(images, explain=explain))
    except Exception as exc:  # MemoryError included: find the image that broke the batch
        if len(images) == 1:
            return [exc]
        log.warning("batch of %d failed (%s); running the images one by one", len(images), exc,
                    extra={"action": "batch_split"})
    out: list[Result | Exception] = []
    for image in images:
        try:
            out.extend(pipeline.run([image], explain=explain))
        except Exception as exc:  # the caller records it as this image's failure
            out.append(exc)
    return out
