"""Items — (prompt, seed) pairs — from YAML lists or a prompt file, and their split over ranks."""
from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Item:
    index: int   # position in the full item list: stable across ranks and restarts
    prompt: str
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def read_prompt_file(path: str) -> list[str]:
    """Prompts from a .txt (one per line, '#' comments) or a .csv with a ``prompt`` column."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist: give a .txt (one prompt per line) or .csv with a 'prompt' column")
    data = p.read_bytes()
    # a NUL byte is never text: a binary file (or a broken export) would otherwise become "prompts"
    if b"\x00" in data:
        raise ValueError(f"prompt file {path} contains NUL bytes (byte {data.index(0)}), so it is not a text file: "
                         "give a UTF-8 .txt (one prompt per line) or .csv with a 'prompt' column")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {path} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}): "
                         "save it as UTF-8, one prompt per line (.txt) or with a 'prompt' column (.csv)") from None
    if p.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise ValueError(f"{path}: a CSV prompt file needs a 'prompt' column (found {reader.fieldnames})")
        prompts = [(row["prompt"] or "").strip() for row in reader]
    else:
        lines = text.splitlines()
        prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    prompts = [q for q in prompts if q]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def make_items(prompts: list[str] | None, seeds: list[int], prompt_file: str | None = None) -> list[Item]:
    """Every prompt with every seed, prompt-major: [(p0, s0), (p0, s1), ..., (p1, s0), ...]."""
    if prompts and prompt_file:
        raise ValueError("give prompts or prompt_file, not both")
    prompts = read_prompt_file(prompt_file) if prompt_file else list(prompts or [])
    if not prompts:
        raise ValueError("the prompt list is empty: give model.prompts: [...] or model.prompt_file")
    if not all(isinstance(q, str) for q in prompts):
        raise ValueError("prompts must be strings")
    if any("\x00" in q for q in prompts):
        raise ValueError("a prompt contains a NUL character: remove it (prompts are plain text)")
    if not seeds:
        raise ValueError("the seed list is empty: give model.seeds: [0, 1, ...]")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0 or s >= 2**63:
            raise ValueError(f"seeds must be non-negative integers, got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"duplicate seeds in {list(seeds)}")
    return [Item(i, q, s) for i, (q, s) in enumerate((q, s) for q in prompts for s in seeds)]


def shard(items: list[Item], rank: int, world_size: int) -> list[Item]:
    """The items one rank owns: ``items[rank::world_size]`` (NVlabs/edm style)."""
    return items[rank::world_size]


def unshard(rows: torch.Tensor, n_items: int) -> torch.Tensor:
    """The inverse of ``shard`` for per-item values: row r of ``rows`` (world, m) holds items r, r + world, ...
    (padded); returns the (n_items,) vector in item order."""
    world = rows.shape[0]
    out = torch.empty(n_items, dtype=rows.dtype)
    for r in range(world):
        out[r::world] = rows[r, : len(range(r, n_items, world))]
    return out


def initial_noise(item: Item, shape: tuple[int, ...]) -> torch.Tensor:
    """x_T of an item from its own seed: the same whatever the batch, rank or device (float32, CPU)."""
    g = torch.Generator().manual_seed(item.seed)
    return torch.randn(shape, generator=g, dtype=torch.float32)


def step_generator(item: Item, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for randomness of ``item`` at optimisation ``step`` (cutouts, perturbation).

    Derived from (seed, step, stream) only, so a resumed run and a run on any number of ranks draw
    the same numbers.
    """
    return torch.Generator().manual_seed((item.seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**63 - 1))


def load_control_image(path: str, size: tuple[int, int]) -> torch.Tensor:
    """A ControlNet conditioning image as a (1, 3, H, W) float32 tensor in [0, 1], prepared as diffusers'
    ControlNet pipelines do (RGB, stretched to ``size`` (W, H) with Lanczos, not normalised)."""
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"control image {path} does not exist: give a PNG or JPEG per prompt in model.control_images")
    try:
        im = Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"control image {path} is not a readable image ({e}): give a PNG or JPEG file") from None
    im = im.resize(size, Image.LANCZOS)
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size[1], size[0], 3)
    return (x.permute(2, 0, 1).float() / 255.0).unsqueeze(0)


def load_source_image(path: str, size: tuple[int, int]) -> torch.Tensor:
    """An image to edit as a (1, 3, H, W) float64 tensor in [-1, 1], prepared as the official code does.

    EXIF orientation applied, centre-cropped to a square, resized to ``size`` (W, H) with PIL's
    bicubic filter (the official ``load_im_into_format_from_path``; its later LANCZOS resize to the same
    size is a no-op), and an alpha channel composited on white.
    """
    from PIL import Image, ImageOps

    try:
        im = ImageOps.exif_transpose(Image.open(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"source_image {path} is not a readable image ({e}): give a PNG or JPEG file") from None
    w, h = im.size
    m = min(w, h)
    im = im.crop(((w - m) // 2, (h - m) // 2, (w - m) // 2 + m, (h - m) // 2 + m)) if w != h else im
    im = im.convert("RGBA") if im.mode in ("RGBA", "LA", "P", "PA") else im.convert("RGB")
    im = im.resize(size, Image.BICUBIC)
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size[1], size[0], len(im.getbands()))
    x = x.permute(2, 0, 1).double() / 255.0
    if x.shape[0] == 4:  # composite on white: rgb a + (1 - a)
        x = x[:3] * x[3:] + (1 - x[3:])
    return (x * 2 - 1).unsqueeze(0)  # float64: the encoder casts it to its own dtype
