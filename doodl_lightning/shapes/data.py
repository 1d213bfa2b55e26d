"""The shapes world's procedural data: attributes -> RGB images with captions and ground truth.

Everything is deterministic by seed: ``sample_attributes(seed, n)`` draws the attributes of ``n`` images
with a CPU ``torch.Generator`` seeded by ``seed``; ``render(attrs)`` turns them into images in [-1, 1]
(vectorised torch, on any device, 4x4 super-sampled for anti-aliased edges); the caption functions turn
them into text. The same seed gives the same attributes, images (up to float rounding across devices)
and captions.

Why 32x32: with an f=4 VAE the diffusion model works on 8x8x4 latents, so a whole DOODL optimisation
(a sampler chain with its backward pass) runs on a laptop CPU in seconds, while six shape classes,
six colours, three sizes, a 3x3 grid of positions and three backgrounds stay unambiguous to a CNN.

Vocabulary-expansion set-up: ``diffusion_caption`` names only the coarse shape ("circle", "polygon",
"star"); triangles, squares, pentagons and hexagons are all "polygon" to the diffusion model, while the
classifier, the evaluator and shapes-CLIP know the fine class.

Quality: half of the images are degraded by a blur (sigma up to ``BLUR_MAX`` px) and/or a contrast fade
(shape colour mixed toward the background, kept fraction ``alpha`` down to ``ALPHA_MIN``); the
procedural quality score in [0, 10] is ``5 * sharpness + 5 * contrast`` (1 = pristine). The diffusion
captions never mention it (so unguided generations vary in quality and an aesthetic-style head can
steer it); shapes-CLIP's captions do ("blurry", "faint") so its image features encode it.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGE_SIZE = 32

SHAPES = ("circle", "triangle", "square", "pentagon", "hexagon", "star")
COARSE_SHAPES = ("circle", "polygon", "star")
FINE_TO_COARSE = (0, 1, 1, 1, 1, 2)  # index into COARSE_SHAPES for each of SHAPES
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
COLOUR_RGB = torch.tensor(
    [[0.90, 0.10, 0.10], [1.00, 0.55, 0.00], [0.95, 0.90, 0.10], [0.10, 0.70, 0.20], [0.15, 0.30, 0.95], [0.60, 0.15, 0.80]]
)
SIZES = ("small", "medium", "large")
SIZE_RADIUS = (6.0, 8.5, 11.0)  # circumradius in pixels (times a per-shape factor below)
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
POSITION_PHRASE = tuple("in the center" if p == "center" else f"at the {p}" for p in POSITIONS)
GRID = (11.0, 16.0, 21.0)  # pixel centres of the 3x3 position grid
BACKGROUNDS = ("black", "gray", "white")
BACKGROUND_RGB = torch.tensor([[0.05, 0.05, 0.05], [0.50, 0.50, 0.50], [0.95, 0.95, 0.95]])
# per-shape (sectors m, inner/outer radius ratio, size factor): the outline is a star-shaped polygon with
# a vertex at radius R every 2*pi/m and the boundary's closest point at radius ratio*R in between
SHAPE_GEOMETRY = {
    "circle": (0, 1.0, 0.95),
    "triangle": (3, math.cos(math.pi / 3), 1.2),
    "square": (4, math.cos(math.pi / 4), 1.05),
    "pentagon": (5, math.cos(math.pi / 5), 1.0),
    "hexagon": (6, math.cos(math.pi / 6), 1.0),
    "star": (5, 0.45, 1.15),
}
BLUR_MAX = 0.8
ALPHA_MIN = 0.5
P_DEGRADED = 0.5
ATTRIBUTES = ("shape", "colour", "size", "position", "background")
NUM_CLASSES = {"shape": len(SHAPES), "colour": len(COLOURS), "size": len(SIZES), "position": len(POSITIONS),
               "background": len(BACKGROUNDS)}
ATTRIBUTE_NAMES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS, "background": BACKGROUNDS}

# every word the captions use (for the diffusion model's small-vocabulary tokenizer)
VOCABULARY = sorted(
    {"a", "an", "and", "on", "at", "the", "in", "background", "shape", "blurry", "faint", "sharp", "bright"}
    | set(" ".join(SHAPES + COARSE_SHAPES + COLOURS + SIZES + POSITIONS + BACKGROUNDS).split())
)


@dataclass
class Attributes:
    """Ground truth of ``n`` images with up to 2 objects each (slot 1 is used where ``n_objects == 2``).

    Integer class indices per object slot: ``shape, colour, size, position`` [n, 2]; per image:
    ``background`` [n], ``n_objects`` [n]; continuous: ``center`` [n, 2, 2] (x, y pixels), ``radius``
    [n, 2], ``rotation`` [n, 2], ``colour_rgb`` [n, 2, 3], ``background_rgb`` [n, 3], ``blur`` [n]
    (Gaussian sigma in px), ``alpha`` [n] (contrast), ``quality`` [n] (0..10).
    """

    shape: torch.Tensor
    colour: torch.Tensor
    size: torch.Tensor
    position: torch.Tensor
    background: torch.Tensor
    n_objects: torch.Tensor
    center: torch.Tensor
    radius: torch.Tensor
    rotation: torch.Tensor
    colour_rgb: torch.Tensor
    background_rgb: torch.Tensor
    blur: torch.Tensor
    alpha: torch.Tensor
    quality: torch.Tensor

    def __len__(self) -> int:
        return self.shape.shape[0]

    def labels(self) -> dict[str, torch.Tensor]:
        """Class indices of the first object (and the background): the targets for single-shape images."""
        return {"shape": self.shape[:, 0], "colour": self.colour[:, 0], "size": self.size[:, 0],
                "position": self.position[:, 0], "background": self.background}

    def to(self, device) -> "Attributes":
        return Attributes(**{k: v.to(device) for k, v in self.__dict__.items()})

    def item(self, i: int) -> dict:
        """Plain-Python ground truth of image ``i`` (names, not indices)."""
        objs = []
        for k in range(int(self.n_objects[i])):
            objs.append({
                "shape": SHAPES[self.shape[i, k]], "coarse_shape": COARSE_SHAPES[FINE_TO_COARSE[self.shape[i, k]]],
                "colour": COLOURS[self.colour[i, k]], "size": SIZES[self.size[i, k]],
                "position": POSITIONS[self.position[i, k]], "center": self.center[i, k].tolist(),
                "radius": float(self.radius[i, k]), "rotation": float(self.rotation[i, k]),
            })
        return {"objects": objs, "background": BACKGROUNDS[self.background[i]], "blur": float(self.blur[i]),
                "alpha": float(self.alpha[i]), "quality": float(self.quality[i])}


def quality_score(blur: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Procedural quality in [0, 10]: 5 * sharpness + 5 * contrast."""
    return 5.0 * (1.0 - blur / BLUR_MAX) + 5.0 * (alpha - ALPHA_MIN) / (1.0 - ALPHA_MIN)


def sample_attributes(seed: int, n: int, p_two: float = 0.0, p_degraded: float = P_DEGRADED,
                      shapes: tuple[int, ...] | None = None) -> Attributes:
    """Draw the attributes of ``n`` images from ``torch.Generator().manual_seed(seed)``.

    ``p_two``: probability of a second object (then both are small or medium, in different grid cells).
    ``shapes``: restrict the fine shape classes drawn (indices into ``SHAPES``).
    """
    g = torch.Generator().manual_seed(int(seed))

    def randint(hi, size):
        return torch.randint(0, hi, size, generator=g)

    def rand(*size):
        return torch.rand(*size, generator=g)

    shape_pool = torch.tensor(shapes if shapes is not None else range(len(SHAPES)))
    shape = shape_pool[randint(len(shape_pool), (n, 2))]
    colour = randint(len(COLOURS), (n, 2))
    n_objects = 1 + (rand(n) < p_two).long()
    two = n_objects == 2
    size = randint(len(SIZES), (n, 2))
    size[two] = randint(2, (int(two.sum()), 2))
    position = randint(len(POSITIONS), (n, 2))
    other = (position[:, 0] + 1 + randint(len(POSITIONS) - 1, (n,))) % len(POSITIONS)
    position[:, 1] = other
    background = randint(len(BACKGROUNDS), (n,))
    # continuous parameters
    grid = torch.tensor(GRID)
    center = torch.stack([grid[position % 3], grid[position // 3]], dim=-1) + (rand(n, 2, 2) * 2 - 1)
    factor = torch.tensor([SHAPE_GEOMETRY[s][2] for s in SHAPES])[shape]
    radius = torch.tensor(SIZE_RADIUS)[size] * factor * (1 + 0.08 * (rand(n, 2) * 2 - 1))
    rotation = rand(n, 2) * 2 * math.pi
    colour_rgb = (COLOUR_RGB[colour] + 0.05 * (rand(n, 2, 3) * 2 - 1)).clamp(0, 1)
    background_rgb = (BACKGROUND_RGB[background] + 0.03 * (rand(n, 3) * 2 - 1)).clamp(0, 1)
    degraded = rand(n) < p_degraded
    kind = randint(3, (n,))  # 0 blur only, 1 fade only, 2 both
    blur = torch.where(degraded & (kind != 1), rand(n) * BLUR_MAX, torch.zeros(n))
    alpha = torch.where(degraded & (kind != 0), ALPHA_MIN + rand(n) * (1 - ALPHA_MIN), torch.ones(n))
    # the second object's slot holds valid values even where unused (so renders never branch)
    return Attributes(shape=shape, colour=colour, size=size, position=position, background=background,
                      n_objects=n_objects, center=center, radius=radius, rotation=rotation, colour_rgb=colour_rgb,
                      background_rgb=background_rgb, blur=blur, alpha=alpha, quality=quality_score(blur, alpha))


def _coverage(shape, center, radius, rotation, size: int, ss: int) -> torch.Tensor:
    """Fraction of each pixel inside the outline, by ss x ss super-sampling: [n, 1, size, size]."""
    device = center.device
    n = shape.shape[0]
    coords = (torch.arange(size * ss, device=device, dtype=torch.float32) + 0.5) / ss  # pixel units
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    dx = xx[None] - center[:, 0, None, None]
    dy = yy[None] - center[:, 1, None, None]
    rho = torch.sqrt(dx * dx + dy * dy)
    phi = torch.atan2(dy, dx) - rotation[:, None, None]
    geo = torch.tensor([SHAPE_GEOMETRY[s][:2] for s in SHAPES], device=device)[shape]  # [n, 2]
    m = geo[:, 0].clamp(min=1)[:, None, None]
    ratio = geo[:, 1][:, None, None]
    sector = 2 * math.pi / m
    # fold the angle into [0, pi/m]: between a vertex (radius R, angle 0) and the closest boundary point
    theta = torch.remainder(phi, sector)
    theta = torch.minimum(theta, sector - theta)
    half = sector / 2
    # boundary along the ray at angle theta: line through A=(1, 0) and B=ratio*(cos half, sin half)
    bx, by = ratio * torch.cos(half), ratio * torch.sin(half)
    denom = torch.cos(theta) * by - torch.sin(theta) * (bx - 1)
    boundary = (by / denom)  # = cross(A, B) / cross(dir, B - A), in units of R
    boundary = torch.where(geo[:, 0][:, None, None] == 0, torch.ones_like(boundary), boundary)
    inside = (rho <= boundary * radius[:, None, None]).float()
    return F.avg_pool2d(inside[:, None], ss)


def _gaussian_blur(img: torch.Tensor, sigma: torch.Tensor, ksize: int = 7) -> torch.Tensor:
    """Per-image Gaussian blur (sigma [n] in px, 0 = identity), separable, reflect padding."""
    n, c, h, w = img.shape
    r = ksize // 2
    x = torch.arange(-r, r + 1, device=img.device, dtype=img.dtype)
    s = sigma.to(img.dtype).clamp(min=1e-3)[:, None]
    k = torch.exp(-0.5 * (x[None] / s) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # [n, ksize]; sigma -> 0 gives a delta
    kk = k.repeat_interleave(c, dim=0)  # [n*c, ksize]
    y = F.pad(img.reshape(1, n * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, kk[:, None, None, :], groups=n * c)
    y = F.conv2d(y, kk[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def render(attrs: Attributes, device=None, size: int = IMAGE_SIZE, ss: int = 4) -> torch.Tensor:
    """Render images in [-1, 1], shape [n, 3, size, size], on ``device`` (default: the attributes')."""
    a = attrs.to(device) if device is not None else attrs
    scale = size / IMAGE_SIZE
    img = a.background_rgb[:, :, None, None].expand(-1, -1, size, size).clone()
    for k in range(2):
        present = (a.n_objects > k).float()[:, None, None, None]
        cov = _coverage(a.shape[:, k], a.center[:, k] * scale, a.radius[:, k] * scale, a.rotation[:, k], size, ss)
        cov = cov * present * a.alpha[:, None, None, None]
        img = img * (1 - cov) + a.colour_rgb[:, k, :, None, None] * cov
    if bool((a.blur > 0).any()):
        img = _gaussian_blur(img, a.blur * scale)
    return (img.clamp(0, 1) * 2 - 1).contiguous()


def _object_phrase(attrs: Attributes, i: int, k: int, rng: random.Random, fine: bool, p_size: float,
                   p_position: float, p_colour: float) -> str:
    fine_name = SHAPES[attrs.shape[i, k]]
    coarse_name = COARSE_SHAPES[FINE_TO_COARSE[attrs.shape[i, k]]]
    noun = fine_name if fine else coarse_name
    words = []
    if rng.random() < p_size:
        words.append(SIZES[attrs.size[i, k]])
    if rng.random() < p_colour:
        words.append(COLOURS[attrs.colour[i, k]])
    words.append(noun)
    phrase = " ".join(words)
    if rng.random() < p_position:
        phrase += " " + POSITION_PHRASE[attrs.position[i, k]]
    return phrase


def _caption(attrs: Attributes, i: int, rng: random.Random, fine: bool, quality_words: bool, full: bool) -> str:
    p = 1.0 if full else 0.5
    p_colour = 1.0 if full else 0.9
    parts = [_object_phrase(attrs, i, k, rng, fine, p, p, p_colour) for k in range(int(attrs.n_objects[i]))]
    adj = ""
    if quality_words:
        q = []
        if attrs.blur[i] > 0.4:
            q.append("blurry")
        if attrs.alpha[i] < 0.75:
            q.append("faint")
        if not q and attrs.blur[i] == 0 and attrs.alpha[i] == 1 and (full or rng.random() < 0.5):
            q.append("sharp bright")
        adj = " ".join(q) + " " if q else ""
    phrases = [(adj + ph) if j == 0 else ph for j, ph in enumerate(parts)]
    text = " and ".join(with_article(ph) for ph in phrases)
    if full or rng.random() < p:
        text += f" on a {BACKGROUNDS[attrs.background[i]]} background"
    return text


def with_article(phrase: str) -> str:
    """"a red circle" / "an orange circle": prompts must use the article the captions were trained with."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def diffusion_caption(attrs: Attributes, i: int, rng: random.Random | None = None, full: bool = False) -> str:
    """Caption for the diffusion model: coarse shape noun only ("polygon"), no quality words; attributes
    other than the shape noun are dropped at random unless ``full``."""
    return _caption(attrs, i, rng or random.Random(0), fine=False, quality_words=False, full=full)


def clip_caption(attrs: Attributes, i: int, rng: random.Random | None = None, full: bool = False,
                 p_fine: float = 0.9) -> str:
    """Caption for shapes-CLIP: the fine shape name (coarse with probability 1 - p_fine) and quality words."""
    rng = rng or random.Random(0)
    fine = full or rng.random() < p_fine
    return _caption(attrs, i, rng, fine=fine, quality_words=True, full=full)


def _one(attrs: Attributes, i: int) -> Attributes:
    """A copy of image ``i``'s attributes as a batch of one."""
    return Attributes(**{k: v[i:i + 1].clone() for k, v in attrs.__dict__.items()})


def clip_hard_negatives(attrs: Attributes, i: int, rng_state, positive: str, k: int, rng: random.Random) -> list[str]:
    """Up to ``k`` captions worded like ``positive`` (the same ``clip_caption`` draws, replayed from ``rng_state``)
    but with one attribute of image ``i`` changed (an object's shape, colour, size or position, or the background),
    or, with two objects, their colours or positions swapped: NegCLIP-style hard negatives. A random batch rarely
    holds two images that differ only in shape, position or binding, so plain contrastive training barely learns
    them; these captions make every image contrast them. A change the caption does not show is redrawn."""
    base = _one(attrs, i)
    two = int(base.n_objects[0]) == 2
    kinds = ATTRIBUTES + (("swap colour", "swap position") if two else ())
    out: list[str] = []
    for _ in range(4 * k):
        if len(out) == k:
            break
        kind = rng.choice(kinds)
        a = _one(base, 0)
        if kind.startswith("swap"):
            t = getattr(a, kind.split()[1])
            t[0] = t[0].flip(0)
        elif kind == "background":
            a.background[0] = rng.choice([v for v in range(NUM_CLASSES[kind]) if v != int(base.background[0])])
        else:
            slot = rng.randrange(2) if two else 0
            t = getattr(a, kind)
            t[0, slot] = rng.choice([v for v in range(NUM_CLASSES[kind]) if v != int(t[0, slot])])
        replay = random.Random()
        replay.setstate(rng_state)
        cap = clip_caption(a, 0, replay)
        if cap != positive and cap not in out:
            out.append(cap)
    return out


def make_batch(seed: int, n: int, device=None, caption: str | None = "diffusion", **kw):
    """Attributes, images and captions of one batch, all determined by ``seed``."""
    attrs = sample_attributes(seed, n, **kw)
    images = render(attrs, device)
    rng = random.Random(seed)
    if caption == "diffusion":
        captions = [diffusion_caption(attrs, i, rng) for i in range(n)]
    elif caption == "clip":
        captions = [clip_caption(attrs, i, rng) for i in range(n)]
    else:
        captions = None
    return attrs, images, captions


class SeedDataset(torch.utils.data.Dataset):
    """``length`` batch seeds ``base_seed + i``: the batches themselves are rendered on the model's device
    inside ``training_step`` (rendering is vectorised torch, so the GPU draws its own data)."""

    def __init__(self, length: int, base_seed: int = 0):
        self.length, self.base_seed = length, base_seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> int:
        return self.base_seed + i
