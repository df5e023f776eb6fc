import pytest
import torch

from tokensparse.vocab import WORDS, detokenize, tokenize


def test_roundtrip_and_padding():
    ids = tokenize(["place the subject", ""])
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    assert detokenize(ids) == ["place the subject", ""]
    assert int(ids[1].abs().sum()) == 0


def test_unknown_word_is_named():
    with pytest.raises(ValueError, match="'zebra'"):
        tokenize("place the zebra")


def test_words_unique():
    assert len(set(WORDS)) == len(WORDS)


def test_tokenize_rejects_bad_arguments():
    import pytest

    from tokensparse.vocab import tokenize

    for bad in (None, 3, b"red"):
        with pytest.raises(TypeError, match="prompt"):
            tokenize(bad)
    for bad, err in ((-1, ValueError), (1.5, TypeError), ("16", TypeError), (True, TypeError)):
        with pytest.raises(err, match="max_len"):
            tokenize("red", max_len=bad)


def test_detokenize_refuses_ids_that_name_no_word():
    with pytest.raises(ValueError, match="word ids must be in"):
        detokenize(torch.tensor([[-1, 3]]))  # was read from the end of WORDS: 'gradient denoise'
    with pytest.raises(ValueError, match="word ids must be in"):
        detokenize(torch.tensor([[len(WORDS) + 1]]))  # was an IndexError
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        detokenize(torch.tensor([1, 2]))
    assert detokenize(torch.tensor([[len(WORDS), 0]])) == [WORDS[-1]]
