"""The procedural chest phantom: anatomy in plausible HU, findings planted where and as asked."""
import numpy as np
import pytest

from core.synth.chest import FINDING_KEYS, METAL_HU, METAL_KINDS, ORGAN_LABELS, PlantedFinding, make_chest_phantom

SHAPE, SPACING = (48, 80, 80), (5.0, 4.5, 4.5)


def _ph(findings=(), seed=0, **kw):
    return make_chest_phantom(np.random.default_rng(seed), list(findings), shape=SHAPE, spacing=SPACING, **kw)


@pytest.fixture(scope="module")
def normal():
    return _ph()


@pytest.mark.parametrize("organ,lo,hi", [("lung_right", -900, -780), ("lung_left", -900, -780), ("heart", 20, 70),
                                         ("liver", 40, 80), ("ribs", 300, 1000), ("trachea", -1001, -950)])
def test_organ_hu_ranges(normal, organ, lo, hi):
    m = normal.organs == ORGAN_LABELS[organ]
    assert m.sum() > 0
    assert lo <= normal.hu[m].mean() <= hi


def test_lps_orientation(normal):
    # x grows to the patient's left: the heart sits left of midline; y grows posterior: spine behind heart.
    zz, yy, xx = np.nonzero(normal.organs == ORGAN_LABELS["heart"])
    assert xx.mean() > SHAPE[2] / 2
    _, sy, _ = np.nonzero(normal.organs == ORGAN_LABELS["spine"])
    assert sy.mean() > yy.mean()
    # z grows superior: the liver is at the bottom, the trachea at the top.
    lz = np.nonzero(normal.organs == ORGAN_LABELS["liver"])[0].mean()
    tz = np.nonzero(normal.organs == ORGAN_LABELS["trachea"])[0].mean()
    assert lz < tz
    # lung_right is on the patient's right (small x)
    assert np.nonzero(normal.organs == ORGAN_LABELS["lung_right"])[2].mean() < SHAPE[2] / 2


def test_lung_volumes_are_adult_sized(normal):
    ml = np.prod(SPACING) / 1000
    for side in ("lung_right", "lung_left"):
        v = (normal.organs == ORGAN_LABELS[side]).sum() * ml
        assert 1200 < v < 3500, (side, v)


@pytest.mark.parametrize("key", FINDING_KEYS)
def test_every_finding_is_planted_and_measured(key):
    ph = _ph([PlantedFinding(key, "left", severity=0.7)], contrast=key == "pulmonary_embolus")
    (f,) = ph.findings
    assert f["key"] == key and f["mask_label"] == 1
    m = ph.lesions == 1
    assert m.sum() > 0 and f["volume_ml"] > 0
    assert f["mean_hu"] == pytest.approx(float(ph.hu[m].mean()), abs=0.2)
    z0, y0, x0, z1, y1, x1 = f["bbox"]
    assert m[z0:z1, y0:y1, x0:x1].sum() == m.sum()


@pytest.mark.parametrize("key,lo,hi", [("lung_nodule", 0, 60), ("pleural_effusion", -10, 30), ("emphysema", -1001, -930),
                                       ("pneumothorax", -1001, -990), ("ground_glass_opacity", -700, -500)])
def test_findings_have_their_radiological_density(key, lo, hi):
    f = _ph([PlantedFinding(key, "right", severity=0.6)]).findings[0]
    assert lo <= f["mean_hu"] <= hi


def test_sided_findings_land_on_their_side():
    for side in ("right", "left"):
        ph = _ph([PlantedFinding("lung_nodule", side, severity=0.5)], seed=3)
        xs = np.nonzero(ph.lesions == 1)[2]
        assert (xs.mean() < SHAPE[2] / 2) == (side == "right")
        assert ph.findings[0]["location"].startswith(side) or ph.findings[0]["location"] == "lingula"


def test_nodule_size_follows_request():
    small = _ph([PlantedFinding("lung_nodule", "right", size_mm=10)], seed=2).findings[0]
    big = _ph([PlantedFinding("lung_nodule", "right", size_mm=25)], seed=2).findings[0]
    assert small["size_mm"] == 10 and big["size_mm"] == 25
    assert big["volume_ml"] > 5 * small["volume_ml"]


def test_cardiomegaly_widens_the_heart(normal):
    big = _ph([PlantedFinding("cardiomegaly", severity=0.8)])

    def width(ph):
        return np.ptp(np.nonzero(ph.organs == ORGAN_LABELS["heart"])[2])

    assert width(big) > 1.2 * width(normal)


def test_embolus_is_a_filling_defect_only_with_contrast():
    ph = _ph([PlantedFinding("pulmonary_embolus", "right")], contrast=True)
    pa = (ph.organs == ORGAN_LABELS["pulmonary_artery"]) & (ph.lesions == 0)
    clot = ph.lesions == 1
    assert ph.hu[pa].mean() > 200 and ph.hu[clot].mean() < 80


@pytest.mark.parametrize("kind", METAL_KINDS)
def test_metal_hardware(kind):
    ph = _ph(metal=kind)
    assert ph.metal.sum() > 10 and ph.metal_kind == kind
    assert np.all(ph.hu[ph.metal] == METAL_HU)


def test_deterministic_for_a_seed_and_varies_across_seeds():
    a = _ph([PlantedFinding("lung_mass", "left")], seed=5)
    b = _ph([PlantedFinding("lung_mass", "left")], seed=5)
    c = _ph([PlantedFinding("lung_mass", "left")], seed=6)
    assert np.array_equal(a.hu, b.hu) and a.findings == b.findings
    assert not np.array_equal(a.lesions, c.lesions)


def test_unknown_keys_are_refused():
    with pytest.raises(ValueError, match="unknown finding"):
        _ph([PlantedFinding("dragon")])
    with pytest.raises(ValueError, match="metal"):
        _ph(metal="titanium_knee")
