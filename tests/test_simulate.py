"""Tests of heiindex.simulate, the coco-sim region-feature simulator, on real COCO caption lines."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pipeline_fixtures as pf  # tests/ is on sys.path (pytest rootdir-relative import)
import pytest

from heiindex import simulate as sim
from heiindex.errors import DataError
from heiindex.precomp import PrecompSplit, read_captions
from heiindex.settings import SettingError
from heiindex.simulate import (
    CLUTTER_CONCEPTS,
    STOP_WORDS,
    SimConfig,
    caption_concepts,
    concept_vector,
    image_concepts,
    normalize_word,
    simulate_images,
    write_coco_sim_precomp,
)
from heiindex.tokenizer import tokenize

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS_DIR = ROOT / "data" / "coco-captions"
SMALL = SimConfig(feature_dim=64)  # SCAN's 36 regions, fewer dimensions: fast


@pytest.fixture(scope="module")
def testall() -> list[str]:
    return read_captions(CAPTIONS_DIR / "testall_caps.txt")


@pytest.fixture(scope="module")
def captions(testall) -> list[str]:
    return testall[:100]  # 20 images


def _features(captions: list[str], path: Path, config: SimConfig = SMALL, **kw) -> np.ndarray:
    simulate_images(captions, path, config, **kw)
    return np.load(path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shape_dtype_nonnegative(captions, tmp_path):
    x = _features(captions, tmp_path / "a.npy")
    assert x.shape == (20, 36, 64)
    assert x.dtype == np.float32
    assert np.isfinite(x).all()
    assert x.min() == 0.0  # ReLU: non-negative, with exact zeros like pooled CNN features
    assert 0.2 < (x == 0).mean() < 0.8
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed


def test_full_size_shape_opens_as_precomp(testall, tmp_path):
    lines = testall[:15]
    simulate_images(lines, tmp_path / "test_ims.npy")
    (tmp_path / "test_caps.txt").write_text("".join(line + "\n" for line in lines))
    split = PrecompSplit.open(tmp_path, "test")  # checks 36 x 2048 and 5 captions per image
    assert (split.n_images, split.regions, split.feature_dim, split.dtype) == (3, 36, 2048, np.float32)
    ((start, block),) = list(split.iter_image_blocks(8))
    assert start == 0 and block.shape == (3, 36, 2048) and block.min() >= 0


def test_same_bytes_on_two_runs_and_any_block_size(captions, tmp_path):
    simulate_images(captions, tmp_path / "a.npy", SMALL)
    simulate_images(captions, tmp_path / "b.npy", SMALL)
    simulate_images(captions, tmp_path / "c.npy", SMALL, block_images=3)
    simulate_images(captions, tmp_path / "d.npy", SMALL, block_images=1)
    digests = {_sha256(tmp_path / f"{n}.npy") for n in "abcd"}
    assert len(digests) == 1


def test_same_bytes_under_another_hash_seed(captions, tmp_path):
    # Concept vectors and image streams come from sha256, not from Python's hash().
    simulate_images(captions[:20], tmp_path / "here.npy", SMALL)
    code = (
        "import sys; from pathlib import Path; from heiindex.simulate import SimConfig, simulate_images; "
        "simulate_images(sys.argv[2:], Path(sys.argv[1]), SimConfig(feature_dim=64))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "there.npy"), *captions[:20]], check=True, env=env)
    assert _sha256(tmp_path / "here.npy") == _sha256(tmp_path / "there.npy")


def test_an_image_depends_only_on_its_own_captions(captions, tmp_path):
    full = _features(captions, tmp_path / "full.npy")
    part = _features(captions[35:60], tmp_path / "part.npy")  # images 7..11, alone
    assert np.array_equal(part, full[7:12])
    rev = [line for i in reversed(range(20)) for line in captions[5 * i : 5 * i + 5]]
    assert np.array_equal(_features(rev, tmp_path / "rev.npy"), full[::-1])


def test_other_seed_changes_bytes(captions, tmp_path):
    a = _features(captions, tmp_path / "a.npy")
    b = _features(captions, tmp_path / "b.npy", dataclasses.replace(SMALL, seed=1))
    assert a.shape == b.shape
    assert not np.array_equal(a, b)
    assert not np.array_equal(concept_vector("dog", SMALL), concept_vector("dog", dataclasses.replace(SMALL, seed=1)))


def test_concept_vector():
    v = concept_vector("dog")
    assert v.shape == (2048,) and v.dtype == np.float32 and v.min() >= 0
    assert np.sqrt(np.mean(v.astype(np.float64) ** 2)) == pytest.approx(1.0, rel=1e-5)
    assert 0.08 < (v > 0).mean() < 0.12  # concept_density 0.1
    np.testing.assert_array_equal(v, concept_vector("dog"))
    w = concept_vector("cat")
    assert float(v @ w) / float(np.linalg.norm(v) * np.linalg.norm(w)) < 0.15  # distinct concepts: near-orthogonal


def _grounding(x: np.ndarray, captions: list[str], config: SimConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """Per image: mean over its mentioned concepts of the best region cosine, the same for
    concepts of other images that it neither mentions nor has in the clutter pool, and the t2i
    R@1 of an oracle that scores a caption by that mean over its own concepts."""
    n = x.shape[0]
    xn = x / np.linalg.norm(x, axis=2, keepdims=True)
    per_image = [image_concepts(captions[5 * i : 5 * i + 5]) for i in range(n)]
    names = sorted({c for d in per_image for c in d})
    row = {c: k for k, c in enumerate(names)}
    v = np.stack([concept_vector(c, config) for c in names])
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    best = np.einsum("cd,ird->cir", v, xn).max(axis=2)  # (concepts, images)
    mentioned = np.array([best[[row[c] for c in d], i].mean() for i, d in enumerate(per_image)])
    other = np.array(
        [
            best[[row[c] for c in names if c not in d and c not in CLUTTER_CONCEPTS], i].mean()
            for i, d in enumerate(per_image)
        ]
    )
    scores = np.stack([best[[row[c] for c in caption_concepts(line)]].mean(axis=0) for line in captions])
    r1 = float((scores.argmax(axis=1) == np.arange(len(captions)) // 5).mean())
    return mentioned, other, r1


def test_regions_are_grounded_in_the_captions(captions, tmp_path):
    x = _features(captions, tmp_path / "a.npy")
    mentioned, other, r1 = _grounding(x, captions, SMALL)
    # Measured at feature_dim 64: mentioned ~0.75, other ~0.43, oracle R@1 0.93.
    assert mentioned.mean() > 0.65
    assert mentioned.mean() - other.mean() > 0.2
    assert (mentioned - other > 0.1).all()  # every image, not just on average
    assert r1 >= 0.8


@pytest.mark.parametrize(
    "knob, values",
    [("noise", [0.0, 2.0, 6.0]), ("drop_prob", [0.0, 0.4, 0.8]), ("background_regions", [0, 12, 24])],
)
def test_difficulty_knobs_are_monotone(captions, tmp_path, knob, values):
    gaps = []
    for value in values:
        config = dataclasses.replace(SMALL, **{knob: value})
        mentioned, other, _ = _grounding(_features(captions, tmp_path / "a.npy", config), captions, config)
        gaps.append(mentioned.mean() - other.mean())
    assert gaps[0] > gaps[1] > gaps[2], gaps


def test_clutter_regions_show_unmentioned_concepts(captions, tmp_path):
    config = dataclasses.replace(SMALL, clutter_regions=10)
    x = _features(captions, tmp_path / "a.npy", config)
    xn = x / np.linalg.norm(x, axis=2, keepdims=True)
    pool = np.stack([concept_vector(c, config) for c in CLUTTER_CONCEPTS])
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    best = np.einsum("cd,ird->cir", pool, xn).max(axis=2)  # (pool, images)
    for i in range(x.shape[0]):
        mentioned = image_concepts(captions[5 * i : 5 * i + 5])
        unmentioned = [k for k, c in enumerate(CLUTTER_CONCEPTS) if c not in mentioned]
        # ~10 of the ~130 unmentioned pool concepts have a region of their own
        assert (best[unmentioned, i] > 0.6).sum() >= 8


def test_plural_and_singular_share_a_concept():
    pairs = {
        "dogs": "dog",
        "buses": "bus",
        "puppies": "puppy",
        "boxes": "box",
        "benches": "bench",
        "dishes": "dish",
        "glasses": "glass",
        "horses": "horse",
        "men": "man",
        "women": "woman",
        "people": "person",
        "knives": "knife",
        "cookies": "cookie",
        "tomatoes": "tomato",
        "shoes": "shoe",
        "skis": "ski",
        "taxis": "taxi",
    }
    for plural, singular in pairs.items():
        assert normalize_word(plural) == singular
        assert normalize_word(singular) == singular  # a fixed point: the singular is the concept
    for word in ("bus", "grass", "glass", "tennis", "cactus", "dress"):
        assert normalize_word(word) == word
    assert caption_concepts("Two dogs and a dog's puppies on the grass.") == ["dog", "puppy", "grass"]
    counts = image_concepts(["A dog on a bus.", "Two dogs near buses", "Puppies, 3 of them!", "a puppy", "the cat"])
    assert counts == {"dog": 2, "bus": 2, "puppy": 2, "cat": 1}
    np.testing.assert_array_equal(concept_vector(normalize_word("dogs"), SMALL), concept_vector("dog", SMALL))


def test_stop_words_punctuation_and_numbers_are_not_concepts():
    assert caption_concepts("There are 2 of them, on the table; in a picture!") == ["table"]
    assert caption_concepts("A man cannot ride a bike at 3.5 mph.") == ["man", "ride", "bike", "mph"]
    assert "the" in STOP_WORDS and "picture" in STOP_WORDS
    for concept in CLUTTER_CONCEPTS:  # the clutter pool holds concepts, as caption_concepts makes them
        assert normalize_word(concept) == concept and concept not in STOP_WORDS
    assert len(set(CLUTTER_CONCEPTS)) == len(CLUTTER_CONCEPTS)


def test_fast_tokens_give_the_same_concepts_as_tokenize(testall, monkeypatch):
    lines = testall[:1500] + read_captions(CAPTIONS_DIR / "dev_caps.txt")[:500]
    lines += ["A man cannot ride.", "Gonna eat a hot dog .", "we wanna go", "Dogs, cats and 'the' birds."]
    fast = [caption_concepts(line) for line in lines]
    monkeypatch.setattr(sim, "_tokens", tokenize)
    assert fast == [caption_concepts(line) for line in lines]


def test_a_numpy_integer_setting_writes_a_readable_file(captions, tmp_path):
    """feature_dim=np.int64(64) wrote the header shape (5, 36, np.int64(64)), which np.load refused."""
    config = SimConfig(feature_dim=np.int64(64))
    assert type(config.feature_dim) is int and config == SMALL
    simulate_images(captions[:10], tmp_path / "a.npy", config)
    assert np.load(tmp_path / "a.npy").shape == (2, 36, 64)


def test_bad_input_is_refused(captions, tmp_path):
    with pytest.raises(ValueError, match="multiple of captions_per_image"):
        simulate_images(captions[:7], tmp_path / "a.npy", SMALL)
    with pytest.raises(ValueError, match="drop_prob"):
        SimConfig(drop_prob=1.0)
    with pytest.raises(ValueError, match="at least one"):
        SimConfig(regions=12, clutter_regions=4, background_regions=8)
    assert not list(tmp_path.iterdir())


def _write_captions_dir(path: Path, testall: list[str], dev: list[str]) -> Path:
    path.mkdir()
    (path / "testall_caps.txt").write_text("".join(line + "\n" for line in testall))
    (path / "dev_caps.txt").write_text("".join(line + "\n" for line in dev))
    return path


def test_write_coco_sim_precomp(testall, tmp_path):
    # 1,002 real testall images (1,000 test + 2 train) and 2 dev images; tiny regions and features.
    config = SimConfig(regions=6, feature_dim=8, clutter_regions=1, background_regions=2)
    src = _write_captions_dir(tmp_path / "src", testall[:5010], testall[5010:5020])
    out = tmp_path / "sets" / "coco-sim"
    counts = write_coco_sim_precomp(src, out, config)
    assert counts == {"train": 2, "dev": 2, "test": 1000}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s}_{k}" for s in counts for k in ("caps.txt", "ims.npy")] + ["coco_sim.json"]
    )
    assert [p.name for p in out.parent.iterdir()] == ["coco-sim"]  # no temporary folder left beside it
    expected_lines = {"train": testall[5000:5010], "dev": testall[5010:5020], "test": testall[:5000]}
    for split, n in counts.items():
        s = PrecompSplit.open(out, split, regions=6, feature_dim=8)
        assert s.n_images == n and s.rows_per_image == 1
        assert list(s.captions) == expected_lines[split]
    # An image's features depend only on its captions: test = the first 1,000 images of testall.
    test = np.load(out / "test_ims.npy")
    np.testing.assert_array_equal(test[:4], _features(testall[:20], tmp_path / "x.npy", config))
    digest = _sha256(out / "train_ims.npy")

    # A second run replaces the folder, with identical bytes.
    write_coco_sim_precomp(src, out, config)
    assert _sha256(out / "train_ims.npy") == digest
    assert [p.name for p in out.parent.iterdir()] == ["coco-sim"]

    # A folder that holds anything else is not replaced.
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="notes.txt"):
        write_coco_sim_precomp(src, out, config)
    assert (out / "notes.txt").exists()


def test_write_coco_sim_precomp_refuses_short_testall(testall, tmp_path):
    src = _write_captions_dir(tmp_path / "src", testall[:5000], testall[5000:5010])
    with pytest.raises(DataError, match="more than 5000"):
        write_coco_sim_precomp(src, tmp_path / "out", SMALL)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("word, want", [("gas", "gas"), ("vies", "vie"), ("buzzes", "buzz")])
def test_normalize_word(word, want):
    assert normalize_word(word) == want


def test_sim_config_bounds():
    with pytest.raises(ValueError, match="concept_density"):
        SimConfig(concept_density=0)
    # refused by name; each was accepted and failed later, or wrote NaN features
    for kw, message in (
        ({"seed": True}, "seed must be a whole number, at least 0, got True"),
        ({"regions": 36.0}, "regions must be a whole number, at least 1, got 36.0"),
        ({"clutter_regions": 1.5}, "clutter_regions must be a whole number"),
        ({"noise": float("inf")}, "noise must be a finite number, at least 0, got inf"),
        ({"noise": "1"}, "noise must be a finite number"),
        ({"drop_prob": 1.0}, "drop_prob must be a finite number, at least 0, less than 1, got 1.0"),
    ):
        with pytest.raises(SettingError, match="^" + re.escape(message)):
            SimConfig(**kw)
    too_many = len(CLUTTER_CONCEPTS) // 2 + 1
    with pytest.raises(ValueError, match="clutter_regions"):
        SimConfig(clutter_regions=too_many, regions=too_many + 20)


def test_simulated_features_are_pinned_for_version_1(tmp_path):
    lines = read_captions(pf.CAPTIONS)[:10]
    simulate_images(lines, tmp_path / "x.npy", SimConfig(regions=16, feature_dim=64))
    digest = hashlib.sha256((tmp_path / "x.npy").read_bytes()).hexdigest()
    assert digest == PINNED_SIM_SHA


PINNED_SIM_SHA = "114590f20041c2cf0cf471c3d5fe3870282bdb9b8415402bdc3aedcf7d6f79da"


def test_a_file_put_in_the_output_during_the_build_is_kept(tmp_path, monkeypatch):
    caps = tmp_path / "caps"
    caps.mkdir()
    lines = list(pf.caption_lines()[:15])
    (caps / "testall_caps.txt").write_text("\n".join(lines[:10]) + "\n")
    (caps / "dev_caps.txt").write_text("\n".join(lines[10:15]) + "\n")
    out = tmp_path / "out"
    monkeypatch.setattr(sim, "TEST_IMAGES", 1)

    def fake(lines, path, *a):
        path.write_bytes(b"x")
        out.mkdir(exist_ok=True)
        (out / "notes.txt").write_text("mine")

    monkeypatch.setattr(sim, "_simulate_images", fake)
    with pytest.raises(DataError, match="notes.txt"):
        sim.write_coco_sim_precomp(caps, out)
    assert (out / "notes.txt").read_text() == "mine"
