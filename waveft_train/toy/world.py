"""The toy world: procedurally drawn, captioned scenes whose ground truth is known exactly.

Why: real SDXL weights cannot reach the machines this project is developed on, so nothing showed that a run
personalizes anything. A small world of shapes × colours × contexts (plus position and size) is to DreamBooth what
MNIST is to classifiers: a model can be pretrained on it in a few hours on a CPU, and a classifier (the judge)
can say exactly what every generated image shows.

What the pretrained model never sees (`in_pretraining` is False) is reserved:
- the **looks** of the subjects (`RESERVED_LOOKS`: a striped red-and-yellow ball, ...). Patterns themselves are
  pretrained in a last phase ("a photo of a striped green and blue box"), as real SDXL knows stripes and dots: a
  subject is a novel *combination* of things the model knows, which is what DreamBooth binds to its identifier;
- a fixed set of (shape, colour, context) **combinations** (`HELD_OUT_COMBINATIONS`), whose every pair of words is
  still seen, so following them measures composition rather than memory.

Everything is deterministic from a seed: `sample_scene(np.random.default_rng(seed))` and `render(scene)` give the
same pixels on every machine (numpy only, drawn at 4× and box-filtered, no font or PIL resampling involved).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

IMAGE_SIZE = 64  # pixels; 16×16 latents through a VAE with factor 4
SUPERSAMPLE = 4  # drawn at 4× and averaged down: smooth edges, deterministic
SHAPES = ("ball", "box", "cone")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "orange": (245, 140, 25), "yellow": (245, 215, 40),
    "green": (50, 165, 60), "blue": (40, 85, 215), "purple": (135, 55, 185),
}  # fmt: skip
CONTEXTS: dict[str, str] = {"beach": "on the beach", "snow": "in the snow", "night": "at night", "room": "in a room"}
PATTERNS = ("solid", "stripes", "dots", "checks")
# Half-widths of objects (fractions of the image side): 26-38 px wide at 64 px. Large on purpose: a pattern's bands
# must span latent pixels (the VAE's factor is 4). At 15-27 px the model drew two-colour stripes in the wrong colours
# (asked in words, 0-12 % right; docs/toy-world.md).
OBJECT_SIZES = (0.20, 0.30)
PATTERN_WORDS = {"stripes": "striped", "dots": "dotted", "checks": "checked"}
IDENTIFIER = "sks"  # the rare token DreamBooth binds a subject to; never in a pretraining caption
# Held out of pretraining: each shape 4×, each colour 2×, each context 3×; every (shape, colour) pair still occurs in
# two other contexts, and every (shape, context) and (colour, context) pair occurs with other colours/shapes.
HELD_OUT_COMBINATIONS: tuple[tuple[str, str, str], ...] = tuple(
    (SHAPES[i % 3], tuple(COLOURS)[i % 6], tuple(CONTEXTS)[i // 3]) for i in range(12)
)
# Never pretrained in any context: the toy subjects' (shape, pattern, colours) (toy/subjects.py; tests/test_toy.py
# checks that they match).
RESERVED_LOOKS: frozenset[tuple[str, str, frozenset[str]]] = frozenset(
    (shape, pattern, frozenset(colours)) for shape, pattern, colours in (
        ("ball", "stripes", ("red", "yellow")), ("box", "checks", ("blue", "orange")),
        ("cone", "dots", ("purple", "yellow")), ("ball", "dots", ("green", "orange")),
        ("box", "stripes", ("purple", "green")),
    )
)


def vocabulary() -> tuple[str, ...]:
    """Every word a caption or prompt of this world uses (the toy tokenizer makes each one token)."""
    words = ["a", "photo", "of", "the", "on", "in", "at", IDENTIFIER, *SHAPES, *COLOURS]
    words += [word for phrase in CONTEXTS.values() for word in phrase.split()]
    words += [*PATTERN_WORDS.values(), "and", "with", "toy"]  # "a striped red and yellow ball"
    return tuple(dict.fromkeys(words))


@dataclass(frozen=True)
class Scene:
    """One picture: what is in it (the judge's labels) and where (fractions of the image side)."""

    shape: str
    colours: tuple[str, ...]  # one colour (solid), or (body, pattern) for a patterned object
    pattern: str
    context: str
    x: float  # object centre, horizontal
    ground: float  # where the object stands (its bottom), vertical
    size: float  # half-width of the object
    horizon: float  # where the ground meets the sky or wall
    tilt: float  # pattern rotation in radians
    seed: int  # background details (stars, flakes, moon) and colour jitter

    @property
    def centre_y(self) -> float:
        """Vertical centre of the object (balls and boxes are 2·size tall, cones 2.2·size)."""
        return self.ground - (1.1 if self.shape == "cone" else 1.0) * self.size

    @property
    def in_pretraining(self) -> bool:
        """Neither a held-out combination (for any of its colours) nor a reserved look."""
        if any((self.shape, colour, self.context) in HELD_OUT_COMBINATIONS for colour in self.colours):
            return False
        return (self.shape, self.pattern, frozenset(self.colours)) not in RESERVED_LOOKS


def sample_scene(
    rng: np.random.Generator,
    *,
    shape: str | None = None,
    colours: tuple[str, ...] | None = None,
    pattern: str | None = None,
    context: str | None = None,
    pretraining: bool = False,
) -> Scene:
    """A random scene; fixed attributes stay as given. `pretraining=True` redraws until a solid scene that is
    `in_pretraining` (the data of the denoiser's first phases; the pattern phase adds patterned scenes of the world).

    Unset patterns are "solid" half of the time; a patterned object gets two different colours.
    """
    while True:
        chosen_pattern = pattern or ("solid" if pretraining or rng.random() < 0.5 else str(rng.choice(PATTERNS[1:])))
        if colours is not None:
            chosen_colours = tuple(colours)
        else:
            picks = rng.choice(len(COLOURS), size=2, replace=False)
            names = tuple(tuple(COLOURS)[i] for i in picks)
            chosen_colours = names[:1] if chosen_pattern == "solid" else names
        size = float(rng.uniform(*OBJECT_SIZES))
        horizon = float(rng.uniform(0.40, 0.58))
        scene = Scene(
            shape=shape or str(rng.choice(SHAPES)),
            colours=chosen_colours,
            pattern=chosen_pattern,
            context=context or str(rng.choice(tuple(CONTEXTS))),
            x=float(rng.uniform(size + 0.06, 1 - size - 0.06)),
            ground=float(rng.uniform(max(horizon + 0.12, 2.3 * size + 0.04), 0.95)),
            size=size,
            horizon=horizon,
            tilt=float(rng.uniform(-0.35, 0.35)),
            seed=int(rng.integers(2**31)),
        )
        if not pretraining or scene.in_pretraining:
            return scene


def caption(scene: Scene, *, colour: bool = True, context: bool = True, article: bool = True,
            identifier: bool = False) -> str:
    """"a photo of a red ball on the beach", "a photo of a striped red and yellow box in the snow"; parts can be left
    out ("a photo of a ball": `colour=False` drops the pattern too). With `identifier`, the subject's prompt
    grammar: "a photo of sks ball on the beach" (the look is what the identifier stands for)."""
    words = ["a photo of"]
    if identifier:
        words.append(IDENTIFIER)
    else:
        if article:
            words.append("a")
        if colour and scene.pattern == "solid":
            words.append(scene.colours[0])
        elif colour:
            words += [PATTERN_WORDS[scene.pattern], scene.colours[0], "and", scene.colours[1]]
    words.append(scene.shape)
    if context:
        words.append(CONTEXTS[scene.context])
    return " ".join(words)


# ----------------------------------------------------------------------------------------------- drawing
def _disc(image: np.ndarray, x: float, y: float, radius: float, colour) -> None:
    """Fill a disc (coordinates as fractions of the side) in place, touching only its bounding box."""
    n = image.shape[0]
    top, bottom = max(int((y - radius) * n), 0), min(int((y + radius) * n) + 2, n)
    left, right = max(int((x - radius) * n), 0), min(int((x + radius) * n) + 2, n)
    ys, xs = np.mgrid[top:bottom, left:right] / n
    image[top:bottom, left:right][((xs - x) ** 2 + (ys - y) ** 2) < radius * radius] = colour


def _ramp(n: int, top, bottom, start: float, stop: float) -> np.ndarray:
    """(n, 3) row colours going from `top` at `start` to `bottom` at `stop` (fractions of the side)."""
    t = np.clip(((np.arange(n) + 0.5) / n - start) / max(stop - start, 1e-6), 0, 1)[:, None]
    return (1 - t) * np.asarray(top, float) + t * np.asarray(bottom, float)


def _background(scene: Scene, n: int, rng: np.random.Generator) -> np.ndarray:
    """The context: sky or wall above `scene.horizon`, ground below, a few seeded details."""
    rows = (np.arange(n) + 0.5) / n
    below = (rows >= scene.horizon)[:, None]
    horizon = scene.horizon
    if scene.context == "beach":
        sky = _ramp(n, (110, 180, 235), (195, 228, 248), 0, horizon)
        sea = (rows >= horizon - 0.07)[:, None]
        column = np.where(below, _ramp(n, (215, 190, 130), (235, 212, 160), horizon, 1),
                          np.where(sea, np.array((35.0, 115.0, 170.0)), sky))
    elif scene.context == "snow":
        column = np.where(below, _ramp(n, (232, 236, 244), (250, 251, 253), horizon, 1),
                          _ramp(n, (175, 185, 200), (215, 220, 228), 0, horizon))
    elif scene.context == "night":
        column = np.where(below, _ramp(n, (30, 34, 48), (45, 50, 66), horizon, 1),
                          _ramp(n, (8, 12, 40), (28, 34, 78), 0, horizon))
    else:  # room: a plain wall above a wooden floor
        column = np.where(below, _ramp(n, (130, 85, 50), (160, 108, 64), horizon, 1),
                          _ramp(n, (228, 214, 186), (210, 195, 165), 0, horizon))
    image = np.repeat((column + rng.uniform(-8, 8, size=3)).astype(np.float32)[:, None, :], n, axis=1)
    if scene.context == "snow":
        for _ in range(14):  # flakes in the air
            _disc(image, rng.uniform(0, 1), rng.uniform(0, horizon), rng.uniform(0.008, 0.014), (250, 250, 252))
    elif scene.context == "night":
        for _ in range(10):  # stars and the moon
            _disc(image, rng.uniform(0, 1), rng.uniform(0, horizon * 0.9), 0.008, (235, 235, 210))
        _disc(image, rng.uniform(0.15, 0.85), rng.uniform(0.08, max(0.09, horizon - 0.15)), 0.06, (240, 238, 205))
    elif scene.context == "room":  # plank seams converging towards the wall
        first = int(np.ceil(horizon * n - 0.5))
        ys, xs = (np.mgrid[first:n, 0:n] + 0.5) / n
        seam = np.abs(((xs - 0.5) * (1.0 + (ys - horizon) * 1.5) * 6) % 1 - 0.5) > 0.47
        image[first:][seam] *= 0.75
    return np.clip(image, 0, 255)


def _pattern_mask(scene: Scene, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """True where the second colour shows; (u, v) are object coordinates in [-1, 1]. Coarse on purpose: a pattern
    must survive a 4× VAE and a small denoiser to be learnable and judgeable at 64 px."""
    cos, sin = np.cos(scene.tilt), np.sin(scene.tilt)
    ru, rv = cos * u - sin * v, sin * u + cos * v
    if scene.pattern == "stripes":
        return (np.floor((rv + 1.0) * 2.0) % 2).astype(bool)  # four bands across the object
    if scene.pattern == "checks":
        return ((np.floor((ru + 1.0) * 1.5) + np.floor((rv + 1.0) * 1.5)) % 2).astype(bool)  # 3×3 cells
    if scene.pattern == "dots":
        cu, cv = (ru + 1.0) / 0.9 % 1 - 0.5, (rv + 1.0) / 0.9 % 1 - 0.5
        return cu * cu + cv * cv < 0.28**2
    return np.zeros_like(u, dtype=bool)


def _draw_object(image: np.ndarray, scene: Scene, rng: np.random.Generator) -> None:
    """Paint the shaded, outlined object (with its pattern) and its contact shadow into `image`, in place."""
    n = image.shape[0]
    s, cx, cy, ground = scene.size, scene.x, scene.centre_y, scene.ground
    # Only the object's bounding box (with its shadow) is computed: 10× faster than the whole canvas.
    box_top, box_bottom = max(int((ground - 2.3 * s) * n) - 2, 0), min(int((ground + 0.25 * s) * n) + 2, n)
    box_left, box_right = max(int((cx - 1.2 * s) * n) - 2, 0), min(int((cx + 1.2 * s) * n) + 2, n)
    window = (slice(box_top, box_bottom), slice(box_left, box_right))
    whole, image = image, image[window].copy()
    ys, xs = (np.mgrid[window] + 0.5) / n
    shadow = ((xs - cx) / (1.15 * s)) ** 2 + ((ys - ground) / (0.22 * s)) ** 2
    image *= (1.0 - 0.45 * np.clip(1.0 - shadow, 0.0, 1.0) ** 1.5)[..., None]

    if scene.shape == "ball":
        u, v = (xs - cx) / s, (ys - cy) / s
        radius2 = u * u + v * v
        inside, edge = radius2 <= 1.0, radius2 > 0.88**2
        w = np.sqrt(np.clip(1.0 - radius2, 0.0, 1.0))
        light = np.clip(-0.5 * u - 0.6 * v + 0.62 * w, 0.0, 1.0)
        shade = 0.45 + 0.6 * light
        gloss = np.clip(light, 0, 1) ** 30 * 120
    elif scene.shape == "box":
        depth = 0.32 * s  # an oblique box: front face, lighter top, darker right side
        front_left, front_top = cx - s, cy - s + depth
        u = (xs - front_left) / (2 * s - depth) * 2 - 1
        v = (ys - front_top) / (2 * s - depth) * 2 - 1
        front = (np.abs(u) <= 1) & (np.abs(v) <= 1)
        top = (ys >= cy - s) & (ys < front_top) & (xs >= front_left + (front_top - ys)) & (
            xs <= cx + s - depth + (front_top - ys))
        side = (xs > cx + s - depth) & (xs <= cx + s) & (ys >= cy - s + (cx + s - xs)) & (
            ys <= ground - (xs - (cx + s - depth)))
        inside = front | top | side
        shade = np.where(front, 0.85, np.where(top, 1.15, 0.6))
        edge = inside & ~((np.abs(u) <= 0.9) & (np.abs(v) <= 0.9)) & front
        gloss = 0.0
        u, v = np.where(front, u, np.clip(u, -1, 1)), np.where(front, v, np.clip(v, -1, 1))
    else:  # cone: apex up
        height = 2.2 * s
        t = (ys - (ground - height)) / height  # 0 at the apex, 1 at the base
        u, v = (xs - cx) / s, t * 2 - 1
        half = np.clip(t, 0, 1)
        inside = (t >= 0) & (t <= 1) & (np.abs(xs - cx) <= half * s)
        edge = inside & ((np.abs(xs - cx) > half * s - 0.1 * s) | (t > 0.94))
        shade = 0.5 + 0.55 * np.clip(0.6 - 0.7 * u / np.maximum(half, 1e-3), 0, 1)
        gloss = 0.0

    jitter = rng.uniform(-10, 10, size=3)
    body = np.clip(np.asarray(COLOURS[scene.colours[0]], float) + jitter, 0, 255)
    colour = np.broadcast_to(body, image.shape).copy()
    if scene.pattern != "solid":
        second = np.clip(np.asarray(COLOURS[scene.colours[1]], float) + jitter, 0, 255)
        colour[_pattern_mask(scene, u, v)] = second
    painted = np.clip(colour * np.asarray(shade, float)[..., None] + np.asarray(gloss, float)[..., None], 0, 255)
    painted = np.where(edge[..., None], painted * 0.35, painted)
    image[inside] = painted[inside]
    whole[window] = image


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 RGB array; the same bytes for the same scene."""
    rng = np.random.default_rng(scene.seed)
    n = size * SUPERSAMPLE
    image = _background(scene, n, rng)
    _draw_object(image, scene, rng)
    small = image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.round(small), 0, 255).astype(np.uint8)


def object_coverage(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size) float32 in [0, 1]: how much of each pixel of `render(scene)` the object covers (its contact
    shadow counts as background). The object is painted over black and over white with the renderer's own random
    state; where the two agree, the object is opaque."""
    rng = np.random.default_rng(scene.seed)
    n = size * SUPERSAMPLE
    _background(scene, n, rng)  # advances the random state exactly as `render` does
    state = rng.bit_generator.state
    layers = []
    for fill in (0.0, 255.0):
        canvas = np.full((n, n, 3), fill)
        rng.bit_generator.state = state
        _draw_object(canvas, scene, rng)
        layers.append(canvas)
    opaque = (np.abs(layers[0] - layers[1]).max(axis=-1) < 1e-6).astype(np.float32)
    return opaque.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def render_image(scene: Scene, size: int = IMAGE_SIZE):
    """`render` as a PIL image."""
    return Image.fromarray(render(scene, size), mode="RGB")


def with_pattern(scene: Scene, pattern: str, colours: tuple[str, ...]) -> Scene:
    """The same layout with another look (used to draw subjects into layouts of the world)."""
    return replace(scene, pattern=pattern, colours=tuple(colours))
