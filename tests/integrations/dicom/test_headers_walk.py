"""The one header reader: the fast walk (:mod:`integrations.dicom.walk`) reads what pydicom reads,
on every file of the corpus and on damaged copies of it, and :func:`read_headers` answers what the
full pydicom parse answers (results and refusals alike)."""

from __future__ import annotations

import io
import random
import warnings
from collections.abc import Callable
from datetime import date, time
from pathlib import Path
from typing import Any

import pydicom.config
import pytest
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from integrations.dicom.errors import CannotUnderstand
from integrations.dicom.headers import (
    DEFAULT_MAX_SEQUENCE_DEPTH,
    INDEXED_KEYWORDS,
    InstanceHeaders,
    _da,
    _read_headers_fast,
    _tm,
    read_headers,
    read_headers_pydicom,
)
from integrations.dicom.walk import META_KEYWORDS, NotWalkable, walk_applies, walk_header
from tests.factories.studies import make_ct_series

CORPUS = Path(__file__).resolve().parents[2] / "data" / "dicom"


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    return [p.read_bytes() for p in make_ct_series(tmp_path_factory.mktemp("ct"), 6, rows=64, cols=64)]


def _plain(value: Any) -> Any:
    """A value as compared: pydicom's MultiValue as a list (the walk's values are pydicom's own)."""
    return list(value) if isinstance(value, MultiValue) else value


# Files the walk leaves to pydicom, with why: deliberate differences. Where it steps aside,
# ``dcmread(specific_tags=...)`` mostly reads the asked-for values: the walk answers only where
# it is certain to give pydicom's answer for the WHOLE header (the ingest refuses a header with a
# value that cannot be read, and a walk that skipped what it was not asked for could not know),
# and only in explicit VR little endian. ``read_headers`` gives those files pydicom's full parse.
_UN = "VR b'UN'"  # UN values: pydicom looks their VR up in its dictionary (PS3.5 6.2.2)
_UNDEFINED_LENGTH = "undefined length value"  # an element of undefined length that is no sequence
_NO_DICM = "no DICM prefix"  # no preamble/File Meta (PS3.10 7.1): pydicom refuses it too unless forced
_OTHER_SYNTAX = "not (surely) explicit VR little endian"  # big endian, implicit VR, deflate, private
_NOT_EXPLICIT_VR = "VR b'"  # a data set encoded otherwise (implicit VR, deflated) than its File Meta says
#: Every corpus file the walk steps aside for, and the reason it must give.
STEPS_ASIDE: dict[str, str] = {
    "charset/pydicom_chrJapMulti.dcm": _UN,
    "charset/pydicom_chrJapMultiExplicitIR6.dcm": _UN,
    "malformed/pydicom-data_bad_sequence_CT.dcm": _UN,
    "malformed/pydicom-data_explicit_VR-UN_CT.dcm": _UN,
    "malformed/pydicom_J2K_pixelrep_mismatch_CT.dcm": _UN,
    "mr/dcm4che_MR-JPEGLosslessSV1.dcm": _UN,
    "malformed/pydicom_UN_sequence.dcm": _UNDEFINED_LENGTH,
    "mg/fodicom_GH133_mammo.dcm": _UNDEFINED_LENGTH,
    "cr_dx/fodicom_CR-MONO1-10-chest.dcm": _NO_DICM,
    "malformed/pydicom_ExplVR_BigEndNoMeta.dcm": _NO_DICM,
    "malformed/pydicom_ExplVR_LitEndNoMeta.dcm": _NO_DICM,
    "malformed/pydicom_no_meta_CT.dcm": _NO_DICM,
    "malformed/fodicom_GH177_CT1_IVRLE_BigEndian_undefined_length.dcm": _OTHER_SYNTAX,
    "mr/pydicom-data_emri_small/emri_small_big_endian.dcm": _OTHER_SYNTAX,
    "mr/pydicom_MR_small/MR_small_bigendian.dcm": _OTHER_SYNTAX,
    "us/dcm4che_US-RGB-8-epicard.dcm": _OTHER_SYNTAX,
    "us/pydicom_ExplVR_BigEnd_epicard_small.dcm": _OTHER_SYNTAX,
    "ct/series_dcmqi_ct3slice/01.dcm": _NOT_EXPLICIT_VR,
    "ct/series_dcmqi_ct3slice/02.dcm": _NOT_EXPLICIT_VR,
    "ct/series_dcmqi_ct3slice/03.dcm": _NOT_EXPLICIT_VR,
    "malformed/dcm4che_no_preamble_dicm_in_data": _NOT_EXPLICIT_VR,
    "malformed/pydicom_meta_missing_tsyntax.dcm": _NOT_EXPLICIT_VR,
    "mr/pydicom_MR_small/MR_small_implicit.dcm": _NOT_EXPLICIT_VR,
    "mr/series_dcm4che_wrist/MR01.dcm": _NOT_EXPLICIT_VR,
    "mr/series_dcm4che_wrist/MR02.dcm": _NOT_EXPLICIT_VR,
    "mr/series_dcm4che_wrist/MR03.dcm": _NOT_EXPLICIT_VR,
    "mr/series_dcm4che_wrist/MR04.dcm": _NOT_EXPLICIT_VR,
    "mr/series_dcm4che_wrist/MR05.dcm": _NOT_EXPLICIT_VR,
    "mr/series_dcm4che_wrist/MR06.dcm": _NOT_EXPLICIT_VR,
    "mr/series_dcm4che_wrist/MR07.dcm": _NOT_EXPLICIT_VR,
    "mr/series_dcm4che_wrist/MR08.dcm": _NOT_EXPLICIT_VR,
    "mr/series_dcm4che_wrist/MR09.dcm": _NOT_EXPLICIT_VR,
    "mr/series_dcm4che_wrist/MR10.dcm": _NOT_EXPLICIT_VR,
    "mr/series_dcm4che_wrist/MR11.dcm": _NOT_EXPLICIT_VR,
    "mr/series_dcm4che_wrist/MR12.dcm": _NOT_EXPLICIT_VR,
    "mr/series_dcm4che_wrist/MR13.dcm": _NOT_EXPLICIT_VR,
    "mr/series_dcm4che_wrist/MR14.dcm": _NOT_EXPLICIT_VR,
    "mr/series_dcm4che_wrist/MR15.dcm": _NOT_EXPLICIT_VR,
    "mr/series_dcm4che_wrist/MR16.dcm": _NOT_EXPLICIT_VR,
    "other/dcm4che_report_dfl_SR.dcm": _NOT_EXPLICIT_VR,
    "other/pydicom_image_dfl_deflated.dcm": _NOT_EXPLICIT_VR,
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on invalid values
@pytest.mark.parametrize("mode", ["WARN", "IGNORE"])
def test_walk_reads_what_dcmread_specific_tags_reads_on_the_whole_corpus(
        mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file under tests/data/dicom, malformed ones included: where the walk answers, its
    values (data set and file meta) and transfer syntax are those of
    ``dcmread(..., specific_tags=..., stop_before_pixels=True)``; where it steps aside, it says
    why, and a file pydicom cannot read at all is never one the walk answers."""
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", getattr(pydicom.config, mode))
    keywords = (*INDEXED_KEYWORDS, "BitsStored", "WindowCenter", "PixelSpacing", "SliceThickness")
    answered, aside = 0, {}
    for path in _corpus():
        try:
            with open(path, "rb") as f:
                got = walk_header(f, keywords, file_size=path.stat().st_size, max_sequence_depth=64)
        except NotWalkable as why:
            aside[path.relative_to(CORPUS).as_posix()] = str(why)
            continue
        answered += 1
        ds = dcmread(path, specific_tags=list(keywords), stop_before_pixels=True)  # must not raise
        want = {kw: _plain(ds[kw].value) for kw in keywords if kw in ds}
        assert {k: _plain(v) for k, v in got.values.items()} == want, path
        meta = {kw: _plain(ds.file_meta[kw].value) for kw in META_KEYWORDS if kw in ds.file_meta}
        assert dict(got.file_meta) == meta, path
        assert got.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID, path
    assert answered >= 110, answered  # every explicit VR little endian file of the corpus but a few odd ones
    assert set(aside) == set(STEPS_ASIDE), "a file the walk answered or left aside changed: update STEPS_ASIDE"
    for rel, why in aside.items():
        assert STEPS_ASIDE[rel] in why, (rel, why)


def _outcome(read: Callable[[Path], InstanceHeaders | None], path: Path) -> tuple[Any, ...]:
    try:
        return ("ok", read(path))
    except Exception as err:
        return ("error", type(err).__name__, getattr(err, "status", None))


def _fast(path: Path) -> InstanceHeaders | None:
    return _read_headers_fast(path, DEFAULT_MAX_SEQUENCE_DEPTH)


def _corpus() -> list[Path]:
    return sorted(p for p in CORPUS.rglob("*") if p.is_file() and not p.name.endswith(".md"))


@pytest.fixture(params=["IGNORE", "WARN"])
def validation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The listener reads with IGNORE; pydicom's default is WARN."""
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", getattr(pydicom.config, request.param))


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on invalid values
def test_header_walk_agrees_with_pydicom_on_the_corpus(validation: None) -> None:
    fast = 0
    for path in _corpus():
        got = _outcome(_fast, path)
        if got == ("ok", None):
            continue  # left to pydicom
        fast += 1
        assert got == _outcome(read_headers_pydicom, path), path
    assert fast >= 110  # every explicit VR little endian file of the corpus but a few odd ones


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on invalid values
def test_header_walk_agrees_with_pydicom_on_damaged_files(tmp_path: Path, ct_series: list[bytes]) -> None:
    """Truncations, flipped and inserted bytes in the header of files with sequences, private
    elements and character sets: wherever the walk answers, it answers what pydicom does."""
    seeds = [ct_series[0]] + [(CORPUS / n).read_bytes() for n in (
        "charset/pydicom_chrArab.dcm", "charset/pydicom_chrX1.dcm", "mr/fodicom_MOVEKNEE_enhanced.dcm",
        "ct/pydicom_CT_small.dcm", "other/pydicom-data_liver_SEG.dcm", "mg/fodicom_GH133_mammo.dcm")]
    rng = random.Random(20261127)
    path = tmp_path / "damaged.dcm"
    answered = 0
    for _ in range(600):
        data = bytearray(rng.choice(seeds))
        end = min(len(data), 6000)
        kind = rng.random()
        if kind < 0.3:
            data = data[: rng.randrange(132, end)]
        elif kind < 0.8:
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(132, end)] = rng.randrange(256)
        else:
            at = rng.randrange(132, end)
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
        path.write_bytes(bytes(data))
        got = _outcome(_fast, path)
        if got != ("ok", None):
            answered += 1
            assert got == _outcome(read_headers_pydicom, path)
    assert answered > 150


def _with_raw(ct: bytes, tmp_path: Path, keyword: str, raw: bytes) -> Path:
    """``ct`` with ``keyword`` holding the raw value ``raw`` (pydicom would refuse to write it)."""
    placeholder = b"%06d" % 424242
    assert len(raw) == len(placeholder) and placeholder not in ct
    ds = dcmread(io.BytesIO(ct))
    setattr(ds, keyword, placeholder.decode())
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path = tmp_path / "edited.dcm"
    path.write_bytes(buf.getvalue().replace(placeholder, raw))
    return path


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on invalid values
def test_header_walk_edge_cases(tmp_path: Path, ct_series: list[bytes]) -> None:
    # an IS value pydicom cannot convert (OverflowError) in an element we do not index: refused
    bad_is = _with_raw(ct_series[0], tmp_path, "AcquisitionNumber", b"1e400 ")
    with pytest.raises(CannotUnderstand):
        read_headers(bad_is)
    assert _outcome(read_headers, bad_is) == _outcome(read_headers_pydicom, bad_is)
    # a DS value that is not a number: pydicom keeps it as text; so does the walk
    odd_ds = _with_raw(ct_series[0], tmp_path, "SliceThickness", b"abc   ")
    assert _fast(odd_ds) == read_headers_pydicom(odd_ds)
    # sequence depth: at the limit accepted, beyond refused, by both
    ds = dcmread(io.BytesIO(ct_series[0]))
    inner = Dataset()
    inner.CodeValue = "X"
    for _ in range(3):
        outer = Dataset()
        outer.ReferencedImageSequence = Sequence([inner])
        inner = outer
    ds.ReferencedImageSequence = inner.ReferencedImageSequence
    nested = tmp_path / "nested.dcm"
    ds.save_as(nested, enforce_file_format=True)
    assert _read_headers_fast(nested, 3) == read_headers_pydicom(nested, max_sequence_depth=3)
    assert _read_headers_fast(nested, 2) is None
    with pytest.raises(CannotUnderstand):
        read_headers(nested, max_sequence_depth=2)
    # an indexed element that holds a sequence (pydicom files its text form): left to pydicom
    ds = dcmread(io.BytesIO(ct_series[0]))
    item = Dataset()
    item.CodeValue = "X"
    ds[0x00100010] = DataElement(0x00100010, "SQ", Sequence([item]))
    odd_name = tmp_path / "odd_name.dcm"
    ds.save_as(odd_name, enforce_file_format=True)
    assert _fast(odd_name) is None
    assert read_headers(odd_name) == read_headers_pydicom(odd_name)
    # Pixel Data cut short: the same refusal
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(ct_series[0][:-10])
    assert _outcome(_fast, cut) == _outcome(read_headers_pydicom, cut) == ("error", "CannotUnderstand", 0xC210)


def test_header_walk_steps_aside_for_non_default_pydicom_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert walk_applies()
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.RAISE)
    assert not walk_applies()
    path = CORPUS / "ct" / "pydicom_CT_small.dcm"
    assert _fast(path) is None
    with open(path, "rb") as f, pytest.raises(NotWalkable, match="configuration"):
        walk_header(f, INDEXED_KEYWORDS, file_size=path.stat().st_size, max_sequence_depth=64)


def test_dates_and_times_are_pydicom_da_and_tm_and_odd_ones_are_left_empty() -> None:
    assert _da("20240131") == date(2024, 1, 31) and type(_da("20240131")) is date
    assert _da("2024.01.31") == date(2024, 1, 31)  # ACR-NEMA form, which pydicom's DA reads
    assert _da("20240230") is None and _da("2024") is None and _da("") is None and _da(None) is None
    assert _tm("123045.5") == time(12, 30, 45, 500000) and type(_tm("1230")) is time
    assert _tm("1230") == time(12, 30) and _tm("12") == time(12)
    assert _tm("12:30:45") == time(12, 30, 45)  # ACR-NEMA form, read as before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom says it changes 60 to 59 (once: values are remembered)
        assert _tm("235960") == time(23, 59, 59)  # a leap second, as pydicom reads it
    assert _tm("256000") is None and _tm("noon") is None and _tm(None) is None


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on invalid values
def test_a_malformed_study_date_or_time_does_not_refuse_the_instance(tmp_path: Path, ct_series: list[bytes]) -> None:
    for keyword, raw in (("StudyDate", b"2024-1"), ("StudyTime", b"noon!!")):
        path = _with_raw(ct_series[0], tmp_path, keyword, raw)
        got = read_headers(path)
        assert got == read_headers_pydicom(path)
        assert (got.study_date if keyword == "StudyDate" else got.study_time) is None
