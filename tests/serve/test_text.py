"""Streamed text (stop strings, split characters) and next-token sampling, against closed forms."""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from peftlab.serve.sampling import SamplingParams, sample
from peftlab.serve.text import TextStream


def _pieces(stream: TextStream, ids: list[int]) -> tuple[list[str], bool]:
    pieces = []
    for token in ids:
        piece, stopped = stream.push(token)
        pieces.append(piece)
        if stopped:
            return pieces, True
    return pieces + [stream.flush()], False


def test_stop_string_across_tokens_is_cut_and_never_sent(tokenizer):
    ids = tokenizer("w1 w2 w3 w4")["input_ids"]
    pieces, stopped = _pieces(TextStream(tokenizer, stop=("w2 w3",)), ids)
    assert stopped and "".join(pieces) == "w1 "
    # "w2" could have started the stop string: it was held back, so no piece ever contained it.
    assert all("w2" not in p for p in pieces)


def test_without_a_stop_string_the_pieces_are_the_decoded_text(tokenizer):
    ids = tokenizer("w5 w6 w7")["input_ids"]
    pieces, stopped = _pieces(TextStream(tokenizer, stop=("w9",)), ids)
    assert not stopped and "".join(pieces) == tokenizer.decode(ids) == "w5 w6 w7"
    assert pieces[:3] == ["w5", " w6", " w7"]


def test_a_character_split_over_tokens_is_sent_whole():
    # Byte-level tokenizer with no merges: one token per UTF-8 byte, "é" is two tokens.
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                               merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    ids = tokenizer("aé")["input_ids"]
    assert len(ids) == 3
    pieces, _ = _pieces(TextStream(tokenizer), ids)
    assert pieces == ["a", "", "é", ""]


def test_top_p_samples_only_the_nucleus_with_renormalised_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    # The mass before token 2 is 0.8 >= 0.6, so the nucleus is {0, 1}, renormalised to 5/8, 3/8.
    draws = torch.tensor([sample(logits, SamplingParams(top_p=0.6), g) for _ in range(4000)])
    counts = torch.bincount(draws, minlength=3).float() / len(draws)
    assert counts[2] == 0
    assert abs(counts[0] - 5 / 8) < 0.03
    # top_p at exactly the first token's mass keeps only that token.
    assert {sample(logits, SamplingParams(top_p=0.5), g) for _ in range(200)} == {0}


def test_temperature_sampling_matches_softmax_and_a_seed_repeats():
    logits = torch.tensor([2.0, 1.0, 0.0])
    params = SamplingParams(temperature=0.5)
    g = torch.Generator().manual_seed(1)
    draws = torch.tensor([sample(logits, params, g) for _ in range(4000)])
    expected = torch.softmax(logits / 0.5, -1)
    assert torch.allclose(torch.bincount(draws, minlength=3).float() / len(draws), expected, atol=0.03)
    first, again = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert [sample(logits, params, first) for _ in range(30)] == [sample(logits, params, again) for _ in range(30)]


def test_sampling_params_refuse_bad_values():
    import pytest

    for bad in ({"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"stop": ("",)}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
