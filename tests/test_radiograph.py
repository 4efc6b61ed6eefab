"""PNG / DICOM radiograph loader: [0, 1] intensities, pHYs spacing, RGB conversion, corrupt files."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.errors import CaseDataError
from core.imaging.dicom import DEFAULT_RADIOGRAPH_SPACING_MM, write_dicom_radiograph
from core.imaging.radiograph import load_png, load_radiograph, write_radiograph_png
from core.imaging.types import Radiograph


def _ramp8() -> np.ndarray:
    return np.tile(np.arange(256, dtype=np.uint8), (4, 1))  # every 8-bit value


def test_8bit_png_maps_to_unit_range(tmp_path):
    a = _ramp8()
    p = tmp_path / "x.png"
    Image.fromarray(a, mode="L").save(p)
    r = load_radiograph(p)
    assert r.array.dtype == np.float32
    assert r.array.shape == a.shape
    np.testing.assert_allclose(r.array, a / 255.0, atol=1e-7)
    assert r.array.min() == 0.0 and r.array.max() == 1.0
    assert r.metadata["bit_depth"] == 8
    assert r.metadata["spacing_source"] == "default" and r.metadata["spacing_assumed"] is True
    assert r.spacing == (DEFAULT_RADIOGRAPH_SPACING_MM, DEFAULT_RADIOGRAPH_SPACING_MM)
    assert r.view == "PA" and r.metadata["view_assumed"] is True


def test_16bit_png_uses_full_16_bit_range(tmp_path):
    a = np.array([[0, 1, 256, 4095], [32768, 65534, 65535, 12345]], dtype=np.uint16)
    p = tmp_path / "x16.png"
    Image.fromarray(a).save(p)
    with Image.open(p) as im:  # guard: really a 16-bit PNG on disk
        assert im.mode.startswith("I")
    r = load_radiograph(p)
    assert r.metadata["bit_depth"] == 16
    np.testing.assert_allclose(r.array, a / 65535.0, rtol=0, atol=1e-7)
    # a 12-bit detector image stored in 16 bits is NOT stretched: its max stays 4095/65535
    assert r.array[0, 3] == pytest.approx(4095 / 65535)


@pytest.mark.parametrize("spacing", [(0.2, 0.2), (0.143, 0.175), (0.5, 0.1)])
def test_png_phys_spacing_round_trip(tmp_path, spacing):
    rng = np.random.default_rng(0)
    rad = Radiograph(array=rng.random((30, 40)).astype(np.float32), spacing=spacing, source=Path("<mem>"))
    p = write_radiograph_png(rad, tmp_path / "r.png")
    out = load_radiograph(p, spacing=9.9)  # pHYs wins over the argument
    assert out.metadata["spacing_source"] == "png_phys"
    # pHYs stores whole pixels per metre, so spacing comes back to ~1e-4 relative
    assert out.spacing == pytest.approx(spacing, rel=2e-4)
    np.testing.assert_allclose(out.array, rad.array, atol=1 / 65535)
    assert out.array.shape == (30, 40)


def test_spacing_argument_used_without_phys(tmp_path):
    p = tmp_path / "x.png"
    Image.fromarray(_ramp8(), mode="L").save(p)
    r = load_radiograph(p, spacing=(0.15, 0.16), view="lateral")
    assert r.spacing == (0.15, 0.16)
    assert r.metadata["spacing_source"] == "argument"
    assert r.view == "LAT"
    with pytest.raises(CaseDataError) as e:
        load_radiograph(p, spacing=-1)
    assert e.value.field == "spacing"


def test_implausible_phys_is_ignored(tmp_path):
    p = tmp_path / "x.png"
    Image.fromarray(_ramp8(), mode="L").save(p, dpi=(72, 72))  # 0.35 mm pixels: plausible
    assert load_radiograph(p).metadata["spacing_source"] == "png_phys"
    q = tmp_path / "y.png"
    Image.fromarray(_ramp8(), mode="L").save(q, dpi=(1, 1))  # 25.4 mm pixels: not a radiograph
    r = load_radiograph(q)
    assert r.metadata["spacing_source"] == "default"


def test_gray_rgb_png_converted_exactly(tmp_path):
    a = _ramp8()
    p = tmp_path / "rgb.png"
    Image.fromarray(np.stack([a, a, a], axis=-1), mode="RGB").save(p)
    r = load_radiograph(p)
    assert r.array.ndim == 2
    np.testing.assert_allclose(r.array, a / 255.0, atol=1e-7)
    assert r.metadata["converted_from"] == "RGB"


def test_colour_png_converted_to_luma(tmp_path):
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[0, 2] = (0, 0, 255)
    rgb[1, :] = (255, 255, 255)
    p = tmp_path / "c.png"
    Image.fromarray(rgb, mode="RGB").save(p)
    r = load_radiograph(p)
    np.testing.assert_allclose(r.array[0], [0.299, 0.587, 0.114], atol=1e-6)
    np.testing.assert_allclose(r.array[1], 1.0, atol=1e-6)
    assert r.metadata["converted_from"] == "RGB"


def test_rgba_and_gray_alpha_pngs(tmp_path):
    a = _ramp8()
    p = tmp_path / "la.png"
    Image.fromarray(np.stack([a, np.full_like(a, 128)], -1), mode="LA").save(p)
    np.testing.assert_allclose(load_radiograph(p).array, a / 255.0, atol=1e-7)
    q = tmp_path / "rgba.png"
    Image.fromarray(np.stack([a, a, a, np.full_like(a, 10)], -1), mode="RGBA").save(q)
    np.testing.assert_allclose(load_radiograph(q).array, a / 255.0, atol=1e-7)


@pytest.mark.parametrize("cut", [40, 0.5])
def test_truncated_png_names_the_file(tmp_path, cut):
    rng = np.random.default_rng(1)
    good = tmp_path / "good.png"
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8), mode="L").save(good)
    data = good.read_bytes()
    n = cut if isinstance(cut, int) else int(len(data) * cut)
    bad = tmp_path / "bad.png"
    bad.write_bytes(data[:n])
    with pytest.raises(CaseDataError) as e:
        load_radiograph(bad)
    assert e.value.file == str(bad)
    assert "\n" not in str(e.value)


def test_corrupt_png_body_names_the_file(tmp_path):
    rng = np.random.default_rng(2)
    good = tmp_path / "good.png"
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8), mode="L").save(good)
    data = bytearray(good.read_bytes())
    idat = data.index(b"IDAT")
    data[idat + 8: idat + 60] = bytes(52)  # zero the start of the compressed stream
    bad = tmp_path / "bad.png"
    bad.write_bytes(bytes(data))
    with pytest.raises(CaseDataError) as e:
        load_radiograph(bad)
    assert e.value.file == str(bad)


def test_not_a_png(tmp_path):
    t = tmp_path / "notes.png"
    t.write_text("not an image")
    with pytest.raises(CaseDataError) as e:
        load_radiograph(t)
    assert e.value.file == str(t)
    j = tmp_path / "photo.jpg"
    Image.fromarray(_ramp8(), mode="L").save(j, format="JPEG")
    with pytest.raises(CaseDataError) as e:
        load_png(j)
    assert "JPEG" in e.value.problem
    with pytest.raises(CaseDataError, match="not found"):
        load_radiograph(tmp_path / "absent.png")


def test_dicom_is_sniffed_without_suffix(tmp_path):
    a = np.linspace(0, 1, 200, dtype=np.float32).reshape(10, 20)
    rad = Radiograph(array=a, spacing=(0.15, 0.15), source=Path("<mem>"), view="PA")
    p = write_dicom_radiograph(rad, tmp_path / "cxr.dcm", patient={"name": "X^Y", "id": "1"},
                               study_date="20240101", uid_seed="s")
    noext = tmp_path / "image0001"
    shutil.copy(p, noext)
    r = load_radiograph(noext)
    assert r.metadata["source_format"] == "dicom"
    np.testing.assert_allclose(r.array, a, atol=2e-5)
    assert r.spacing == pytest.approx((0.15, 0.15))
