"""What the SR and the heatmap SC share: the node's identity, codes, UIDs, a clean copy of the source header.

Codes used in the node's outputs
--------------------------------
Standard codes come from ``pydicom.sr.codedict.codes`` where one exists; the private coding scheme
``99CXRNODE`` (declared in each SR's CodingSchemeIdentificationSequence) is used only for concepts that
have no standard code.

===========================================  ==========  ===========  ========================================
Concept                                      Scheme      Value        Where
===========================================  ==========  ===========  ========================================
Imaging Measurement Report (title)           DCM         126000       SR root container (TID 1500)
Chest imaging (procedure reported)           SCT         413815006    SR, TID 1500 row 6
Disease caused by SARS-CoV-2 (COVID-19)      SCT         840539006    measurement group finding type
Lung (finding site)                          SCT         39607008     measurement group finding site
COVID-19 pneumonia suspected                 99CXRNODE   CXR001       qualitative evaluation (name)
Yes / No                                     SCT         373066001 /  its value when assessed
                                                         373067005
Undetermined                                 SCT         373068000    its value when not assessable
Not assessable reason                        99CXRNODE   CXR002       qualitative evaluation (name)
not_xray, for_processing, not_chest, child,  99CXRNODE   (same)       its value (the pipeline's reason code)
lateral, too_small, no_lungs, undecodable,
other
Comment (reason as text)                     DCM         121106       TEXT item in the measurement group
Qualitative Evaluations                      UMLS        C0034375     SR root container: the disclaimer
Comment (NOT FOR DIAGNOSTIC USE)             DCM         121106       TEXT item in that container
Probability                                  DCM         122157       measurement, unit UCUM ``1`` (no units)
Threshold Value (operating threshold)        DCM         122411       measurement, unit UCUM ``1``
Lung attention ratio                         99CXRNODE   CXR003       measurement, unit UCUM ``{ratio}``
Lung area fraction                           99CXRNODE   CXR004       measurement, unit UCUM ``{ratio}``
Processing Equipment                         DCM         109102       ContributingEquipmentSequence purpose
Source image for image processing operation  DCM         121322       SC SourceImageSequence purpose
Saliency (heatmap derivation)                DCM         130404       SC DerivationCodeSequence
===========================================  ==========  ===========  ========================================
"""

from __future__ import annotations

import copy
import datetime
import logging
import re
import uuid
from collections.abc import Mapping
from typing import Any

from highdicom import ContributingEquipment
from pydicom import Dataset, config
from pydicom.datadict import dictionary_VM, dictionary_VR
from pydicom.errors import BytesLengthException
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, JPEGBaseline8Bit, JPEGExtended12Bit
from pydicom.valuerep import DT, validate_value

from dicom_node import __version__

logger = logging.getLogger(__name__)

MANUFACTURER = "cxr-node"
CODING_SCHEME = "99CXRNODE"
CODING_SCHEME_NAME = "cxr-node private codes"
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
DISCLAIMER = (f"{NOT_FOR_DIAGNOSTIC_USE}. Research software, not a medical device: this result comes from "
              "an AI model trained on public research data and has not been verified by a physician.")
SR_SERIES_DESCRIPTION = "cxr-node AI result (not for diagnostic use)"
SC_SERIES_DESCRIPTION = "cxr-node heatmap (not for diagnostic use)"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902

CODE_SUSPECTED = Code("CXR001", CODING_SCHEME, "COVID-19 pneumonia suspected")
CODE_REASON = Code("CXR002", CODING_SCHEME, "Not assessable reason")
CODE_LUNG_ATTENTION = Code("CXR003", CODING_SCHEME, "Lung attention ratio")
CODE_LUNG_FRACTION = Code("CXR004", CODING_SCHEME, "Lung area fraction")
CODE_COVID19 = Code("840539006", "SCT", "Disease caused by SARS-CoV-2")
CODE_QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 13
REASON_CODES: dict[str, Code] = {
    "not_xray": Code("not_xray", CODING_SCHEME, "Not a CR or DX radiograph"),
    "for_processing": Code("for_processing", CODING_SCHEME, "Raw image (DX For Processing)"),
    "not_chest": Code("not_chest", CODING_SCHEME, "Not a chest radiograph"),
    "child": Code("child", CODING_SCHEME, "Patient younger than the model's population"),
    "lateral": Code("lateral", CODING_SCHEME, "Lateral view"),
    "too_small": Code("too_small", CODING_SCHEME, "Image too small"),
    "no_lungs": Code("no_lungs", CODING_SCHEME, "No plausible pair of lungs found"),
    "undecodable": Code("undecodable", CODING_SCHEME, "Image could not be decoded"),
    "other": Code("other", CODING_SCHEME, "Other reason"),
}
FINDING_VALUES: dict[str, Code] = {
    "positive": codes.SCT.Yes,
    "negative": codes.SCT.No,
    "not_assessable": codes.SCT.Undetermined,
}

# Attributes carried from the source into the header the outputs are built from (patient, study, the
# source image's identity, and what the SC needs). Everything else in the source is ignored.
_REFERENCE_KEYWORDS = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "Modality", "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence", "PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientAge",
    "PatientSize", "PatientWeight", "EthnicGroup", "PatientComments", "StudyDate", "StudyTime",
    "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyID", "ReferringPhysicianName",
    "StudyDescription", "TimezoneOffsetFromUTC", "Manufacturer", "ManufacturerModelName", "SoftwareVersions",
    "DeviceSerialNumber", "InstitutionName", "InstitutionalDepartmentName", "StationName", "BodyPartExamined",
    "ViewPosition", "PatientOrientation", "ImageLaterality", "Laterality", "Rows", "Columns", "PixelSpacing",
    "ImagerPixelSpacing", "SeriesNumber", "InstanceNumber", "ContentDate", "ContentTime",
    "LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod",
)
# The patient's and the study's identity: each output carries exactly the cleaned source's values, so that a
# PACS files it with the study and matches the patient (an issuer of patient ID included).
PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence", "PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientAge",
    "PatientSize", "PatientWeight", "EthnicGroup", "PatientComments", "StudyDate", "StudyTime",
    "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyID", "ReferringPhysicianName",
    "StudyDescription",
)
# Always lossy transfer syntaxes: an image received in one is marked lossy even without the attribute.
_LOSSY_SYNTAXES = {JPEGBaseline8Bit, JPEGExtended12Bit}
_TYPE1 = {"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns"}
_TYPE2 = {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "AccessionNumber", "StudyID", "ReferringPhysicianName", "Manufacturer"}
_MAX_LENGTH = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "ST": 1024, "LT": 10240, "UC": None, "UT": None}
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://cxr-node/outputs")
_ENUMS = {"PatientSex": {"M", "F", "O"}}
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UT"}


def _valid(vr: str, value: Any) -> bool:
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    try:
        for v in values:
            validate_value(vr, v, config.RAISE)
    except ValueError:
        return False
    return True


def _shorten_name_group(group: str, limit: int = 64) -> str:
    """Cut the longest components of a PN component group until it fits ``limit`` characters."""
    parts = group.split("^")
    while len("^".join(parts)) > limit:
        longest = max(range(len(parts)), key=lambda i: len(parts[i]))
        excess = len("^".join(parts)) - limit
        parts[longest] = parts[longest][: max(0, len(parts[longest]) - excess)]
    return "^".join(parts)


def _repair(keyword: str, vr: str, value: Any) -> Any:
    """A valid replacement for an invalid ``value``, or None to drop (Type 3) / empty (Type 2) it."""
    if vr == "PN":
        fixed = "=".join(_shorten_name_group(group) for group in str(value).split("="))
        return fixed if _valid(vr, fixed) else None
    if vr in ("DA", "TM") and isinstance(value, str):  # 1970-01-01, 2020/01/01, 10:30:00: separators dropped
        fixed = re.sub(r"[^0-9.]" if vr == "TM" else r"[^0-9]", "", value)
        return fixed if fixed and _valid(vr, fixed) else None
    if vr == "CS" and isinstance(value, str):
        fixed = re.sub(r"[^A-Z0-9 _]", "_", value.strip().upper())[:16]
        return fixed if fixed and _valid(vr, fixed) else None
    limit = _MAX_LENGTH.get(vr)
    if limit and isinstance(value, str):
        fixed = value[:limit].rstrip()
        return fixed if _valid(vr, fixed) else None
    return None


def clean_reference(source: Dataset, own_texts: tuple[str, ...] = ()) -> Dataset:
    """A header-only copy of ``source`` holding the attributes the outputs copy, each one valid.

    Real PACS data carries invalid optional values (over-long names, dates with dashes, codes in lower
    case); copied verbatim they would make the node's own objects invalid. Over-long strings and name
    components are truncated, code strings upper-cased, other invalid Type 2 values emptied and invalid
    Type 3 values dropped. Text is re-encoded in the simplest character set that holds it and the node's own
    ``own_texts`` that the outputs will carry (the model's name, a reason).

    Raises
    ------
    ValueError
        ``source`` lacks a Type 1 identity attribute (SOP Class/Instance UID, Study/Series UID, Rows,
        Columns) or one of them is invalid.
    """
    if not isinstance(source, Dataset):
        raise TypeError('Argument "source" must be a pydicom Dataset.')
    ref = Dataset()
    texts = list(own_texts)
    for keyword in _REFERENCE_KEYWORDS:
        if keyword not in source:
            if keyword in _TYPE1:
                raise ValueError(f'Argument "source" lacks the attribute {keyword}.')
            continue
        if keyword == "SpecificCharacterSet":
            continue  # chosen below for the values actually copied
        elem = source[keyword]
        value, vr = elem.value, elem.VR
        if vr == "SQ":  # its text decides the character set too (read first: that decodes it)
            texts.extend(_sequence_texts(value or []))
            ref.add_new(elem.tag, vr, copy.deepcopy(value))
            continue
        if isinstance(value, MultiValue) and dictionary_VM(keyword) == "1":
            # one value allowed: the first is the one a PACS matches on; highdicom refuses two names
            value = value[0] if len(value) else None
            logger.info("invalid source attribute repaired", extra={
                "action": "source_attribute_repaired", "attribute": keyword, "repair": "first value kept"})
        if vr in _TEXT_VRS and value is not None:
            value = [str(v) for v in value] if isinstance(value, MultiValue) else str(value)
            texts.extend(value if isinstance(value, list) else [value])
        if value is None or value == "":
            ref.add_new(elem.tag, vr, value)
            continue
        ok = _valid(vr, value) and value not in ("",) and (
            keyword not in _ENUMS or str(value) in _ENUMS[keyword])
        if not ok:
            if keyword in _TYPE1:
                raise ValueError(f'Argument "source" has an invalid {keyword}: {str(value)[:80]!r}.')
            if keyword in _ENUMS:  # m -> M; anything else is emptied
                value = str(value).strip().upper()
                value = value if value in _ENUMS[keyword] else None
            else:
                value = _repair(keyword, vr, value)
            logger.info("invalid source attribute repaired", extra={
                "action": "source_attribute_repaired", "attribute": keyword,
                "repair": "emptied" if value is None and keyword in _TYPE2 else
                "dropped" if value is None else "corrected"})
            if value is None and keyword not in _TYPE2:
                continue
        ref.add_new(elem.tag, vr, value)
    for keyword in _TYPE2:
        if keyword not in ref:
            ref.add_new(keyword, dictionary_VR(keyword), None)
    file_meta = getattr(source, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if "LossyImageCompression" not in ref and syntax in _LOSSY_SYNTAXES:
        ref.LossyImageCompression = "01"  # received lossy-compressed: the outputs' pixels derive from it
    charset = character_set(texts)
    if charset:
        ref.SpecificCharacterSet = charset
    return ref


def series_description(base: str, reference: Dataset) -> str:
    """``base``, followed by the source image's series and instance numbers when it has them: the results of
    several images of one study (or of one image by two models) are told apart in the viewer's series list."""
    series, instance = element_text(reference, "SeriesNumber"), element_text(reference, "InstanceNumber")
    if series and instance:
        base += f", series {series} image {instance}"
    return base[:64]


def copy_patient_study(reference: Dataset, output: Dataset) -> None:
    """Give ``output`` the patient and study attributes of ``reference`` (the cleaned source) exactly, and
    the source's Timezone Offset From UTC with the output's own dates and times expressed in it."""
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in reference:
            output[keyword] = copy.deepcopy(reference[keyword])
        elif keyword in output and keyword not in _TYPE2:
            del output[keyword]
    offset = str(reference.get("TimezoneOffsetFromUTC") or "")
    match = re.fullmatch(r"([+-])(\d\d)(\d\d)", offset)
    hours, minutes = (int(match.group(2)), int(match.group(3))) if match else (99, 99)
    if hours > 14 or minutes > 59:  # absent or invalid (PS3.3 C.12.1.1.8: -1200 to +1400)
        return  # the node's local time, as the source's own times presumably are
    sign = -1 if match and match.group(1) == "-" else 1
    zone = datetime.timezone(sign * datetime.timedelta(hours=hours, minutes=minutes))
    now = datetime.datetime.now(zone)
    output.TimezoneOffsetFromUTC = offset  # it covers every date and time of the object: all of ours follow
    for date, time in (("ContentDate", "ContentTime"), ("InstanceCreationDate", "InstanceCreationTime"),
                       ("DateOfSecondaryCapture", "TimeOfSecondaryCapture")):
        if date in output:
            output[date].value = now.strftime("%Y%m%d")
            output[time].value = now.strftime("%H%M%S.%f")
    for item in output.get("ContributingEquipmentSequence") or []:
        stamp = item.get("ContributionDateTime")
        if stamp:  # the same instant in that offset (highdicom writes its own entry in the node's local time)
            when = DT(str(stamp))
            when = when if when.tzinfo is not None else when.astimezone()
            item.ContributionDateTime = when.astimezone(zone).strftime("%Y%m%d%H%M%S.%f%z")


def _sequence_texts(items: Any) -> list[str]:
    """The text values inside sequence items, nested ones included."""
    out: list[str] = []
    for item in items:
        for elem in item:
            if elem.VR == "SQ":
                out.extend(_sequence_texts(elem.value or []))
            elif elem.VR in _TEXT_VRS and elem.value is not None:
                values = elem.value if isinstance(elem.value, MultiValue | list) else [elem.value]
                out.extend(str(v) for v in values)
    return out


def character_set(texts: list[str]) -> str | None:
    """The simplest Specific Character Set that encodes all ``texts``: None (ASCII), Latin-1, UTF-8.

    The outputs are re-encoded rather than copying the source's declaration: Latin-1 where it suffices
    is what most PACS and dcmtk's checkers handle best.
    """
    joined = "".join(texts)
    if joined.isascii():
        return None
    try:
        joined.encode("latin-1")
    except UnicodeEncodeError:
        return "ISO_IR 192"
    return "ISO_IR 100"


def derived_uid(source: Dataset, card: Mapping[str, Any], purpose: str) -> UID:
    """A UID that depends only on the source instance, the model version and ``purpose``.

    Building the outputs twice for the same job (a retried export) gives the same UIDs, so a PACS sees
    a re-send, not a second result.
    """
    name = "|".join([str(source.SOPInstanceUID), str(card.get("name", "")), str(card.get("version", "")),
                     str(card.get("device_uid", "")), purpose])
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}")


def node_equipment(card: Mapping[str, Any], description: str) -> ContributingEquipment:
    """The node as processing equipment (IHE AI Results): manufacturer, model, software versions.

    The bundle's device UID is not repeated here (no such attribute in the Contributing Equipment
    macro); the SR carries it as the device observer UID.
    """
    return ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model_label(card)[:64],
        software_versions=software_versions(card),
        contribution_datetime=datetime.datetime.now().astimezone(),  # with its UTC offset: never ambiguous
        contribution_description=description[:64],
    )


def software_versions(card: Mapping[str, Any]) -> list[str]:
    """SoftwareVersions of the node's objects: the node's version and the model bundle's version."""
    return [f"cxr-node {__version__}"[:64], f"model {card['version']}"[:64]]


def model_label(card: Mapping[str, Any]) -> str:
    """``"<name> <version>"`` of the model bundle."""
    return f"{card['name']} {card['version']}"


def check_card(card: Mapping[str, Any]) -> None:
    """Validate the parts of the model card the outputs use, naming the problem."""
    if not isinstance(card, Mapping):
        raise TypeError('Argument "card" must be a mapping (the bundle\'s model.json).')
    for key in ("name", "version", "device_uid"):
        if not isinstance(card.get(key), str) or not card[key].strip():
            raise ValueError(f'Argument "card" must have a non-empty string "{key}".')
    if not _valid("UI", card["device_uid"]):
        raise ValueError('Argument "card" has an invalid "device_uid" (not a DICOM UID).')


def element_text(ds: Dataset, keyword: str) -> str:
    """The value of ``keyword`` in ``ds`` as text, '' when absent or unreadable."""
    try:
        value = ds.get(keyword)
    # NotImplementedError / BytesLengthException: an element of unknown VR or wrong length (a damaged file)
    except (ValueError, TypeError, KeyError, NotImplementedError, BytesLengthException):
        return ""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def pixel_spacing(reference: Dataset, keywords: tuple[str, ...] = ("PixelSpacing", "ImagerPixelSpacing")
                  ) -> tuple[float, float] | None:
    """The source pixel spacing in mm (the first of ``keywords`` present: PixelSpacing, in the patient, else
    ImagerPixelSpacing, at the detector); None if absent or not > 0."""
    for keyword in keywords:
        value = reference.get(keyword)
        try:
            if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
                return float(value[0]), float(value[1])
        except (TypeError, ValueError):
            continue
    return None
