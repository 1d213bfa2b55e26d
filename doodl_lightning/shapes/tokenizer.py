"""A CLIP tokenizer built offline from open_clip's packaged BPE vocabulary.

No network: open_clip ships ``bpe_simple_vocab_16e6.txt.gz`` (the OpenAI CLIP BPE merges). From it we
write ``vocab.json`` + ``merges.txt`` in ``transformers.CLIPTokenizer``'s own file format and load them
with ``CLIPTokenizer.from_pretrained`` -- the same code path as a hub tokenizer. Token ids equal
open_clip's ``SimpleTokenizer`` ids (49408 tokens; ``<|startoftext|>`` = 49406, ``<|endoftext|>`` = 49407),
i.e. those of SD-1.x's tokenizer.

Users: the shapes world's diffusion model (``build_small_clip_tokenizer``) and the tiny SD pipeline of
``doodl_lightning.testing.tiny`` (``build_clip_tokenizer``).
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

__all__ = ["build_clip_tokenizer", "build_small_clip_tokenizer", "write_clip_vocab_files", "clip_bpe_path"]

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def clip_bpe_path() -> str:
    """Path of open_clip's packaged BPE merges file."""
    import open_clip

    return os.path.join(os.path.dirname(os.path.abspath(open_clip.__file__)), "bpe_simple_vocab_16e6.txt.gz")


def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable unicode map of GPT-2/CLIP BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _load_merges(bpe_path: str | None = None) -> list[tuple[str, str]]:
    lines = gzip.open(bpe_path or clip_bpe_path()).read().decode("utf-8").split("\n")
    return [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]


def _write_files(out: Path, merges: list[tuple[str, str]]) -> tuple[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    byte_syms = list(_bytes_to_unicode().values())
    vocab = byte_syms + [s + "</w>" for s in byte_syms] + ["".join(m) for m in merges] + [BOS, EOS]
    encoder = {tok: i for i, tok in enumerate(vocab)}
    vocab_file = out / "vocab.json"
    merges_file = out / "merges.txt"
    vocab_file.write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return str(vocab_file), str(merges_file)


def write_clip_vocab_files(out_dir: str | os.PathLike, bpe_path: str | None = None) -> tuple[str, str]:
    """Write ``vocab.json`` and ``merges.txt`` (CLIPTokenizer format) into ``out_dir``.

    The vocabulary is built exactly as open_clip's SimpleTokenizer builds it: 256 byte symbols, the same
    with ``</w>``, one token per merge, then the two special tokens (named as in CLIPTokenizer).
    """
    return _write_files(Path(out_dir), _load_merges(bpe_path))


def _bpe_merges_used(word: str, ranks: dict[tuple[str, str], int]) -> set[tuple[str, str]]:
    # Run CLIP's BPE on one pre-tokenised word and record the merges it applies.
    b2u = _bytes_to_unicode()
    sym = [b2u[b] for b in word.encode("utf-8")]
    sym[-1] = sym[-1] + "</w>"
    used = set()
    while len(sym) > 1:
        pairs = [(sym[i], sym[i + 1]) for i in range(len(sym) - 1)]
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        used.add(best)
        out, i = [], 0
        while i < len(sym):
            if i < len(sym) - 1 and (sym[i], sym[i + 1]) == best:
                out.append(sym[i] + sym[i + 1])
                i += 2
            else:
                out.append(sym[i])
                i += 1
        sym = out
    return used


def _load(tmp: str, model_max_length: int):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(
        tmp, model_max_length=model_max_length, bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )


def _save(tok, save_dir, merges) -> None:
    tok.save_pretrained(str(save_dir))
    # also the slow-tokenizer files, so transformers versions without tokenizer.json support load it
    _write_files(Path(save_dir), merges)


def build_small_clip_tokenizer(
    words, save_dir: str | os.PathLike | None = None, model_max_length: int = 77
):
    """A CLIPTokenizer whose vocabulary is the 512 byte symbols plus only the CLIP merges needed to spell
    ``words`` (lower-case words or word pieces), plus the special tokens.

    Each listed word splits into exactly the same sub-word strings as with the full CLIP vocabulary
    (BPE applies merges by rank, and every merge the full BPE would use is kept); any other text still
    tokenises, byte by byte. Ids differ from open_clip's: this is for small text encoders (an embedding
    table of ~600 rows instead of 49408) such as the shapes world's diffusion model.
    """
    import regex

    merges = _load_merges()
    ranks = {m: i for i, m in enumerate(merges)}
    pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
    used: set[tuple[str, str]] = set()
    for w in words:
        for piece in pat.findall(w.lower()):
            used |= _bpe_merges_used(piece, ranks)
    kept = [m for m in merges if m in used]  # original rank order
    return _tokenizer_from_merges(kept, save_dir, model_max_length)


def build_clip_tokenizer(save_dir: str | os.PathLike | None = None, model_max_length: int = 77):
    """Build a ``transformers.CLIPTokenizer`` offline with open_clip's vocabulary (same ids).

    If ``save_dir`` is given, the tokenizer is also written there with ``save_pretrained`` so that
    ``CLIPTokenizer.from_pretrained(save_dir)`` (or a pipeline's ``tokenizer/`` subfolder) reloads it.
    """
    return _tokenizer_from_merges(_load_merges(), save_dir, model_max_length)


def _tokenizer_from_merges(merges, save_dir, model_max_length: int):
    """A CLIPTokenizer over ``merges`` loaded through its own file format (saved to ``save_dir`` if given)."""
    with tempfile.TemporaryDirectory() as tmp:
        _write_files(Path(tmp), merges)
        tok = _load(tmp, model_max_length)
    if save_dir is not None:
        _save(tok, save_dir, merges)
    return tok
