"""Token ids every layer agrees on: the ignored label and the special ids of the two
vocabularies (BERT-base-uncased WordPiece for mPLUG-2, LLaMA SentencePiece for Owl2)."""

IGNORE_INDEX = -100  # label of a position that carries no loss (PyTorch's ignore_index)

# BERT uncased WordPiece (mPLUG-2).
BERT_PAD_ID, BERT_CLS_ID, BERT_SEP_ID, BERT_MASK_ID = 0, 101, 102, 103
BERT_FIRST_WORD_ID = 104  # ids below are [PAD], [unused*], [UNK], [CLS], [SEP], [MASK]
# Grounding box tokens (M1 `model_grounding_mplug.py:82-91`): bin q in 0..336 is
# [unused{340 + q}], ids 345..681 of the uncased vocabulary (data/grounding.py checks them).
BERT_BOX_FIRST_ID, BERT_BOX_BINS = 345, 336

# LLaMA SentencePiece (mPLUG-Owl2): <unk> = pad, <s>, </s>; the image placeholder is not a
# vocabulary entry (official `IMAGE_TOKEN_INDEX`).
LLAMA_PAD_ID, LLAMA_BOS_ID, LLAMA_EOS_ID = 0, 1, 2
IMAGE_TOKEN_INDEX = -200
