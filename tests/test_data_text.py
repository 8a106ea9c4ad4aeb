"""Text side: official cleaning, WordPiece vs transformers.BertTokenizer, task encodings."""


import numpy as np
import pytest

from mplug2_jax.data import text as text_lib
from mplug2_jax.data import text as T

VOCABS = [str(text_lib.BERT_VOCAB_FILE)]  # shipped with the package


@pytest.fixture(scope="module")
def tok():
  return T.WordPieceTokenizer(VOCABS[0])


@pytest.fixture(scope="module")
def hf():
  transformers = pytest.importorskip("transformers")
  return transformers.BertTokenizer(VOCABS[0])


def test_pre_question():
  assert T.pre_question("What's the man (left) holding?!", 30) == "whats the man left holding"
  assert T.pre_question("x-ray/scan  now ", 30) == "x ray scan  now"
  # Splits on single spaces: the empty word between the two spaces counts.
  assert T.pre_question("a  b c", 2) == "a "
  assert T.pre_question("one two three", 2) == "one two"


def test_pre_caption():
  assert T.pre_caption("A <person> is   Slicing tomatoes.", 80) == "a person is slicing tomatoes"
  assert T.pre_caption("  well-known /path  ", 80) == "well known path"
  assert T.pre_caption("a b c d", 3) == "a b c"
  assert T.pre_caption("?!...", 80) == ""


STRINGS = [
    "a video ofa man is singing[SEP]", "Café naïve résumé 日本語 tokens!!",
    "[sep] [MASK] x[CLS]y [PAD] [UNK]", "don't   stop-me/now \t\n ok",
    "supercalifragilisticexpialidociousness", "\u200b zero\u0000width \ufffd",
    "what is the man holding?", "", "   ", "ﬁ ligature Ⅻ numerals ½", "emoji 🙂 ok",
    "x" * 120, "COVID-19 (2020) costs $3.50, e.g. 50%",
]


@pytest.mark.parametrize("s", STRINGS)
def test_wordpiece_matches_bert_tokenizer(tok, hf, s):
  expected = hf(s).input_ids
  assert expected[-1] == T.SEP_ID
  # Official convention: [CLS] X without the trailing [SEP].
  assert tok.encode(s) == expected[:-1]
  # The official code ran transformers 4.x, whose decode cleaned up spaces by default.
  assert tok.decode(expected) == hf.decode(expected, clean_up_tokenization_spaces=True)


def test_special_ids(tok):
  assert tok.vocab_size == 30522
  assert tok.encode("[PAD] [UNK] [CLS] [SEP] [MASK]") == [101, 0, 100, 101, 102, 103]


def test_caption_official(tok, hf):
  out = T.encode_caption(tok, "a man is singing")
  ids = hf("a video of" + "a man is singing" + "[SEP]").input_ids[:-1]
  n = len(ids)
  np.testing.assert_array_equal(out["caption_ids"][:n], ids)
  assert out["caption_ids"].shape == (20,) and not out["caption_ids"][n:].any()
  np.testing.assert_array_equal(out["caption_mask"], (np.arange(20) < n).astype(np.int32))
  # prompt_length = len([CLS] a video of) - 1 = 3: the last prompt piece "of" is a target.
  assert T.caption_prompt_length(tok, "a video of", off_by_one=True) == 3
  labels = out["caption_labels"]
  assert (labels[:3] == -100).all() and labels[3] == ids[3] == tok.pieces("of")[0]
  assert (labels[n:] == -100).all() and labels[n - 1] == T.SEP_ID
  # Long captions are cut at 20 tokens and lose their [SEP].
  long = T.encode_caption(tok, " ".join(["word"] * 40))
  assert long["caption_mask"].all() and T.SEP_ID not in long["caption_ids"]


def test_caption_intended_variant(tok):
  out = T.encode_caption(tok, "a man", prompt_join=" ", off_by_one=False)
  assert list(out["caption_ids"][:7]) == [101] + tok.pieces("a video of a man") + [102]
  assert (out["caption_labels"][:4] == -100).all() and out["caption_labels"][4] != -100


def test_answer_encoding(tok):
  out = T.encode_answer(tok, "guitar", 6)
  assert list(out["answer_ids"]) == [101, tok.pieces("guitar")[0], 102, 0, 0, 0]
  assert list(out["answer_labels"][3:]) == [-100] * 3


def test_vqa_weights():
  answers, weights = T.vqa_answer_weights(["red"] * 7 + ["orange"] * 2 + ["red and white"])
  assert answers == ["red", "orange", "red and white"]
  np.testing.assert_allclose(weights, [0.7, 0.2, 0.1])
  assert T.vqa_answer_weights("water", "vg") == (["water"], [0.5])


def test_sentencepiece_cli(tmp_path):
  from mplug2_jax.data import spm

  corpus = tmp_path / "corpus.txt"
  rng = np.random.default_rng(0)
  words = ["red", "green", "circle", "square", "moves", "left", "right", "the", "a", "video"]
  corpus.write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(500)))
  spm.main(["--input", str(corpus), "--model_prefix", str(tmp_path / "m"), "--vocab_size", "40"])
  sp = spm.SentencePieceTokenizer(str(tmp_path / "m.model"))
  ids, mask = sp.encode_padded("the red circle moves left", 12)
  assert ids[0] == sp.cls_id == 2 and sp.pad_id == 0 and mask.sum() > 2
  assert sp.decode(ids) == "the red circle moves left"
  import pickle
  assert pickle.loads(pickle.dumps(sp)).encode("a video") == sp.encode("a video")
