"""The offline CLIP tokenizer gives open_clip's ids and round-trips through save/from_pretrained."""
import pytest

open_clip = pytest.importorskip("open_clip")
from transformers import CLIPTokenizer

from doodl_lightning.shapes.tokenizer import build_clip_tokenizer, build_small_clip_tokenizer

STRINGS = [
    "a photo of a cat",
    "A small RED triangle at the top-left!",
    "it's  3 dogs, don't   worry",
    "héllo wörld",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_clip_tokenizer(save_dir=d)
    return d


def _open_clip_ids(s):
    ids = open_clip.tokenize([s])[0]
    return ids[: int((ids != 0).sum())].tolist()


@pytest.mark.parametrize("s", STRINGS)
def test_ids_match_open_clip(tok_dir, s):
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    assert tok(s)["input_ids"] == _open_clip_ids(s)


def test_special_tokens_and_padding(tok_dir):
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407 and tok.pad_token_id == 49407
    ids = tok("a red polygon", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407


def test_small_vocab_keeps_open_clip_segmentation(tmp_path):
    words = ["a", "red", "polygon", "at", "the", "top", "left"]
    small = build_small_clip_tokenizer(words, save_dir=tmp_path)
    full = build_clip_tokenizer()
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) < 1000
    s = "a red polygon at the top left"
    assert small.convert_ids_to_tokens(small(s).input_ids) == full.convert_ids_to_tokens(full(s).input_ids)
    assert reloaded(s).input_ids == small(s).input_ids
    # any text still tokenises (byte fallback), never to unknown
    assert small.unk_token_id not in reloaded("zebra!").input_ids[1:-1]
