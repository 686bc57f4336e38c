"""The "coco-sim" simulator: SCAN-format region features grounded in real COCO captions.

The bundled dataset has real captions but no image features. This module writes, for each
image, ``regions`` non-negative feature vectors built from the *concepts* its captions mention,
so that a matcher trained on them must learn the same thing it learns on real features: which
words go with which regions.

How one image is made (all randomness from the seed and the image's own captions):

1. Concepts: the content words of the image's captions (``heiindex.tokenizer.tokenize``, minus
   ``STOP_WORDS``, punctuation and numbers), each normalised by ``normalize_word`` so that
   plural and singular share one concept (dogs/dog, buses/bus, puppies/puppy, men/man). A
   concept's *count* is the number of the image's captions that mention it (1 to 5).
2. Every concept string has a fixed sparse, non-negative vector (``concept_vector``) seeded from
   ``sha256(seed, concept)``: the same word has the same vector in every split and every run.
3. A mentioned concept is missing from the image with probability ``drop_prob ** count`` (what
   one caption mentions may not be visible; what all five mention nearly always is).
4. Regions: ``clutter_regions`` regions show distinct *unmentioned* concepts drawn from
   ``CLUTTER_CONCEPTS`` (common COCO objects); ``background_regions`` regions mix two of
   ``background_prototypes`` vectors shared by all images; the rest go to the kept mentioned
   concepts, each at least once while regions last, the remainder in proportion to the count.
   Every object or clutter region blends in a second concept of the same image with weight
   ``U(0, mix)``; every region gets a log-normal magnitude (``region_scale_jitter``), uniform
   noise of standard deviation ``noise`` per dimension, and a ReLU (so features are >= 0 with
   about 45% zeros at the defaults, like pooled CNN features). Region order is shuffled.

Determinism: an image's random stream is seeded from ``sha256(seed, its captions)``, never from
a shared sequential stream, so its bytes do not depend on the block size, on the order of
generation, or on which split file it is written to (test images of ``testall`` come out
byte-identical in ``test_ims.npy``). The output is written block by block: memory stays at one
block of images.

What this module must not do: train or score anything, or change the caption text (caption
files are copied a line per caption, each stripped of its surrounding whitespace; blank lines at
the end are dropped).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .outputs import atomic_dir
from .precomp import read_captions
from .settings import SettingError, require_path, settle
from .tokenizer import tokenize

__all__ = [
    "CLUTTER_CONCEPTS",
    "STOP_WORDS",
    "SimConfig",
    "caption_concepts",
    "concept_vector",
    "image_concepts",
    "normalize_word",
    "simulate_images",
    "write_coco_sim_precomp",
]

# Bumped whenever a change alters the bytes produced for the same config and captions: coco-sim's
# stamp records it, so that a checkout's cached data is generated again (default_data).
SIMULATOR_VERSION = 1

# The split of the bundled data: the first TEST_IMAGES images of testall are the test split,
# the rest of testall is train; dev is dev.
TEST_IMAGES = 1000
CAPTIONS_PER_IMAGE = 5


@dataclass(frozen=True)
class SimConfig:
    """Every knob of the simulator. Defaults give a moderate task; see each field.

    Difficulty knobs (a larger value makes retrieval harder, everything else fixed). The first
    four matter most; as a yardstick, an *oracle* that knows every concept vector and scores a
    caption by the mean over its concepts of the best region cosine reaches t2i R@1 85% on the
    1,000 test images at the defaults (noise 5: 75%, 10: 60%, 20: 24%; drop_prob 0: 94%,
    0.5: 71%; clutter_regions 12: 81%; background_regions 20: 79%). A trained matcher, which has
    to learn the words from 4,000 training images, sits below the oracle.

    - ``noise``: standard deviation per dimension of the (uniform, 256-level) noise added to
      every region, in units of a concept vector's root-mean-square value over all dimensions
      (each concept vector has rms 1). Before the ReLU a single-concept region's cosine with its
      concept is about ``1 / sqrt(1 + noise**2)``.
    - ``drop_prob``: a concept mentioned by ``k`` of the image's captions has no region with
      probability ``drop_prob ** k`` (0: every mentioned concept is visible).
    - ``clutter_regions``: regions showing concepts the captions do *not* mention (distinct,
      from ``CLUTTER_CONCEPTS``): false evidence for other captions.
    - ``background_regions``: regions from ``background_prototypes`` vectors shared by all
      images: no evidence for any caption, and fewer regions left for the mentioned concepts.
    - ``region_scale_jitter``: sigma of the log-normal magnitude of each region (0: all regions
      of equal strength); weak regions drown in the noise (oracle R@1 85% -> 81% at 1.0).
    - ``mix``: each object or clutter region adds a second concept of the same image with a
      weight drawn from ``U(0, mix)`` (0: pure regions). Realism more than difficulty: the
      blended concept belongs to the same image (no measurable oracle change from 0 to 1).
    - ``concept_density``: fraction of the ``feature_dim`` dimensions a concept vector uses;
      denser vectors overlap more (mean cosine of two concept vectors is about
      ``concept_density / 2``). Little effect on the oracle; it shapes how hard the vectors are
      to separate with a learned projection.

    Shape knobs (not difficulty): ``seed`` (a different seed gives a different, equally hard
    data set), ``regions`` and ``feature_dim`` (the array's R and D; SCAN's are 36 and 2048),
    ``background_prototypes`` (how many shared background vectors exist) and ``feature_scale``
    (multiplies every output value).
    """

    seed: int = 0
    regions: int = 36
    feature_dim: int = 2048
    noise: float = 1.0
    drop_prob: float = 0.25
    clutter_regions: int = 4
    background_regions: int = 8
    mix: float = 0.3
    concept_density: float = 0.1
    region_scale_jitter: float = 0.25
    background_prototypes: int = 16
    feature_scale: float = 1.0

    def __post_init__(self) -> None:
        # By the settings' checks (``heiindex.settings``): a numpy integer is stored as an int (one
        # in feature_dim wrote a .npy header numpy could not read back), a bool, a float count or an
        # infinite noise (all-NaN features) refused by name.
        counts = {"seed": 0, "regions": 1, "feature_dim": 1, "background_regions": 0, "background_prototypes": 1}
        for name, least in counts.items():
            settle(self, name, integer=True, at_least=least)
        settle(self, "clutter_regions", integer=True, at_least=0, at_most=len(CLUTTER_CONCEPTS) // 2)
        settle(self, "noise", at_least=0)
        settle(self, "drop_prob", at_least=0, below=1)
        settle(self, "mix", at_least=0, at_most=1)
        settle(self, "concept_density", above=0, at_most=1)
        settle(self, "region_scale_jitter", at_least=0)
        settle(self, "feature_scale", above=0)
        if self.clutter_regions + self.background_regions >= self.regions:
            raise SettingError(
                "clutter_regions",
                f"clutter_regions + `background_regions` = {self.clutter_regions + self.background_regions} must "
                f"leave at least one of the {self.regions} `regions` for the mentioned concepts",
                also=("background_regions", "regions"),
            )


# --------------------------------------------------------------------------------------------
# Words -> concepts

# Function words, pronouns, numbers and quantities, and caption boilerplate ("a picture of"):
# none of them names something a region could show.
STOP_WORDS = frozenset(
    """
    a an the this that these those there here it its they them their theirs he him his she her
    hers we us our ours you your yours i me my mine one ones someone something somebody anyone
    anything everyone everything nobody nothing itself themselves himself herself
    and or but nor so yet if then than as because while though although whether either neither
    both of in on at by for with without within into onto upon from to toward towards up down out
    off over under above below beneath underneath across along around about against among
    amongst through throughout between behind beside besides near nearby next inside outside atop
    via per past beyond before after during until till since like unlike except front middle
    is am are was were be been being do does did doing done have has had having get gets got
    getting can could will would shall should may might must ought cannot not no
    very too also just only even still really quite rather almost nearly somewhat much many more
    most some any each every all few several other another such own same lots lot plenty bunch
    couple
    what which who whom whose when where why how whatever whichever
    two three four five six seven eight nine ten eleven twelve dozen hundred thousand first
    second third half single pair
    away back again ever never always often sometimes together alone else well
    picture image photo photograph pic shot shown showing view
    """.split()
)

# A content word: letters, optionally joined by hyphens or apostrophes ("ice-cream").
_WORD = re.compile(r"[a-z]+(?:[-'][a-z]+)*")

_IRREGULAR_PLURALS = {
    "men": "man",
    "women": "woman",
    "children": "child",
    "people": "person",
    "persons": "person",
    "feet": "foot",
    "teeth": "tooth",
    "geese": "goose",
    "mice": "mouse",
    "oxen": "ox",
    "knives": "knife",
    "wives": "wife",
    "lives": "life",
    "leaves": "leaf",
    "shelves": "shelf",
    "wolves": "wolf",
    "halves": "half",
    "loaves": "loaf",
    "calves": "calf",
    "scarves": "scarf",
    "hooves": "hoof",
    "elves": "elf",
    "thieves": "thief",
    "buses": "bus",
    "busses": "bus",
    "gases": "gas",
    "tomatoes": "tomato",
    "potatoes": "potato",
    "heroes": "hero",
    "mangoes": "mango",
    "volcanoes": "volcano",
    "cacti": "cactus",
    "fungi": "fungus",
    "octopi": "octopus",
    "dice": "die",
    "skies": "sky",
}
# Words ending in s that are not plurals, or whose plural and singular are the same.
_INVARIANT = frozenset(
    """
    news pants jeans shorts scissors clothes series species sheep fish deer aircraft lens
    christmas canvas atlas texas vegas overalls goggles tongs pajamas binoculars
    """.split()
)
# Singulars ending in -ie, whose plural must not become -y (cookies -> cookie, not cooky).
_IE_SINGULARS = frozenset(
    """
    cookie movie tie pie brownie selfie smoothie veggie goalie hoodie lie die zombie birdie
    rookie calorie cutie sweetie hippie collie beanie pixie genie magpie prairie lingerie
    """.split()
)
# Singulars ending in -i, whose plural ends in -is like tennis (skis -> ski).
_I_SINGULARS = frozenset("ski taxi kiwi bikini safari martini zucchini chili khaki alibi".split())
# Singulars ending in -che (mustaches -> mustache, not mustach).
_CHE_SINGULARS = frozenset("mustache moustache niche cache headache ache quiche cliche avalanche".split())


def normalize_word(word: str) -> str:
    """The concept a (lower-case) word names: plurals map to their singular.

    A small rule set, not a lemmatiser: it only has to send a plural and its singular to the
    same string. ``dogs -> dog``, ``buses -> bus``, ``puppies -> puppy``, ``boxes -> box``,
    ``men -> man``, ``knives -> knife``, ``glass -> glass``.
    """
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word.endswith("is") and word[:-1] in _I_SINGULARS:
        return word[:-1]
    if len(word) <= 3 or word in _INVARIANT or word.endswith(("ss", "us", "is", "'s")):
        return word
    if word.endswith("ies"):
        if word[:-1] in _IE_SINGULARS:
            return word[:-1]
        return word[:-3] + "y" if len(word) > 4 else word[:-1]
    if word.endswith("ches") and word[:-1] in _CHE_SINGULARS:
        return word[:-1]
    if word.endswith(("sses", "shes", "ches", "xes", "zzes")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


# Tokens of a caption that is nothing but lower-case words and an optional final period: for
# these NLTK's tokenizer only splits off the period and the MacIntyre contractions, so the
# concepts are the same as from ``tokenize`` (tests/test_simulate.py checks this on real
# captions); every other caption goes through ``tokenize``. This keeps the full coco-sim build
# at a few seconds (the Treebank regexes cost ~150 us a caption).
_PLAIN_CAPTION = re.compile(r"[a-z]+(?: [a-z]+)*(?: ?\.)?")
_CONTRACTION_WORDS = frozenset("cannot gimme gonna gotta lemme wanna whaddya whatcha".split())


def _tokens(caption: str) -> list[str]:
    text = caption.lower().strip()
    if _PLAIN_CAPTION.fullmatch(text):
        words = text.rstrip(" .").split(" ")
        if _CONTRACTION_WORDS.isdisjoint(words):
            return words
    return tokenize(caption)


def caption_concepts(caption: str) -> list[str]:
    """The distinct concepts of one caption, in order of first mention.

    >>> caption_concepts("Two dogs and a dog's puppies on the grass.")
    ['dog', 'puppy', 'grass']
    """
    out: dict[str, None] = {}
    for token in _tokens(caption):
        if token in STOP_WORDS or len(token) < 2 or not _WORD.fullmatch(token):
            continue
        concept = normalize_word(token)
        if concept not in STOP_WORDS:
            out[concept] = None
    return list(out)


def image_concepts(captions: Iterable[str]) -> dict[str, int]:
    """``{concept: number of the captions that mention it}``, most mentioned first (ties by name)."""
    counts = Counter(c for caption in captions for c in caption_concepts(caption))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# Clutter: common COCO objects (nouns among the most frequent concepts of the bundled
# captions). Fixed data, so that an image's clutter does not depend on which other images are
# generated with it.
CLUTTER_CONCEPTS = tuple(
    """
    person man woman boy girl child kid player crowd table street field building room water
    plate food grass tree city road board wall car dog ball hand sign snow bathroom cat sky
    light chair kitchen beach park bed shirt train window ground floor sink sidewalk skateboard
    toilet computer phone counter clock glass ocean hill pizza surfboard track pole bench bus
    laptop desk fence motorcycle mountain bowl horse bike giraffe camera umbrella truck bear cake
    boat vegetable airplane bird couch house plane elephant racket mirror sandwich wave flower
    door zebra hat kite frisbee teddy tower cow cup dish luggage vehicle bicycle box tray bottle
    television sheep shelf bag coffee rock river cheese remote banana meat tv vase broccoli
    jacket oven stove cabinet plant forest sand hydrant suitcase snowboard refrigerator donut
    book lake bread pan toy blanket keyboard
    """.split()
)


# --------------------------------------------------------------------------------------------
# Concepts -> vectors


def _seed_from(*parts: object) -> int:
    """A 128-bit integer seed from ``parts`` (independent of Python's hash seed)."""
    text = "\0".join(str(p) for p in ("heiindex.coco-sim", SIMULATOR_VERSION, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:16], "little")


def concept_vector(concept: str, config: SimConfig = SimConfig()) -> np.ndarray:
    """The fixed vector of ``concept``: float32 ``(feature_dim,)``, non-negative, rms 1.

    About ``concept_density * feature_dim`` dimensions are active, with exponential values;
    the vector is a function of ``(config.seed, config.feature_dim, config.concept_density,
    concept)`` only.
    """
    rng = np.random.default_rng(_seed_from("concept", config.seed, concept))
    d = config.feature_dim
    active = rng.random(d, dtype=np.float32) < config.concept_density
    if not active.any():
        active[rng.integers(d)] = True
    v = rng.standard_exponential(d, dtype=np.float32)
    v *= active
    v *= np.float32(np.sqrt(d / float(np.sum(v.astype(np.float64) ** 2))))
    return v


def _background_name(k: int) -> str:
    # "<" never survives caption_concepts, so no caption word can name a background prototype.
    return f"<background:{k}>"


class _ConceptTable:
    """Concept vectors stacked in rows; the fixed rows (clutter, background) come first.

    ``load(concepts)`` rebuilds the table for one block of images: the fixed rows plus the
    block's concepts, so memory stays at one block's vocabulary. Vectors are cached by name
    between blocks (at most ``max_cached``).
    """

    def __init__(self, config: SimConfig, max_cached: int = 8192) -> None:
        self.config = config
        self.max_cached = max_cached
        self._cache: dict[str, np.ndarray] = {}
        fixed = list(CLUTTER_CONCEPTS) + [_background_name(k) for k in range(config.background_prototypes)]
        self._fixed = {name: i for i, name in enumerate(fixed)}
        self._fixed_rows = np.stack([concept_vector(name, config) for name in fixed])
        self.rows: dict[str, int] = dict(self._fixed)
        self.matrix = self._fixed_rows
        self.background_row = len(CLUTTER_CONCEPTS)

    def load(self, concepts: Iterable[str]) -> None:
        names = [c for c in dict.fromkeys(concepts) if c not in self._fixed]
        if len(self._cache) + len(names) > self.max_cached:
            self._cache.clear()
        vectors = []
        for name in names:
            v = self._cache.get(name)
            if v is None:
                v = self._cache[name] = concept_vector(name, self.config)
            vectors.append(v)
        self.rows = dict(self._fixed)
        self.rows.update((name, len(self._fixed) + i) for i, name in enumerate(names))
        self.matrix = np.concatenate([self._fixed_rows, *([np.stack(vectors)] if vectors else [])])


# --------------------------------------------------------------------------------------------
# One image


def _image_seed(config: SimConfig, captions: Sequence[str]) -> int:
    return _seed_from("image", config.seed, "\n".join(captions))


def _plan_regions(
    concepts: dict[str, int], rng: np.random.Generator, config: SimConfig, rows: dict[str, int], background_row: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What each region shows: ``(primary_row, secondary_row, primary_weight, secondary_weight)``.

    Each is ``(regions,)``; rows index the ``_ConceptTable`` matrix. Region ``r`` is
    ``primary_weight[r] * T[primary_row[r]] + secondary_weight[r] * T[secondary_row[r]]``.
    """
    n_background, n_clutter = config.background_regions, config.clutter_regions
    n_object = config.regions - n_background - n_clutter

    names = list(concepts)
    counts = np.array([concepts[n] for n in names], dtype=np.float64)
    if names:
        visible = rng.random(len(names)) >= config.drop_prob**counts
        if not visible.any():
            visible[int(np.argmax(counts))] = True  # an image shows at least one of its concepts
        kept = [n for n, v in zip(names, visible, strict=True) if v]
        weight = counts[visible] / counts[visible].sum()
        if len(kept) >= n_object:
            picks = rng.choice(len(kept), size=n_object, replace=False, p=weight)
        else:  # every kept concept once, the remaining regions in proportion to the counts
            picks = np.concatenate([np.arange(len(kept)), rng.choice(len(kept), size=n_object - len(kept), p=weight)])
        objects = [kept[i] for i in picks]
    else:  # no content word at all: the object regions become background
        n_background += n_object
        n_object = 0
        objects = []

    pool = [c for c in CLUTTER_CONCEPTS if c not in concepts]
    if n_clutter > len(pool):  # only with very many captions per image
        n_background += n_clutter - len(pool)
        n_clutter = len(pool)
    clutter = [pool[i] for i in rng.choice(len(pool), size=n_clutter, replace=False)]

    shown = objects + clutter
    present = list(dict.fromkeys(shown))
    secondary = [present[i] for i in rng.integers(len(present), size=len(shown))] if shown else []
    secondary_weight = rng.random(len(shown)) * config.mix

    p = config.background_prototypes
    bg_primary = background_row + rng.integers(p, size=n_background)
    bg_secondary = background_row + rng.integers(p, size=n_background)
    bg_weight = rng.random(n_background)

    primary_row = np.concatenate([np.array([rows[n] for n in shown], dtype=np.int64), bg_primary])
    secondary_row = np.concatenate([np.array([rows[n] for n in secondary], dtype=np.int64), bg_secondary])
    scale = np.exp(config.region_scale_jitter * rng.standard_normal(config.regions)) * config.feature_scale
    order = rng.permutation(config.regions)
    w2 = np.concatenate([secondary_weight, bg_weight])
    return primary_row[order], secondary_row[order], scale[order], (scale * w2)[order]


# Standard deviation of a uniform int8 (256 levels, -128 ... 127; mean -1/2).
_INT8_STD = float(np.sqrt((256**2 - 1) / 12))


def _fill_image(
    out: np.ndarray, concepts: dict[str, int], seed: int, config: SimConfig, table: _ConceptTable, tmp: np.ndarray
) -> None:
    """Write one image's ``(regions, feature_dim)`` float32 features into ``out``.

    ``tmp`` is scratch of the same shape. Only elementwise numpy operations (no BLAS), so the
    bytes do not depend on threads or memory alignment.
    """
    rng = np.random.default_rng(seed)
    p_row, s_row, p_w, s_w = _plan_regions(concepts, rng, config, table.rows, table.background_row)
    # Noise: uniform int8 (random bytes are 6x cheaper than float draws), centred, scaled to
    # standard deviation `noise` (times feature_scale).
    step = np.float32(config.noise * config.feature_scale / _INT8_STD)
    np.multiply(np.frombuffer(rng.bytes(out.size), dtype=np.int8).reshape(out.shape), step, out=out)
    np.take(table.matrix, p_row, axis=0, out=tmp)
    tmp *= p_w.astype(np.float32)[:, None]
    tmp += step / 2
    out += tmp
    np.take(table.matrix, s_row, axis=0, out=tmp)
    tmp *= s_w.astype(np.float32)[:, None]
    out += tmp
    np.maximum(out, 0, out=out)


# --------------------------------------------------------------------------------------------
# Files


def simulate_images(
    captions: list[str],
    out_path: Path,
    config: SimConfig = SimConfig(),
    captions_per_image: int = 5,
    block_images: int = 256,
) -> None:
    """Write ``out_path`` (a ``.npy``): float32 ``(len(captions) // captions_per_image, regions, feature_dim)``.

    Image ``i`` is made from ``captions[i * captions_per_image : (i + 1) * captions_per_image]``
    (see the module docstring). The file is written ``block_images`` images at a time into a
    temporary file beside ``out_path`` and renamed when complete; memory stays at one block
    (``block_images * regions * feature_dim * 4`` bytes, 75 MB at the defaults) plus the block's
    concept vectors, and the bytes do not depend on ``block_images``.
    """
    _simulate_images(
        captions, require_path("out_path", out_path), config, captions_per_image, block_images, _ConceptTable(config)
    )


def _simulate_images(
    captions: list[str],
    out_path: Path,
    config: SimConfig,
    captions_per_image: int,
    block_images: int,
    table: _ConceptTable,
) -> None:
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    if block_images < 1:
        raise ValueError(f"block_images must be >= 1, got {block_images}")
    if not captions or len(captions) % captions_per_image:
        raise ValueError(
            f"{len(captions)} captions is not a positive multiple of captions_per_image={captions_per_image}"
        )
    n_images = len(captions) // captions_per_image
    r, d = config.regions, config.feature_dim
    block_images = min(block_images, n_images)
    block = np.empty((block_images, r, d), dtype=np.float32)
    tmp = np.empty((r, d), dtype=np.float32)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False, "shape": (n_images, r, d)}

    tmp_path = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp_path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            for start in range(0, n_images, block_images):
                stop = min(n_images, start + block_images)
                groups = [captions[i * captions_per_image : (i + 1) * captions_per_image] for i in range(start, stop)]
                concepts = [image_concepts(g) for g in groups]
                table.load(c for cs in concepts for c in cs)
                for j, (group, cs) in enumerate(zip(groups, concepts, strict=True)):
                    _fill_image(block[j], cs, _image_seed(config, group), config, table, tmp)
                f.write(memoryview(block[: stop - start]).cast("B"))
        os.replace(tmp_path, out_path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


_SPLIT_FILES = ("train_caps.txt", "train_ims.npy", "dev_caps.txt", "dev_ims.npy", "test_caps.txt", "test_ims.npy")
_META_FILE = "coco_sim.json"


def write_coco_sim_precomp(captions_dir: Path, out_dir: Path, config: SimConfig = SimConfig()) -> dict[str, int]:
    """Build the coco-sim precomp folder from ``captions_dir``'s ``testall_caps.txt`` and ``dev_caps.txt``.

    Splits: ``test`` = the first 1,000 images of testall, ``train`` = the rest of testall,
    ``dev`` = dev. Writes ``{split}_caps.txt`` (the caption lines, copied), ``{split}_ims.npy``
    and ``coco_sim.json`` (the config and simulator version) into a scratch folder beside
    ``out_dir``, then swaps it in (``heiindex.outputs.atomic_dir``: a symlinked ``out_dir`` is
    written where it points, and an existing one is replaced only if it holds nothing but these
    files). Returns ``{split: n_images}``.
    """
    captions_dir, out_dir = require_path("captions_dir", captions_dir), require_path("out_dir", out_dir)
    testall_path, dev_path = captions_dir / "testall_caps.txt", captions_dir / "dev_caps.txt"
    testall, dev = read_captions(testall_path), read_captions(dev_path)
    cpi = CAPTIONS_PER_IMAGE
    for path, lines in ((testall_path, testall), (dev_path, dev)):
        if len(lines) % cpi:
            raise DataError(path, f"{len(lines)} lines is not a multiple of {cpi} captions per image")
    if len(testall) <= TEST_IMAGES * cpi:
        raise DataError(
            testall_path,
            f"{len(testall)} lines: need more than {TEST_IMAGES * cpi} ({TEST_IMAGES} test images, the rest train)",
        )
    splits = {"train": testall[TEST_IMAGES * cpi :], "dev": dev, "test": testall[: TEST_IMAGES * cpi]}
    table = _ConceptTable(config)  # shared: the splits have most concepts in common
    with atomic_dir(out_dir, "coco-sim", (*_SPLIT_FILES, _META_FILE)) as tmp_dir:
        for split, lines in splits.items():
            (tmp_dir / f"{split}_caps.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            _simulate_images(lines, tmp_dir / f"{split}_ims.npy", config, cpi, 256, table)
        counts = {split: len(lines) // cpi for split, lines in splits.items()}
        meta = {
            "simulator": "heiindex.simulate",
            "version": SIMULATOR_VERSION,
            "config": asdict(config),
            "images": counts,
        }
        (tmp_dir / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return counts
