"""The node's SR and SC checked by real validators: dicom3tools ``dciodvfy`` and dcmtk ``dsrdump``.

Every object goes through bytes first. A pass means: no ``Error`` line from dciodvfy (its only warnings
allowed are about our private coding scheme, which it cannot know) and no warning or error from dsrdump.
"""

from __future__ import annotations

import copy

import pytest
from pydicom import Dataset
from pydicom.uid import Comprehensive3DSRStorage, ComprehensiveSRStorage, SecondaryCaptureImageStorage

from dicom_node.config import ExportSettings
from dicom_node.outputs import build_outputs, clean_reference, read_result
from tests.fixtures.validators import (
    CARD,
    DSRDUMP_CHARSET_NOTICE,
    Validation,
    output_inputs,
    received,
    run_dciodvfy,
    run_dsrdump,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:.*(exceeds the maximum|Invalid value for VR):UserWarning"),
]

def _item(**values: str) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


# Source headers with what real PACS data carries: invalid optional values, empty Type 2 values,
# non-ASCII text. Each is (make_dicom arguments, the source itself fails dciodvfy).
SOURCES = {
    "clean": ({}, False),
    "clean_dx_with_geometry": ({"modality": "DX", "PatientOrientation": ["L", "F"],
                                "ImagerPixelSpacing": [0.143, 0.143], "PixelSpacing": [0.143, 0.143]}, False),
    "too_long_name_component": ({"patient_name": "B" * 70 + "^Anna"}, True),
    "bad_dates_and_times": ({"PatientBirthDate": "1970-01-01", "StudyDate": "2020/01/01",
                             "StudyTime": "25:61"}, True),
    "empty_type2": ({"PatientID": "", "AccessionNumber": "", "ReferringPhysicianName": "", "StudyID": "",
                     "PatientSex": "", "StudyDate": "", "StudyTime": "", "PatientBirthDate": ""}, False),
    "latin1_names": ({"SpecificCharacterSet": "ISO_IR 100", "patient_name": "Müller^Jürgen",
                      "InstitutionName": "Klinikum Göttingen"}, False),
    "undeclared_latin1_bytes": ({"PatientName": b"M\xfcller^J\xfcrgen", "InstitutionName": b"G\xf6ttingen"},
                                False),
    "utf8_latin_names": ({"SpecificCharacterSet": "ISO_IR 192", "patient_name": "Åström^Zoë"}, False),
    "odd_codes_and_lengths": ({"PatientSex": "X", "body_part": "chest", "PatientAge": "45",
                               "StudyDescription": "x" * 80, "Manufacturer": "M" * 80}, True),
    "no_body_part": ({"body_part": ""}, False),
    "stored_mirrored_dx": ({"modality": "DX", "PatientOrientation": ["R", "H"],
                            "ImagerPixelSpacing": [0.143, 0.143]}, False),
    "multi_valued": ({"PatientName": ["Doe^Jane", "Roe^Jane"], "PatientID": ["ID-1", "ID-2"],
                      "ReferringPhysicianName": ["Who^Dr", "Else^Dr"], "AccessionNumber": ["A1", "A2"],
                      "StudyID": ["S1", "S2"], "StudyDescription": ["XR CHEST", "PA"]}, True),
    "identity_sequences_zone_lossy": ({
        "IssuerOfPatientID": "HOSP-A", "PatientBirthTime": "081500", "TimezoneOffsetFromUTC": "+0100",
        "IssuerOfPatientIDQualifiersSequence": [_item(UniversalEntityID="1.2.3.4",
                                                      UniversalEntityIDType="ISO")],
        "OtherPatientIDsSequence": [_item(PatientID="OTHER-7", IssuerOfPatientID="HOSP-B",
                                          TypeOfPatientID="TEXT")],
        "IssuerOfAccessionNumberSequence": [_item(LocalNamespaceEntityID="RIS-A")],
        "LossyImageCompression": "01", "LossyImageCompressionRatio": "12.5",
        "LossyImageCompressionMethod": "ISO_10918_1"}, False),
    "non_ascii_only_in_sequences": ({  # the top-level text is ASCII: the items' text decides the charset
        "SpecificCharacterSet": "ISO_IR 192",
        "OtherPatientIDsSequence": [_item(PatientID="Zoë-42", IssuerOfPatientID="Hôpital Érasme",
                                          TypeOfPatientID="TEXT")]}, False),
}
# Without BodyPartExamined the SC's Laterality (Type 2C) is sent empty, meaning "unknown", which is the
# truth; dciodvfy notes that an empty value is only for that case.
ALLOWED = {"no_body_part": ("attribute <Laterality>",)}


# the IOD name dciodvfy prints first (it did recognise the object)
_IODS = {str(SecondaryCaptureImageStorage): "SCImage", str(Comprehensive3DSRStorage): "Comprehensive3DSR",
         str(ComprehensiveSRStorage): "ComprehensiveSR"}


def _assert_valid(obj, check: Validation) -> None:
    assert check.returncode == 0 or check.tool == "dciodvfy", check.output
    assert check.errors == [], f"{check.tool} on {obj.SOPClassUID.name}:\n{check.output}"


def _dciodvfy_clean(obj, allowed: tuple[str, ...] = ()) -> None:
    check = run_dciodvfy(obj)
    assert _IODS[str(obj.SOPClassUID)] in [line.strip() for line in check.output.splitlines()], check.output
    _assert_valid(obj, check)
    unexpected = [w for w in check.warnings if not any(a in w for a in ("99CXRNODE", *allowed))]
    assert unexpected == [], check.output


def _dsrdump_clean(sr, allowed: tuple[str, ...] = ()) -> None:
    check = run_dsrdump(sr)
    _assert_valid(sr, check)
    assert "Completion Flag     : COMPLETE" in check.output
    assert [w for w in check.warnings if not any(a in w for a in allowed)] == [], check.output


@pytest.mark.parametrize("sop_class", ["comprehensive3d", "comprehensive"])
@pytest.mark.parametrize("finding", ["positive", "negative", "not_assessable"])
def test_outputs_pass_dciodvfy_and_dsrdump(finding: str, sop_class: str) -> None:
    source, image, result = output_inputs(finding)
    outputs = [received(o) for o in build_outputs(source, image, result, CARD,
                                                   ExportSettings(sr_sop_class=sop_class))]
    assert [o.Modality for o in outputs] == (["SR"] if finding == "not_assessable" else ["OT", "SR"])
    for obj in outputs:
        _dciodvfy_clean(obj)
    _dsrdump_clean(outputs[-1])
    assert read_result(outputs[-1])["finding"] == finding


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_outputs_stay_valid_when_the_source_is_not(name: str) -> None:
    extra, source_invalid = SOURCES[name]
    source, image, result = output_inputs("positive", **extra)
    if source_invalid:  # the case really exercises invalid input
        assert run_dciodvfy(source).errors, f"source case {name!r} was expected to fail dciodvfy"
    for sop_class in ("comprehensive3d", "comprehensive"):
        outputs = [received(o) for o in build_outputs(source, image, result, CARD,
                                                       ExportSettings(sr_sop_class=sop_class))]
        for obj in outputs:
            _dciodvfy_clean(obj, ALLOWED.get(name, ()))
        _dsrdump_clean(outputs[-1])
        assert read_result(outputs[-1])["probability"] == result.probability
    not_assessable = output_inputs("not_assessable", **extra)
    (sr,) = [received(o) for o in build_outputs(*not_assessable, CARD, ExportSettings())]
    _dciodvfy_clean(sr)
    _dsrdump_clean(sr)


def test_non_latin_names_valid_with_utf8() -> None:
    """Cyrillic needs UTF-8; dciodvfy is clean, dsrdump only says its VR checker skips that charset."""
    source, image, result = output_inputs("positive", SpecificCharacterSet="ISO_IR 192",
                                          patient_name="Иванов^Иван")
    sc, sr = (received(o) for o in build_outputs(source, image, result, CARD, ExportSettings()))
    _dciodvfy_clean(sc)
    _dciodvfy_clean(sr)
    _dsrdump_clean(sr, allowed=(DSRDUMP_CHARSET_NOTICE,))
    assert "Иванов^Иван" in run_dsrdump(sr).output


def test_a_model_with_a_non_ascii_name_gives_valid_objects() -> None:
    """The character set covers the node's own text too: a locally trained model named in French over an
    ASCII-only source wrote Latin-1 bytes under no declared character set."""
    card = {**CARD, "name": "cxr-modèle-local"}
    source, image, result = output_inputs("positive")
    assert "SpecificCharacterSet" not in clean_reference(source)  # the source's text alone is ASCII
    sc, sr = (received(o) for o in build_outputs(source, image, result, card, ExportSettings()))
    for obj in (sc, sr):
        assert obj.SpecificCharacterSet == "ISO_IR 100"
        _dciodvfy_clean(obj)
    _dsrdump_clean(sr)
    assert read_result(sr)["model_name"] == "cxr-modèle-local"


def test_the_validators_catch_a_broken_object() -> None:
    """The gate can fail: an SR without CompletionFlag and an SC without Rows are reported."""
    source, image, result = output_inputs("positive")
    sc, sr = (received(o) for o in build_outputs(source, image, result, CARD, ExportSettings()))
    broken_sr = copy.deepcopy(sr)
    del broken_sr.CompletionFlag
    assert any("CompletionFlag" in e or "Completion Flag" in e for e in run_dciodvfy(broken_sr).errors)
    dsr = run_dsrdump(broken_sr)
    assert dsr.warnings or dsr.errors, dsr.output
    broken_sc = copy.deepcopy(sc)
    del broken_sc.BurnedInAnnotation
    del broken_sc.BodyPartExamined
    assert run_dciodvfy(broken_sc).errors
