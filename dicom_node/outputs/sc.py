"""The heatmap as an RGB Secondary Capture in the source study (highdicom ``SCImage.from_ref_dataset``).

The SC is a derived image: ImageType DERIVED\\SECONDARY, SourceImageSequence pointing at the source
radiograph (purpose: source image for image processing operation), a DerivationDescription and a
DerivationCodeSequence (Saliency), BurnedInAnnotation YES (the caption band on top says
"NOT FOR DIAGNOSTIC USE", the model and the finding), BodyPartExamined copied from the source, and the
node as contributing processing equipment. Sources whose long side exceeds
:data:`dicom_node.outputs.caption.MAX_SIDE` pixels are downsampled, with PixelSpacing scaled to match. A
source that decoding turned to the conventional orientation (``XrayImage.meta["source_orientation"]``) is
shown turned, as the model saw it: Patient Orientation L\\F, the pixel spacing swapped when it was turned by
90 degrees, and a caption line and the DerivationDescription naming the stored orientation.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from highdicom import PhotometricInterpretationValues
from highdicom.sc import SCImage
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes

from dicom_node.outputs.caption import add_caption, greyscale_rgb, output_shape, overlay
from dicom_node.outputs.common import (
    MANUFACTURER,
    NOT_FOR_DIAGNOSTIC_USE,
    SC_SERIES_DESCRIPTION,
    SC_SERIES_NUMBER,
    check_card,
    copy_patient_study,
    derived_uid,
    model_label,
    node_equipment,
    pixel_spacing,
    series_description,
    software_versions,
)
from inference.imaging import conventional_steps
from inference.types import Result, XrayImage

logger = logging.getLogger(__name__)

_BIPED = {"A", "P", "R", "L", "H", "F"}
# Conventional display of a frontal chest radiograph: the patient's left on the viewer's right, head up.
_FRONTAL_ORIENTATION = ("L", "F")
_FINDING_TEXT = {"positive": "YES", "negative": "NO", "not_assessable": "NOT ASSESSABLE"}


def distinct(value: float, other: float) -> tuple[str, str]:
    """``value`` and ``other`` with two decimals, or as many more (up to six) as tell them apart: a
    probability just under the threshold never reads as equal to it."""
    for digits in range(2, 7):
        shown = f"{value:.{digits}f}", f"{other:.{digits}f}"
        if shown[0] != shown[1]:
            break
    return shown


def caption_lines(result: Result, card: Mapping[str, Any]) -> list[str]:
    """The caption's text lines under the warning: model, finding with probability, lung attention."""
    finding = f"COVID-19 pneumonia suspected: {_FINDING_TEXT[result.finding]}"
    if result.probability is not None:
        probability, threshold = distinct(result.probability, result.threshold)
        finding += f"  (p = {probability}, threshold {threshold})"
    lines = [f"Model {model_label(card)}", finding]
    if result.lung_attention is not None:
        lines.append(f"Lung attention {result.lung_attention:.2f}")
    if result.finding == "not_assessable" and result.reason:
        lines.append(result.reason[:120])
    return lines


def _orientation(reference: Dataset) -> tuple[str, str] | None:
    value = reference.get("PatientOrientation")
    if value is not None and len(value) == 2 and all(str(v) in _BIPED for v in value):
        return str(value[0]), str(value[1])
    return None


def _spacing(reference: Dataset, scale: float, transposed: bool) -> tuple[float, float] | None:
    # Pixel Spacing is in the patient (PS3.3 10.7.1.3): a detector's Imager Pixel Spacing is not one
    spacing = pixel_spacing(reference, ("PixelSpacing",))
    if spacing is None:
        return None
    if transposed:
        spacing = spacing[::-1]
    return (round(spacing[0] / scale, 6), round(spacing[1] / scale, 6))


def build_heatmap_sc(
    reference: Dataset, image: XrayImage, result: Result, card: Mapping[str, Any]
) -> SCImage:
    """Build the RGB heatmap SC for ``result`` over ``image`` in the source study.

    ``reference`` is the cleaned source header (:func:`dicom_node.outputs.common.clean_reference`).
    ``result.heatmap`` must be set and have the shape of ``image.pixels``; without a heatmap the greyscale
    radiograph with the caption is rendered (callers normally skip the SC then).
    """
    check_card(card)
    if not isinstance(image, XrayImage) or not isinstance(image.pixels, np.ndarray) or image.pixels.ndim != 2:
        raise TypeError('Argument "image" must be an XrayImage with 2-D pixels.')
    if not isinstance(result, Result):
        raise TypeError('Argument "result" must be an inference.types.Result.')
    if result.heatmap is not None and result.heatmap.shape != image.pixels.shape:
        raise ValueError(f'Argument "result" has a heatmap of shape {result.heatmap.shape}, '
                         f'the image is {image.pixels.shape}.')

    shape, scale = output_shape(image.pixels.shape)
    if result.heatmap is not None:
        rgb = overlay(image.pixels, result.heatmap, shape)
    else:
        rgb = greyscale_rgb(image.pixels, shape)
    turned = str(image.meta.get("source_orientation") or "")
    steps = conventional_steps(turned) if turned else None
    lines = caption_lines(result, card)
    if steps is not None:
        lines.append(f"Turned to L\\F as chest films are read; stored {turned}")
    rgb, _ = add_caption(rgb, lines, NOT_FOR_DIAGNOSTIC_USE)
    spacing = _spacing(reference, scale, transposed=steps is not None and steps[0])
    orientation = _FRONTAL_ORIENTATION if steps is not None else _orientation(reference)

    sc = SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=rgb,
        photometric_interpretation=PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=derived_uid(reference, card, "sc-series"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=derived_uid(reference, card, "sc-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        pixel_spacing=spacing,  # type: ignore[arg-type]  # highdicom annotates int; mm values are float
        patient_orientation=orientation or _FRONTAL_ORIENTATION,  # highdicom needs one; emptied below
        series_description=series_description(SC_SERIES_DESCRIPTION, reference),
        manufacturer_model_name=model_label(card)[:64],
        software_versions=software_versions(card),
        contributing_equipment=[node_equipment(card, "Grad-CAM heatmap overlay")],
    )
    if orientation is None:  # not stated by the source: Type 2, empty rather than invented
        sc.add_new("PatientOrientation", "CS", None)
    copy_patient_study(reference, sc)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"  # made on a workstation (PS3.3 C.8.6.1), not captured from a video interface
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.LossyImageCompression = "00"
    if str(reference.get("LossyImageCompression", "")) == "01":  # once lossy, never reset (C.7.6.1.1.5)
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if reference.get(keyword):
                sc[keyword] = copy.deepcopy(reference[keyword])
    if reference.get("BodyPartExamined"):
        sc.BodyPartExamined = reference.BodyPartExamined
    else:
        sc.add_new("Laterality", "CS", None)  # Type 2C: required (empty = unknown) without a body part
    if reference.get("ImageLaterality"):
        sc.ImageLaterality = reference.ImageLaterality
    source_item = Dataset()
    source_item.ReferencedSOPClassUID = reference.SOPClassUID
    source_item.ReferencedSOPInstanceUID = reference.SOPInstanceUID
    source_item.PurposeOfReferenceCodeSequence = [
        CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)]
    sc.SourceImageSequence = [source_item]
    sc.DerivationDescription = (
        f"Grad-CAM heatmap of {model_label(card)} alpha-blended over the source radiograph"
        + (f", downsampled by {scale:.3f}" if scale < 1.0 else "")
        + (f", turned from the stored orientation {turned} to L\\F" if steps is not None else "")
        + "; caption burned in.")[:1024]
    sc.DerivationCodeSequence = [CodedConcept.from_code(codes.DCM.Saliency)]
    logger.debug("SC built", extra={"action": "sc_built", "rows": sc.Rows, "columns": sc.Columns})
    return sc
