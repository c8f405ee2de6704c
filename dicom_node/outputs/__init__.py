"""DICOM outputs of the node, built with highdicom only.

``build_outputs`` turns one :class:`inference.types.Result` into what goes back to the PACS: an RGB
heatmap Secondary Capture (:mod:`.sc`) and a TID 1500 Measurement Report SR (:mod:`.sr`) that references
it, both in the source study, each in a new series. ``is_own_output`` recognises these objects when they
come back to the listener (no loops); ``read_result`` parses an SR back. Codes: :mod:`.common`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pydicom import Dataset
from pydicom.errors import BytesLengthException
from pydicom.uid import Comprehensive3DSRStorage, ComprehensiveSRStorage, SecondaryCaptureImageStorage

from dicom_node.config import ExportSettings
from dicom_node.outputs.common import (
    CODING_SCHEME,
    MANUFACTURER,
    SC_SERIES_DESCRIPTION,
    SR_SERIES_DESCRIPTION,
    check_card,
    clean_reference,
    element_text,
)
from dicom_node.outputs.sc import build_heatmap_sc
from dicom_node.outputs.sr import build_sr, read_result
from inference.types import Result, XrayImage

logger = logging.getLogger(__name__)

__all__ = ["build_outputs", "build_sr", "build_heatmap_sc", "is_own_output", "read_result", "clean_reference"]

_OWN_SOP_CLASSES = {
    str(Comprehensive3DSRStorage), str(ComprehensiveSRStorage), str(SecondaryCaptureImageStorage)}


def build_outputs(
    source: Dataset,
    image: XrayImage,
    result: Result,
    card: Mapping[str, Any],
    export_settings: ExportSettings,
) -> list[Dataset]:
    """Build the objects to send back for one source instance: ``[heatmap SC, SR]`` (SC first).

    The SR references the SC. Only the SR is built when the result has no heatmap (not assessable) or
    when ``export_settings.send_heatmap`` is false. ``export_settings.sr_sop_class`` picks Comprehensive
    3D SR (default) or Comprehensive SR. Invalid optional values of the source's header are repaired in
    the copies (see :func:`dicom_node.outputs.common.clean_reference`); the source is not modified.
    The UIDs of the outputs depend only on the source instance and the model, so building twice for the
    same job gives the same instances.

    Raises
    ------
    TypeError, ValueError
        An argument is of the wrong type or inconsistent; the message names it.
    """
    if not isinstance(source, Dataset):
        raise TypeError('Argument "source" must be a pydicom Dataset.')
    if not isinstance(export_settings, ExportSettings):
        raise TypeError('Argument "export_settings" must be dicom_node.config.ExportSettings.')
    check_card(card)
    # the node's own text decides the character set too (a locally trained model may have a non-ASCII name)
    reference = clean_reference(source, (str(card["name"]), str(card["version"]),
                                         str(getattr(result, "reason", "") or "")))
    outputs: list[Dataset] = []
    heatmap_sc = None
    if result.heatmap is not None and export_settings.send_heatmap:
        heatmap_sc = build_heatmap_sc(reference, image, result, card)
        outputs.append(heatmap_sc)
    outputs.append(build_sr(reference, result, card, heatmap=heatmap_sc,
                            sop_class=export_settings.sr_sop_class))
    logger.info("outputs built", extra={
        "action": "outputs_built", "finding": result.finding, "objects": len(outputs)})
    return outputs


def _has_own_equipment(ds: Dataset) -> bool:
    try:
        items = ds.get("ContributingEquipmentSequence") or []
        return any(str(item.get("Manufacturer", "")) == MANUFACTURER for item in items)
    except (TypeError, ValueError, AttributeError, NotImplementedError, BytesLengthException):
        return False


def _has_own_codes(ds: Dataset) -> bool:
    try:
        items = ds.get("CodingSchemeIdentificationSequence") or []
        return any(str(item.get("CodingSchemeDesignator", "")) == CODING_SCHEME for item in items)
    except (TypeError, ValueError, AttributeError, NotImplementedError, BytesLengthException):
        return False


def is_own_output(ds: Dataset) -> bool:
    """True when ``ds`` is an SR or SC this node produced (so the listener must not process it again).

    Looks at the SOP class, then at any of: Manufacturer "cxr-node", the node as contributing
    equipment, the node's private coding scheme, or the node's series descriptions. Missing or
    unreadable attributes count as "not ours"; never raises for a Dataset.
    """
    if not isinstance(ds, Dataset):
        raise TypeError('Argument "ds" must be a pydicom Dataset.')
    if element_text(ds, "SOPClassUID") not in _OWN_SOP_CLASSES:
        return False
    return (
        element_text(ds, "Manufacturer") == MANUFACTURER
        or element_text(ds, "SeriesDescription").startswith((SR_SERIES_DESCRIPTION, SC_SERIES_DESCRIPTION))
        or _has_own_equipment(ds)
        or _has_own_codes(ds)
    )
