"""DICOM loaders: series -> Volume (HU, spacing, LPS order) and single image -> Radiograph."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from core.errors import CaseDataError
from core.imaging.dicom import (
    load_dicom_image,
    load_dicom_series,
    make_uid,
    write_dicom_radiograph,
    write_dicom_series,
)
from core.imaging.types import Radiograph, Volume

PATIENT = {"name": "TEST^PHANTOM", "id": "P0001", "birth_date": "19700101", "sex": "F", "age": 54}
SPACING = (2.5, 0.8, 0.6)  # (z, y, x): all different, so a swapped axis shows
ORIGIN = (-12.0, 30.5, -100.0)  # (x, y, z) LPS mm of voxel [0, 0, 0]


def _phantom(shape=(6, 10, 12), seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    arr = rng.uniform(-1000, 2000, size=shape).astype(np.float32)  # non-integer HU: rounding must be < 1 HU
    arr[0, 0, 0] = -1024.0
    arr[-1, -1, -1] = 3000.0
    return Volume(array=arr, spacing=SPACING, source=Path("<mem>"), origin=ORIGIN)


def _write(vol: Volume, folder: Path, **kw) -> list[Path]:
    kw.setdefault("uid_seed", "seed-a")
    return write_dicom_series(vol, folder, patient=PATIENT, study_date="20240115", **kw)


def _edit(path: Path, fn) -> None:
    ds = pydicom.dcmread(path)
    fn(ds)
    ds.save_as(path)


def test_series_round_trip_hu_spacing_origin(tmp_path):
    vol = _phantom()
    paths = _write(vol, tmp_path / "s")
    assert len(paths) == vol.shape[0]
    out = load_dicom_series(tmp_path / "s")
    assert out.shape == vol.shape
    assert out.array.dtype == np.float32
    assert np.max(np.abs(out.array - vol.array)) <= 0.5 + 1e-3  # stored as rounded integers
    assert out.spacing == pytest.approx(SPACING)
    assert out.origin == pytest.approx(ORIGIN, abs=1e-4)
    assert out.metadata["modality"] == "CT"
    assert out.metadata["n_slices"] == vol.shape[0]
    assert out.metadata["z_spacing_source"] == "positions"
    assert out.metadata["orientation"] == "axial"


def test_slice_order_comes_from_positions_not_names_or_instance_numbers(tmp_path):
    vol = _phantom()
    folder = tmp_path / "s"
    paths = _write(vol, folder)
    n = len(paths)
    # reverse the file names (slice 0 now sorts last) and scramble InstanceNumber
    tmp_names = [p.rename(p.with_suffix(".tmp")) for p in paths]
    rng = np.random.default_rng(1)
    for k, p in enumerate(tmp_names):
        target = folder / f"IM{n - k:05d}.dcm"
        p.rename(target)
        _edit(target, lambda ds: setattr(ds, "InstanceNumber", int(rng.integers(1, 1000))))
    out = load_dicom_series(folder)
    assert np.max(np.abs(out.array - vol.array)) <= 0.5 + 1e-3
    assert out.origin == pytest.approx(ORIGIN, abs=1e-4)

    # and arbitrary opaque names
    for p in sorted(folder.iterdir()):
        p.rename(folder / f"{make_uid('x', p.name)}")
    out2 = load_dicom_series(folder)
    np.testing.assert_array_equal(out2.array, out.array)


def test_mixed_series_in_one_folder_refused(tmp_path):
    vol = _phantom()
    _write(vol, tmp_path / "a", uid_seed="series-a")
    _write(vol, tmp_path / "b", uid_seed="series-b")
    for p in (tmp_path / "b").iterdir():
        shutil.copy(p, tmp_path / "a" / f"B_{p.name}")
    with pytest.raises(CaseDataError) as e:
        load_dicom_series(tmp_path / "a")
    assert e.value.field == "SeriesInstanceUID"
    assert "2 series" in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_pixel_data_names_the_file(tmp_path):
    paths = _write(_phantom(), tmp_path / "s")
    victim = paths[2]
    _edit(victim, lambda ds: delattr(ds, "PixelData"))
    with pytest.raises(CaseDataError) as e:
        load_dicom_series(tmp_path / "s")
    assert e.value.file == str(victim)
    assert e.value.field == "PixelData"


def test_junk_dcm_file_is_an_error_naming_it(tmp_path):
    _write(_phantom(), tmp_path / "s")
    junk = tmp_path / "s" / "zz_junk.dcm"
    junk.write_text("this is not a DICOM file, it is a note\n" * 20)
    with pytest.raises(CaseDataError) as e:
        load_dicom_series(tmp_path / "s")
    assert e.value.file == str(junk)
    assert "not a DICOM" in e.value.problem


def test_random_bytes_dcm_file_is_an_error_naming_it(tmp_path):
    _write(_phantom(), tmp_path / "s")
    junk = tmp_path / "s" / "noise.dcm"
    junk.write_bytes(np.random.default_rng(7).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(CaseDataError) as e:
        load_dicom_series(tmp_path / "s")
    assert e.value.file == str(junk)


def test_truncated_slice_is_an_error_naming_it(tmp_path):
    paths = _write(_phantom(shape=(4, 64, 64)), tmp_path / "s")
    victim = paths[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(CaseDataError) as e:
        load_dicom_series(tmp_path / "s")
    assert e.value.file == str(victim)


def test_non_dicom_side_files_are_skipped_and_counted(tmp_path):
    vol = _phantom()
    _write(vol, tmp_path / "s")
    (tmp_path / "s" / "README.txt").write_text("scan notes")
    (tmp_path / "s" / "thumb.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = load_dicom_series(tmp_path / "s")
    assert out.metadata["skipped_files"] == 2
    assert np.max(np.abs(out.array - vol.array)) <= 0.5 + 1e-3


def test_empty_folder_and_not_a_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaseDataError, match="no DICOM slices"):
        load_dicom_series(tmp_path / "empty")
    f = tmp_path / "file.dcm"
    f.write_bytes(b"x")
    with pytest.raises(CaseDataError) as e:
        load_dicom_series(f)
    assert e.value.file == str(f)


def test_missing_slice_is_refused_not_resampled(tmp_path):
    paths = _write(_phantom(), tmp_path / "s")
    paths[3].unlink()
    with pytest.raises(CaseDataError, match="irregular slice spacing"):
        load_dicom_series(tmp_path / "s")


def test_real_ct_small_loads_with_plausible_hu_and_spacing(tmp_path):
    src = get_testdata_file("CT_small.dcm", download=False)
    shutil.copy(src, tmp_path / "CT_small.dcm")
    vol = load_dicom_series(tmp_path)
    assert vol.shape == (1, 128, 128)
    assert vol.spacing == pytest.approx((5.0, 0.661468, 0.661468))
    assert vol.metadata["z_spacing_source"] in {"SpacingBetweenSlices", "SliceThickness"}
    a = vol.array
    assert a.min() < -800  # air outside the body
    assert -1100 < a.min() and a.max() < 3100
    # a body sits in the middle: the centre is much denser than the corners
    assert a[0, 54:74, 54:74].mean() > a[0, :10, :10].mean() + 300
    assert vol.metadata["modality"] == "CT"
    # the raw file's rescale applied: HU = stored * slope + intercept
    ds = pydicom.dcmread(src)
    expect = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(a[0], expect, atol=1e-3)


def test_real_mr_small_loads(tmp_path):
    src = get_testdata_file("MR_small.dcm", download=False)
    shutil.copy(src, tmp_path / "MR_small.dcm")
    vol = load_dicom_series(tmp_path)
    assert vol.shape[1:] == (64, 64)
    assert vol.metadata["modality"] == "MR"
    assert vol.metadata["units"] != "HU"


def test_ct_file_is_refused_as_a_radiograph():
    src = get_testdata_file("CT_small.dcm", download=False)
    with pytest.raises(CaseDataError) as e:
        load_dicom_image(src)
    assert e.value.field == "Modality"
    assert "dicom-series" in e.value.problem


# ---------------------------------------------------------------------------------------------
# radiograph round trip


def _chest_like() -> Radiograph:
    a = np.full((40, 50), 0.15)
    a[:, 22:28] = 0.9  # a vertical "spine": dense, must come back bright
    a[5:10, 5:10] = 0.5
    return Radiograph(array=a.astype(np.float32), spacing=(0.14, 0.15), source=Path("<mem>"), view="AP")


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_radiograph_round_trip_bone_bright(tmp_path, photometric):
    rad = _chest_like()
    p = write_dicom_radiograph(rad, tmp_path / "cxr.dcm", patient=PATIENT, study_date="20240115",
                               uid_seed="r", photometric=photometric)
    raw = pydicom.dcmread(p).pixel_array.astype(np.float64)
    spine_raw, soft_raw = raw[:, 22:28].mean(), raw[:, :20].mean()
    # the file really stores the photometric it claims (so the loader's inversion is exercised)
    assert (spine_raw > soft_raw) == (photometric == "MONOCHROME2")

    out = load_dicom_image(p)
    assert out.array.dtype == np.float32
    assert 0.0 <= out.array.min() and out.array.max() <= 1.0
    np.testing.assert_allclose(out.array, rad.array, atol=2e-5)
    assert out.array[:, 22:28].mean() > out.array[:, :20].mean() + 0.5
    assert out.spacing == pytest.approx((0.14, 0.15))
    assert out.view == "AP"
    assert out.metadata["photometric_interpretation"] == photometric


def test_monochrome1_without_window_still_bone_bright(tmp_path):
    rad = _chest_like()
    p = write_dicom_radiograph(rad, tmp_path / "cxr.dcm", patient=PATIENT, study_date="20240115",
                               uid_seed="r", photometric="MONOCHROME1")

    def strip(ds):
        for kw in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
            delattr(ds, kw)

    _edit(p, strip)
    out = load_dicom_image(p)
    assert out.metadata["intensity_normalisation"] == "minmax"
    assert out.array[:, 22:28].mean() > out.array[:, :20].mean() + 0.5
    assert out.array.max() == pytest.approx(1.0) and out.array.min() == pytest.approx(0.0)


def test_radiograph_non_dicom_file_named_dcm(tmp_path):
    p = tmp_path / "cxr.dcm"
    p.write_text("hello")
    with pytest.raises(CaseDataError) as e:
        load_dicom_image(p)
    assert e.value.file == str(p)


# ---------------------------------------------------------------------------------------------
# orientation: the same anatomy stored with other slice orientations must load identically


def _axis_of(d) -> tuple[int, int]:
    """(world axis 0=x/1=y/2=z, sign) of an axis-aligned unit vector."""
    w = int(np.argmax(np.abs(d)))
    return w, int(np.sign(d[w]))


def _write_oriented(vol: Volume, folder: Path, row_dir, col_dir) -> None:
    """Write canonical `vol` as slices whose IOP is (row_dir, col_dir), built independently of the loader.

    DICOM: column index c moves along row_dir, row index r along col_dir, slice k along normal.
    """
    template = _write(Volume(vol.array[:1], vol.spacing, vol.source, vol.origin), folder / "_tmpl")[0]
    base = pydicom.dcmread(template)
    shutil.rmtree(folder / "_tmpl")
    row_dir, col_dir = np.asarray(row_dir, float), np.asarray(col_dir, float)
    normal = np.cross(row_dir, col_dir)
    new_axes = [normal, col_dir, row_dir]  # stack axes (slice, row, col)
    canon_axis = {0: 2, 1: 1, 2: 0}  # world x -> array axis 2, y -> 1, z -> 0
    sp_world = {0: vol.spacing[2], 1: vol.spacing[1], 2: vol.spacing[0]}
    ws = [_axis_of(d) for d in new_axes]
    arr = np.transpose(vol.array, [canon_axis[w] for w, _ in ws])
    for i, (_, s) in enumerate(ws):
        if s < 0:
            arr = np.flip(arr, axis=i)
    n_slices, rows, cols = arr.shape
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n_slices):
        # canonical index of stack voxel (k, 0, 0)
        cidx = [0, 0, 0]  # per world axis x, y, z
        for stack_i, (w, s) in enumerate(ws):
            along = k if stack_i == 0 else 0
            cidx[w] = along if s > 0 else vol.array.shape[canon_axis[w]] - 1 - along
        pos = [vol.origin[w] + cidx[w] * sp_world[w] for w in range(3)]
        ds = base.copy()
        ds.SOPInstanceUID = make_uid("orient", k)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageOrientationPatient = [*row_dir.tolist(), *col_dir.tolist()]
        ds.ImagePositionPatient = [round(v, 4) for v in pos]
        ds.PixelSpacing = [sp_world[ws[1][0]], sp_world[ws[2][0]]]
        ds.Rows, ds.Columns = rows, cols
        ds.InstanceNumber = n_slices - k
        stored = (np.rint(arr[k]) - float(ds.RescaleIntercept)).astype("<i2")
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        ds.save_as(folder / f"S{(k * 7919) % 1000:03d}_{k}.dcm")


@pytest.mark.parametrize("row_dir,col_dir,orientation", [
    ([1, 0, 0], [0, 1, 0], "axial"),          # standard
    ([-1, 0, 0], [0, -1, 0], "axial"),        # in-plane rotated 180 degrees
    ([1, 0, 0], [0, -1, 0], "axial"),         # slice normal points to the feet
    ([1, 0, 0], [0, 0, -1], "coronal"),
    ([0, 1, 0], [0, 0, -1], "sagittal"),
    ([0, -1, 0], [-1, 0, 0], "axial"),        # rows and columns swapped
])
def test_orientations_give_the_same_lps_array(tmp_path, row_dir, col_dir, orientation):
    vol = _phantom(shape=(5, 7, 9), seed=3)
    vol.array[:] = -1000.0
    marker = (1, 2, 6)  # z (inferior half), y (anterior), x (patient's left half)
    vol.array[marker] = 1500.0
    vol.array[3, 5, 1] = 500.0  # a second, different marker: catches any mirror
    _write_oriented(vol, tmp_path / "o", row_dir, col_dir)
    out = load_dicom_series(tmp_path / "o")
    assert out.metadata["orientation"] == orientation
    assert out.shape == vol.shape
    assert tuple(np.argwhere(out.array == 1500.0)[0]) == marker
    assert tuple(np.argwhere(out.array == 500.0)[0]) == (3, 5, 1)
    np.testing.assert_array_equal(out.array, vol.array)
    assert out.spacing == pytest.approx(SPACING)
    assert out.origin == pytest.approx(ORIGIN, abs=1e-3)


def test_oblique_series_accepted_and_recorded(tmp_path):
    vol = _phantom()
    paths = _write(vol, tmp_path / "s")
    a = np.radians(5.0)
    row, col = [np.cos(a), np.sin(a), 0.0], [-np.sin(a), np.cos(a), 0.0]
    for p in paths:
        _edit(p, lambda ds: setattr(ds, "ImageOrientationPatient", [*row, *col]))
    out = load_dicom_series(tmp_path / "s")
    assert out.metadata["obliquity_deg"] == pytest.approx(5.0, abs=0.01)
    assert os.fspath(out.source) == os.fspath(tmp_path / "s")


def test_patient_position_does_not_reorient(tmp_path):
    """Feet-first patients: IOP/IPP are already in patient coordinates, so PatientPosition changes nothing."""
    vol = _phantom()
    paths = _write(vol, tmp_path / "s")
    for p in paths:
        _edit(p, lambda ds: setattr(ds, "PatientPosition", "FFS"))
    out = load_dicom_series(tmp_path / "s")
    assert out.metadata["patient_position"] == "FFS"
    assert np.max(np.abs(out.array - vol.array)) <= 0.5 + 1e-3
