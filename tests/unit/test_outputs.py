"""dicom_node.outputs: SR + heatmap SC content, read-back, own-output recognition, argument checks."""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    SecondaryCaptureImageStorage,
)

from dicom_node.config import ExportSettings
from dicom_node.outputs import build_heatmap_sc, build_outputs, clean_reference, is_own_output, read_result
from dicom_node.outputs.caption import CAPTION_WARN, MAX_SIDE
from dicom_node.outputs.common import CODING_SCHEME, MANUFACTURER
from inference.types import Result, XrayImage
from tests.fixtures.validators import CARD, output_inputs, received

pytestmark = pytest.mark.unit


def _build(finding: str = "positive", sop_class: str = "comprehensive3d", **extra):
    source, image, result = output_inputs(finding, **extra)
    outputs = [received(o) for o in build_outputs(source, image, result, CARD,
                                                   ExportSettings(sr_sop_class=sop_class))]
    return source, image, result, outputs


def _referenced_uids(ds: Dataset) -> set[str]:
    """Every ReferencedSOPInstanceUID anywhere in ``ds``."""
    found: set[str] = set()

    def walk(d: Dataset) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            elif elem.keyword == "ReferencedSOPInstanceUID":
                found.add(str(elem.value))

    walk(ds)
    return found


@pytest.mark.parametrize("sop_class, uid", [("comprehensive3d", Comprehensive3DSRStorage),
                                            ("comprehensive", ComprehensiveSRStorage)])
def test_heatmap_first_then_sr_in_source_study_new_series(sop_class: str, uid: str) -> None:
    source, _, _, (sc, sr) = _build(sop_class=sop_class)
    assert sc.SOPClassUID == SecondaryCaptureImageStorage and sr.SOPClassUID == uid
    assert sc.StudyInstanceUID == sr.StudyInstanceUID == source.StudyInstanceUID
    series = {source.SeriesInstanceUID, sc.SeriesInstanceUID, sr.SeriesInstanceUID}
    assert len(series) == 3
    for out in (sc, sr):
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                        "StudyTime", "AccessionNumber", "StudyID"):
            assert str(out.get(keyword, "")) == str(source.get(keyword, "")), keyword
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    # SR references resolve: the source image and the heatmap SC, in evidence and content
    evidence = {str(i.ReferencedSOPInstanceUID)
                for s in sr.CurrentRequestedProcedureEvidenceSequence
                for series_item in s.ReferencedSeriesSequence
                for i in series_item.ReferencedSOPSequence}
    assert evidence == {source.SOPInstanceUID, sc.SOPInstanceUID}
    content = Dataset()
    content.ContentSequence = sr.ContentSequence
    assert _referenced_uids(content) == {source.SOPInstanceUID, sc.SOPInstanceUID}
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID


@pytest.mark.parametrize("sop_class", ["comprehensive3d", "comprehensive"])
@pytest.mark.parametrize("finding", ["positive", "negative", "not_assessable"])
def test_read_result_gives_back_what_went_in(finding: str, sop_class: str) -> None:
    _, _, result, outputs = _build(finding, sop_class)
    got = read_result(outputs[-1])
    assert got == {
        "finding": finding,
        "probability": result.probability,
        "threshold": result.threshold,
        "lung_attention": result.lung_attention,
        "lung_fraction": pytest.approx(result.lung_fraction),
        "model_name": CARD["name"],
        "model_version": CARD["version"],
        "reason": result.reason,
        "reason_code": result.reason_code,
    }


def test_not_assessable_without_heatmap_gives_only_the_sr_with_reason() -> None:
    _, _, result, outputs = _build("not_assessable")
    assert [o.Modality for o in outputs] == ["SR"]
    got = read_result(outputs[0])
    assert got["finding"] == "not_assessable" and got["probability"] is None
    assert got["reason"] == result.reason and got["reason_code"] == "lateral"


@pytest.mark.parametrize("code", ["not_xray", "for_processing", "not_chest", "child", "lateral", "too_small",
                                  "no_lungs", "undecodable"])
def test_every_reason_code_of_the_pipeline_is_coded_in_the_sr(code: str) -> None:
    source, image, result = output_inputs("not_assessable")
    result = dataclasses.replace(result, reason_code=code, reason=f"because {code}")
    (sr,) = [received(o) for o in build_outputs(source, image, result, CARD, ExportSettings())]
    got = read_result(sr)
    assert got["reason_code"] == code and got["reason"] == f"because {code}"


def test_send_heatmap_off_builds_only_the_sr() -> None:
    source, image, result = output_inputs("positive")
    outputs = build_outputs(source, image, result, CARD, ExportSettings(send_heatmap=False))
    assert [o.Modality for o in outputs] == ["SR"]
    assert read_result(received(outputs[0]))["probability"] == result.probability


def test_heatmap_sc_pixels_caption_and_derived_image_attributes() -> None:
    source, image, result, (sc, _) = _build(PixelSpacing=[0.2, 0.2])
    rgb = sc.pixel_array
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3 and rgb.dtype == np.uint8
    assert sc.Columns == image.pixels.shape[1]
    band = sc.Rows - image.pixels.shape[0]
    assert band > 0  # caption band on top
    caption = rgb[:band]
    assert (caption.max(axis=2) > 128).sum() > 50  # text drawn
    warn = np.all(np.abs(caption.astype(int) - np.array(CAPTION_WARN)) < 40, axis=2)
    assert warn.sum() > 20  # the red "NOT FOR DIAGNOSTIC USE" line
    body = rgb[band:].astype(int)
    hot = body[int(image.pixels.shape[0] * 0.45), int(image.pixels.shape[1] * 0.3)]
    assert hot[0] > hot[2]  # jet: the heatmap's peak is red
    assert np.abs(body[..., 0] - body[..., 2]).mean() > 5  # colour overlay, not grey
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert sc.BurnedInAnnotation == "YES"
    assert sc.BodyPartExamined == source.BodyPartExamined
    assert "Grad-CAM" in sc.DerivationDescription
    assert sc.DerivationCodeSequence[0].CodeValue == "130404"
    assert sc.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    assert [float(v) for v in sc.PixelSpacing] == [0.2, 0.2]
    assert any(e.Manufacturer == MANUFACTURER and any("1.2.3-test" in v for v in e.SoftwareVersions)
               for e in sc.ContributingEquipmentSequence)


def test_a_turned_source_gives_a_heatmap_shown_as_the_model_saw_it() -> None:
    # stored mirrored and upside down (R\\H), pixels 0.2 mm apart between rows and 0.3 mm between columns
    source, image, result = output_inputs("positive", PatientOrientation=["R", "H"], PixelSpacing=[0.2, 0.3])
    assert image.meta["source_orientation"] == "R\\H"
    sc = received(build_heatmap_sc(clean_reference(source), image, result, CARD))
    assert list(sc.PatientOrientation) == ["L", "F"]
    assert [float(v) for v in sc.PixelSpacing] == [0.2, 0.3]
    assert "turned from the stored orientation R\\H to L\\F" in sc.DerivationDescription
    upright = received(build_heatmap_sc(clean_reference(source), dataclasses.replace(
        image, meta={**image.meta, "source_orientation": None}), result, CARD))
    assert sc.Rows > upright.Rows  # one more caption line says so
    # turned by 90 degrees: the spacing between rows is the stored spacing between columns
    source, image, result = output_inputs("positive", PatientOrientation=["F", "L"], PixelSpacing=[0.2, 0.3])
    sc = received(build_heatmap_sc(clean_reference(source), image, result, CARD))
    assert list(sc.PatientOrientation) == ["L", "F"] and [float(v) for v in sc.PixelSpacing] == [0.3, 0.2]


@pytest.fixture(scope="module")
def large_case() -> tuple[Dataset, XrayImage, Result]:
    """A 2000 x 2000 CR with 0.14 mm pixels (built once: the phantom takes seconds at this size)."""
    return output_inputs("positive", shape=(2000, 2000), PixelSpacing=[0.14, 0.14])


def test_sc_without_heatmap_shows_the_radiograph_in_grey_with_the_reason() -> None:
    source, image, result = output_inputs("not_assessable")
    sc = received(build_heatmap_sc(clean_reference(source), image, result, CARD))
    body = sc.pixel_array[sc.Rows - image.pixels.shape[0]:].astype(int)
    assert np.array_equal(body[..., 0], body[..., 2]) and body.std() > 10
    assert sc.BurnedInAnnotation == "YES"


def test_large_source_is_downsampled_with_pixel_spacing_scaled(large_case) -> None:
    source, image, result = large_case
    sc = received(build_outputs(source, image, result, CARD, ExportSettings())[0])
    assert sc.Columns == MAX_SIDE
    assert sc.Rows > MAX_SIDE  # image rows + caption band
    assert [float(v) for v in sc.PixelSpacing] == pytest.approx([0.14 * 2000 / 1024] * 2, rel=1e-5)
    assert "downsampled" in sc.DerivationDescription


def test_uids_repeat_for_the_same_job_and_change_with_the_model() -> None:
    source, image, result = output_inputs("positive")
    first = build_outputs(source, image, result, CARD, ExportSettings())
    again = build_outputs(source, image, result, CARD, ExportSettings())
    assert [o.SOPInstanceUID for o in first] == [o.SOPInstanceUID for o in again]
    other = build_outputs(source, image, result, {**CARD, "version": "2.0.0"}, ExportSettings())
    assert not {o.SOPInstanceUID for o in first} & {o.SOPInstanceUID for o in other}


@pytest.mark.filterwarnings("ignore:.*(exceeds the maximum|Invalid value for VR):UserWarning")
def test_source_header_is_repaired_in_the_outputs_not_in_the_source() -> None:
    source, image, result = output_inputs(
        "positive", patient_name="A" * 70 + "^B", PatientBirthDate="1970-01-01", PatientSex="X",
        StudyDate="2020/01/31", StudyTime="10:30:00", body_part="chest", SpecificCharacterSet="ISO_IR 192",
        InstitutionName="Klinikum Göttingen")
    before = copy.deepcopy(source)
    sc, sr = (received(o) for o in build_outputs(source, image, result, CARD, ExportSettings()))
    assert source == before
    for out in (sc, sr):
        assert str(out.PatientName) == "A" * 62 + "^B"  # a PN component group holds 64 characters
        # dates and times keep their value without the separators; an unknown sex is emptied
        assert (out.PatientBirthDate, out.StudyDate, out.StudyTime) == ("19700101", "20200131", "103000")
        assert out.PatientSex == ""
        assert out.SpecificCharacterSet == "ISO_IR 100"  # Latin-1 holds every copied value
    assert sc.BodyPartExamined == "CHEST"
    source, image, result = output_inputs("positive", PatientSex="f", StudyTime="25:61")
    for out in build_outputs(source, image, result, CARD, ExportSettings()):
        assert (out.PatientSex, out.StudyTime or "") == ("F", "")  # an impossible time is emptied


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")
def test_clean_reference_needs_the_source_identity() -> None:
    source, _, _ = output_inputs("positive")
    del source.SOPInstanceUID
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        clean_reference(source)
    source, _, _ = output_inputs("positive")
    source.StudyInstanceUID = "1.2.03.x"
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        clean_reference(source)


def test_non_latin_names_keep_utf8() -> None:
    source, image, result = output_inputs("negative", SpecificCharacterSet="ISO_IR 192",
                                          patient_name="Иванов^Иван")
    sc, sr = (received(o) for o in build_outputs(source, image, result, CARD, ExportSettings()))
    assert sr.SpecificCharacterSet == sc.SpecificCharacterSet == "ISO_IR 192"
    assert str(sr.PatientName) == str(sc.PatientName) == "Иванов^Иван"


def test_series_descriptions_name_the_source_image() -> None:
    """Several images of one study each get an SR and an SC series: the series list tells them apart."""
    source, image, result = output_inputs("positive", SeriesNumber=12, InstanceNumber=3)
    sc, sr = build_outputs(source, image, result, CARD, ExportSettings())
    assert sc.SeriesDescription == "cxr-node heatmap (not for diagnostic use), series 12 image 3"
    assert sr.SeriesDescription == "cxr-node AI result (not for diagnostic use), series 12 image 3"
    del source.SeriesNumber
    assert build_outputs(source, image, result, CARD, ExportSettings())[1].SeriesDescription \
        == "cxr-node AI result (not for diagnostic use)"


def test_is_own_output_recognises_ours_only() -> None:
    source, _, _, (sc, sr) = _build()
    assert is_own_output(sc) and is_own_output(sr)
    for ds in (sc, sr):  # by the series description alone
        only = copy.deepcopy(ds)
        only.Manufacturer = "Other"
        del only.ContributingEquipmentSequence
        if "CodingSchemeIdentificationSequence" in only:
            del only.CodingSchemeIdentificationSequence
        assert ", series 1 image 1" in only.SeriesDescription and is_own_output(only)
    assert not is_own_output(source)
    # ours with the Manufacturer blanked by a PACS: still recognised by equipment / coding scheme
    for ds in (sc, sr):
        stripped = copy.deepcopy(ds)
        stripped.Manufacturer = ""
        del stripped.SeriesDescription
        assert is_own_output(stripped)
    del sr.ContributingEquipmentSequence
    sr.Manufacturer = "Other"
    del sr.SeriesDescription
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == CODING_SCHEME
    assert is_own_output(sr)
    # someone else's SC and near-empty datasets
    foreign = copy.deepcopy(sc)
    foreign.Manufacturer = "Other"
    del foreign.ContributingEquipmentSequence
    del foreign.SeriesDescription
    assert not is_own_output(foreign)
    assert not is_own_output(Dataset())
    bare = Dataset()
    bare.SOPClassUID = SecondaryCaptureImageStorage
    assert not is_own_output(bare)
    cr = Dataset()
    cr.SOPClassUID = ComputedRadiographyImageStorage
    cr.Manufacturer = MANUFACTURER
    assert not is_own_output(cr)
    with pytest.raises(TypeError, match='"ds"'):
        is_own_output("not a dataset")  # type: ignore[arg-type]
    # a damaged SC: elements of unknown VR are unreadable, which counts as "not ours", never an error
    def unknown_vr(ds: Dataset, tag: int) -> None:
        ds[tag] = RawDataElement(Tag(tag), "ZZ", 4, b"ABCD", 0, False, True)

    damaged = copy.deepcopy(foreign)
    for tag in (0x00080070, 0x0008103E):  # Manufacturer, Series Description
        unknown_vr(damaged, tag)
    assert not is_own_output(damaged)
    mine = copy.deepcopy(sc)
    unknown_vr(mine, 0x00080070)
    assert is_own_output(mine)  # still recognised by its equipment and series description


def test_read_result_rejects_other_objects() -> None:
    source, _, _, (sc, _) = _build()
    for ds in (source, sc):
        with pytest.raises(ValueError, match='"sr"'):
            read_result(ds)


@pytest.mark.parametrize("change, match", [
    ({"card": {**CARD, "device_uid": ""}}, '"card"'),
    ({"card": {**CARD, "device_uid": "not-a-uid"}}, '"card"'),
    ({"card": "model.json"}, '"card"'),
    ({"export_settings": {"sr_sop_class": "comprehensive"}}, '"export_settings"'),
    ({"source": b"DICM"}, '"source"'),
    ({"result": {"probability": 1.5}}, '"result"'),
    ({"result": {"probability": None}}, '"result"'),
    ({"result": {"heatmap": np.zeros((3, 3), np.float32)}}, '"result"'),
])
def test_bad_arguments_are_named(change: dict, match: str) -> None:
    source, image, result = output_inputs("positive")
    args = {"source": source, "image": image, "result": result, "card": CARD,
            "export_settings": ExportSettings()}
    for key, value in change.items():
        if key == "result":
            args["result"] = dataclasses.replace(result, **value)
        else:
            args[key] = value
    with pytest.raises((TypeError, ValueError), match=match):
        build_outputs(**args)


def test_build_time_for_a_2000_px_source(large_case, record_property: pytest.RecordProperty) -> None:
    source, image, result = large_case
    build_outputs(source, image, result, CARD, ExportSettings())  # warm caches (font, colormap)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        outputs = build_outputs(source, image, result, CARD, ExportSettings())
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    record_property("outputs_build_s_2000px", round(median, 4))
    print(f"SR+SC build for a 2000x2000 source: median {median:.3f} s over {len(times)} runs")
    assert len(outputs) == 2
    # A loose bound that only catches a gross regression on a busy machine; speed is measured by
    # inference.benchmark, not here.
    assert median < 1.0, f"SR+SC build took {median:.3f} s, more than 1 s: a gross regression"


def test_zero_pixel_spacing_is_not_reported_as_a_measurement() -> None:
    source, image, result = output_inputs("positive", PixelSpacing=[0, 0], PatientOrientation=["L", "F"])
    sc, sr = build_outputs(source, image, result, CARD, ExportSettings())
    assert "PixelSpacing" not in sc
    text = str(received(sr))
    assert "Horizontal Pixel Spacing" not in text and "Vertical Pixel Spacing" not in text


def _identity_item(**values: str) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def test_outputs_carry_the_patient_and_study_identity_of_the_source_exactly() -> None:
    """The SC as well as the SR: a PACS matches the patient with the issuer of the ID, and files by study."""
    extra = {
        "IssuerOfPatientID": "HOSP-A", "PatientBirthTime": "081500", "PatientAge": "054Y",
        "StudyDescription": "XR CHEST PA",
        "IssuerOfPatientIDQualifiersSequence": [_identity_item(UniversalEntityID="1.2.3.4",
                                                               UniversalEntityIDType="ISO")],
        "OtherPatientIDsSequence": [_identity_item(PatientID="OTHER-7", IssuerOfPatientID="HOSP-B",
                                                   TypeOfPatientID="TEXT")],
        "IssuerOfAccessionNumberSequence": [_identity_item(LocalNamespaceEntityID="RIS-A")],
    }
    source, image, result = output_inputs("positive", **extra)
    outputs = [received(o) for o in build_outputs(source, image, result, CARD, ExportSettings())]
    assert len(outputs) == 2
    for obj in outputs:
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                        "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName", *extra):
            assert obj[keyword].value == source[keyword].value, (obj.Modality, keyword)


def test_a_multi_valued_single_value_attribute_keeps_its_first_value() -> None:
    """Two names in Patient Name made highdicom refuse the SR and SC (the job failed after inference); two IDs
    made invalid objects. The first value is the one a PACS matches on."""
    source, image, result = output_inputs(
        "positive", PatientName=["Doe^Jane", "Roe^Jane"], ReferringPhysicianName=["Who^Dr", "Else^Dr"],
        PatientID=["ID-1", "ID-2"], AccessionNumber=["A1", "A2"], StudyID=["S1", "S2"])
    for obj in (received(o) for o in build_outputs(source, image, result, CARD, ExportSettings())):
        assert (str(obj.PatientName), str(obj.ReferringPhysicianName)) == ("Doe^Jane", "Who^Dr")
        assert (obj.PatientID, obj.AccessionNumber, obj.StudyID) == ("ID-1", "A1", "S1")


def test_outputs_keep_the_source_time_zone_and_say_theirs() -> None:
    """With the source's Timezone Offset From UTC the outputs carry it, their own dates and times in it; the
    node's contribution time always states its UTC offset."""
    import datetime

    source, image, result = output_inputs("positive", TimezoneOffsetFromUTC="+0530")
    before = datetime.datetime.now(datetime.UTC)
    for obj in (received(o) for o in build_outputs(source, image, result, CARD, ExportSettings())):
        assert obj.TimezoneOffsetFromUTC == "+0530"
        pairs = [("ContentDate", "ContentTime"), ("InstanceCreationDate", "InstanceCreationTime"),
                 ("DateOfSecondaryCapture", "TimeOfSecondaryCapture")]
        for date, clock in pairs[:3 if obj.Modality == "OT" else 2]:
            stated = datetime.datetime.strptime(f"{obj[date].value}{str(obj[clock].value)[:6]}+0530",
                                                "%Y%m%d%H%M%S%z")
            assert abs((stated - before).total_seconds()) < 60, (obj.Modality, date, stated, before)
        for item in obj.ContributingEquipmentSequence:  # every contribution time states its offset
            stamp = str(item.get("ContributionDateTime") or "")
            assert not stamp or (stamp[-5] in "+-" and stamp[-4:].isdigit()), (item.Manufacturer, stamp)
            if stamp:
                assert stamp.endswith("+0530"), (item.Manufacturer, stamp)


def test_sc_marks_lossy_sources_and_invents_no_geometry() -> None:
    """A heatmap over a lossy image is lossy (C.7.6.1.1.5: never reset to 00); a detector's Imager Pixel
    Spacing is not a Pixel Spacing in the patient; an orientation the source did not state stays empty."""
    from pydicom.uid import JPEGBaseline8Bit

    source, image, result = output_inputs("positive", LossyImageCompression="01",
                                          LossyImageCompressionRatio="12.5",
                                          LossyImageCompressionMethod="ISO_10918_1")
    sc = received(build_heatmap_sc(clean_reference(source), image, result, CARD))
    assert (sc.LossyImageCompression, float(sc.LossyImageCompressionRatio), sc.LossyImageCompressionMethod) \
        == ("01", 12.5, "ISO_10918_1")
    received_as_jpeg = copy.deepcopy(source)
    del received_as_jpeg.LossyImageCompression
    received_as_jpeg.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    assert received(build_heatmap_sc(clean_reference(received_as_jpeg), image, result, CARD)
                    ).LossyImageCompression == "01"

    source, image, result = output_inputs("positive", modality="DX", ImagerPixelSpacing=[0.15, 0.15])
    del source.PatientOrientation
    assert "PixelSpacing" not in source
    sc = received(build_heatmap_sc(clean_reference(source), image, result, CARD))
    assert "PixelSpacing" not in sc and sc.PatientOrientation in (None, "", [])
    assert sc.ConversionType == "WSD" and sc.LossyImageCompression == "00"


@pytest.mark.parametrize(("probability", "threshold", "shown"), [
    (0.496, 0.499, "p = 0.496, threshold 0.499"),
    (0.501, 0.499, "p = 0.501, threshold 0.499"),
    (0.73362, 0.73412, "p = 0.7336, threshold 0.7341"),
    (0.8125, 0.7341195, "p = 0.81, threshold 0.73"),
])
def test_the_caption_never_shows_a_probability_equal_to_a_threshold_it_differs_from(
        probability: float, threshold: float, shown: str) -> None:
    from dicom_node.outputs.sc import caption_lines

    result = Result(finding="positive" if probability >= threshold else "negative", probability=probability,
                    threshold=threshold, model_name=CARD["name"], model_version=CARD["version"])
    assert shown in caption_lines(result, CARD)[1]


def test_the_sr_body_says_not_for_diagnostic_use() -> None:
    from highdicom.sr.utils import find_content_items
    from pydicom.sr.codedict import codes

    from dicom_node.outputs.common import DISCLAIMER

    _, _, _, outputs = _build("negative")
    sr = outputs[-1]
    texts = [str(item.TextValue) for item in find_content_items(sr, name=codes.DCM.Comment, recursive=True)]
    assert texts == [DISCLAIMER] and DISCLAIMER.startswith("NOT FOR DIAGNOSTIC USE")
    (container,) = [item for item in sr.ContentSequence if item.ValueType == "CONTAINER"
                    and item.ConceptNameCodeSequence[0].CodeValue == "C0034375"]  # TID 1500's own slot for it
    assert container.ContentSequence[0].TextValue == DISCLAIMER
    assert read_result(sr)["reason"] == ""  # the reason of a not assessable result is another comment
