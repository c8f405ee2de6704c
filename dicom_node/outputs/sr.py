"""The result as a TID 1500 Measurement Report (Comprehensive 3D SR, or Comprehensive SR as a fallback).

One measurement group (TID 1501) holds the whole result: finding type COVID-19 (SCT 840539006), finding
site lung, the algorithm (TID 4019: model name and version, operating threshold as a parameter), the
source image, the qualitative evaluation "COVID-19 pneumonia suspected" (Yes / No / Undetermined), the
probability, the operating threshold, the lung attention ratio and the lung area fraction as
measurements, and, when not assessable, the reason (coded and as text). The observer is the node as a
device (TID 1004, the bundle's device UID). The codes are listed in :mod:`dicom_node.outputs.common`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    ComprehensiveSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    ImageContentItem,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
    ValueTypeValues,
)
from highdicom.sr.utils import find_content_items
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, ComprehensiveSRStorage

from dicom_node.outputs.common import (
    CODE_COVID19,
    CODE_LUNG_ATTENTION,
    CODE_LUNG_FRACTION,
    CODE_QUALITATIVE_EVALUATIONS,
    CODE_REASON,
    CODE_SUSPECTED,
    CODING_SCHEME,
    CODING_SCHEME_NAME,
    DISCLAIMER,
    FINDING_VALUES,
    MANUFACTURER,
    REASON_CODES,
    SR_SERIES_DESCRIPTION,
    SR_SERIES_NUMBER,
    check_card,
    copy_patient_study,
    derived_uid,
    model_label,
    node_equipment,
    pixel_spacing,
    series_description,
    software_versions,
)
from inference.types import Result

logger = logging.getLogger(__name__)

SR_CLASSES = {"comprehensive3d": Comprehensive3DSR, "comprehensive": ComprehensiveSR}
_TRACKING_LABEL = "COVID-19 pneumonia assessment"


def _measurement(name: Any, value: float, unit: Any) -> Measurement:
    return Measurement(name=name, value=float(value), unit=unit)


def _header(ds: Dataset) -> Dataset:
    """``ds`` without its pixel data (evidence and image library need only the header)."""
    out = Dataset()
    for elem in ds:
        if elem.keyword != "PixelData":
            out.add(elem)
    return out


def _library_view(reference: Dataset) -> Dataset:
    """The source as highdicom's image library should see it.

    The projection radiography descriptors (TID 1603) need a two-value PatientOrientation and a pixel
    spacing; a source without them gets only the generic descriptors (modality from the SOP class, rows,
    columns) instead of invented values.
    """
    view = Dataset()
    view.update(reference)
    orientation = reference.get("PatientOrientation")
    spacing = pixel_spacing(reference)
    if orientation is not None and len(orientation) == 2 and spacing is not None:
        view.ImagerPixelSpacing = list(spacing)
    else:
        view.Modality = "OT"  # read only by highdicom to pick the descriptor set; never written out
    return view


def _check_result(result: Result) -> None:
    if not isinstance(result, Result):
        raise TypeError('Argument "result" must be an inference.types.Result.')
    if result.finding not in FINDING_VALUES:
        raise ValueError(f'Argument "result" has an unknown finding {result.finding!r}.')
    if result.finding != "not_assessable" and result.probability is None:
        raise ValueError('Argument "result" must carry a probability unless not assessable.')
    for name in ("probability", "threshold", "lung_attention", "lung_fraction"):
        value = getattr(result, name)
        if value is not None and not 0.0 <= float(value) <= 1.0:
            raise ValueError(f'Argument "result" has {name}={value!r}, outside [0, 1].')


def build_sr(
    reference: Dataset,
    result: Result,
    card: Mapping[str, Any],
    *,
    heatmap: Dataset | None = None,
    sop_class: Literal["comprehensive3d", "comprehensive"] = "comprehensive3d",
) -> hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR:
    """Build the SR for ``result`` on the source image described by ``reference``.

    ``reference`` is the source header as :func:`dicom_node.outputs.common.clean_reference` returns it
    (patient and study are copied from it). ``heatmap``, when given, is referenced from the SR's image
    library and evidence. The SR is COMPLETE and UNVERIFIED; its UIDs depend only on the source and the
    model, so a rebuild gives the same object identity.
    """
    check_card(card)
    _check_result(result)
    if sop_class not in SR_CLASSES:
        raise ValueError(f'Argument "sop_class" must be one of {sorted(SR_CLASSES)}, not {sop_class!r}.')

    algorithm = AlgorithmIdentification(
        name=str(card["name"])[:64], version=str(card["version"])[:64],
        parameters=[f"threshold={result.threshold:.4f}"], manufacturer=MANUFACTURER)
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=str(card["device_uid"]), name=MANUFACTURER, manufacturer_name=MANUFACTURER,
            model_name=model_label(card)[:64]))

    evaluations = [QualitativeEvaluation(CODE_SUSPECTED, FINDING_VALUES[result.finding])]
    if result.finding == "not_assessable" and result.reason_code:
        evaluations.append(QualitativeEvaluation(
            CODE_REASON, REASON_CODES.get(result.reason_code, REASON_CODES["other"])))
    measurements = []
    if result.probability is not None:
        measurements.append(_measurement(codes.DCM.Probability, result.probability, codes.UCUM.NoUnits))
    measurements.append(_measurement(codes.DCM.ThresholdValue, result.threshold, codes.UCUM.NoUnits))
    if result.lung_attention is not None:
        measurements.append(_measurement(CODE_LUNG_ATTENTION, result.lung_attention, codes.UCUM.Ratio))
    if result.lung_fraction is not None:
        measurements.append(_measurement(CODE_LUNG_FRACTION, result.lung_fraction, codes.UCUM.Ratio))

    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derived_uid(reference, card, "sr-tracking"), identifier=_TRACKING_LABEL),
        finding_type=CODE_COVID19,
        finding_sites=[FindingSite(anatomic_location=codes.SCT.Lung)],
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[SourceImageForMeasurementGroup.from_source_image(reference)],
    )
    container = group[0]
    if result.finding == "not_assessable" and result.reason:
        container.ContentSequence.append(TextContentItem(
            name=codes.DCM.Comment, value=result.reason[:1024],
            relationship_type=RelationshipTypeValues.CONTAINS))
    if heatmap is not None:
        container.ContentSequence.append(ImageContentItem(
            name=codes.DCM.Saliency,
            referenced_sop_class_uid=heatmap.SOPClassUID,
            referenced_sop_instance_uid=heatmap.SOPInstanceUID,
            relationship_type=RelationshipTypeValues.CONTAINS))

    library = [reference] + ([_header(heatmap)] if heatmap is not None else [])
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ChestImaging,
        imaging_measurements=[group],
        referenced_images=[_library_view(reference)] + library[1:],
    )
    # in the report's body too, where a viewer shows the content (the series description is easy to miss):
    # TID 1500's Qualitative Evaluations container, the one place at the top of the report that takes text
    evaluations_container = ContainerContentItem(name=CODE_QUALITATIVE_EVALUATIONS,
                                                 relationship_type=RelationshipTypeValues.CONTAINS)
    evaluations_container.ContentSequence = ContentSequence([TextContentItem(
        name=codes.DCM.Comment, value=DISCLAIMER, relationship_type=RelationshipTypeValues.CONTAINS)])
    report[0].ContentSequence.append(evaluations_container)
    sr = SR_CLASSES[sop_class](
        evidence=library,
        content=report,
        series_instance_uid=derived_uid(reference, card, f"sr-series-{sop_class}"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(reference, card, f"sr-instance-{sop_class}"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description(SR_SERIES_DESCRIPTION, reference),
        contributing_equipment=[node_equipment(card, "AI result (TID 1500)")],
        coding_schemes=[CodingSchemeIdentificationItem(
            designator=CODING_SCHEME, name=CODING_SCHEME_NAME)],
    )
    sr.ManufacturerModelName = model_label(card)[:64]
    sr.SoftwareVersions = software_versions(card)
    copy_patient_study(reference, sr)
    logger.debug("SR built", extra={"action": "sr_built", "finding": result.finding})
    return sr


def _code_value(concept: Any) -> tuple[str, str]:
    if not isinstance(concept, CodedConcept):
        concept = CodedConcept.from_dataset(concept)
    return str(concept.value), str(concept.scheme_designator)


def _text(root: Dataset, name: Any) -> str:
    items = find_content_items(root, name=name, value_type=ValueTypeValues.TEXT, recursive=True)
    return str(items[0].TextValue) if items else ""


def read_result(sr: Dataset) -> dict[str, Any]:
    """Parse an SR made by :func:`build_sr` back into plain values (with highdicom's TID 1500 reader).

    Returns a dict with ``finding`` (positive / negative / not_assessable), ``probability``,
    ``threshold``, ``lung_attention``, ``lung_fraction`` (floats, None when absent), ``model_name``,
    ``model_version``, ``reason`` and ``reason_code`` (strings, '' when absent).

    Raises
    ------
    ValueError
        ``sr`` is not a Comprehensive (3D) SR holding a COVID-19 measurement group.
    """
    if not isinstance(sr, Dataset):
        raise TypeError('Argument "sr" must be a pydicom Dataset.')
    uid = str(sr.get("SOPClassUID", ""))
    readers: dict[str, type[Comprehensive3DSR] | type[ComprehensiveSR]] = {
        str(Comprehensive3DSRStorage): Comprehensive3DSR, str(ComprehensiveSRStorage): ComprehensiveSR}
    if uid not in readers:
        raise ValueError(f'Argument "sr" is not a Comprehensive (3D) SR (SOP Class {uid!r}).')
    doc = readers[uid].from_dataset(sr, copy=True)
    if not isinstance(doc.content, MeasurementReport):
        raise ValueError('Argument "sr" is not a TID 1500 Measurement Report.')
    groups = doc.content.get_image_measurement_groups(finding_type=CODE_COVID19)
    if not groups:
        raise ValueError('Argument "sr" holds no COVID-19 measurement group.')
    group = groups[0]
    out: dict[str, Any] = {"finding": "", "probability": None, "threshold": None, "lung_attention": None,
                           "lung_fraction": None, "model_name": "", "model_version": "", "reason": "",
                           "reason_code": ""}
    findings = {(c.value, c.scheme_designator): f for f, c in FINDING_VALUES.items()}
    for evaluation in group.get_qualitative_evaluations():
        key = _code_value(evaluation.name)
        if key == (CODE_SUSPECTED.value, CODING_SCHEME):
            out["finding"] = findings.get(_code_value(evaluation.value), "")
        elif key == (CODE_REASON.value, CODING_SCHEME):
            out["reason_code"] = _code_value(evaluation.value)[0]
    fields = {(codes.DCM.Probability.value, "DCM"): "probability",
              (codes.DCM.ThresholdValue.value, "DCM"): "threshold",
              (CODE_LUNG_ATTENTION.value, CODING_SCHEME): "lung_attention",
              (CODE_LUNG_FRACTION.value, CODING_SCHEME): "lung_fraction"}
    for measurement in group.get_measurements():
        field = fields.get(_code_value(measurement.name))
        if field:
            out[field] = float(measurement.value)
    root = group[0]
    out["model_name"] = _text(root, codes.DCM.AlgorithmName)
    out["model_version"] = _text(root, codes.DCM.AlgorithmVersion)
    comments = find_content_items(root, name=codes.DCM.Comment, value_type=ValueTypeValues.TEXT)
    out["reason"] = str(comments[0].TextValue) if comments else ""
    return out
