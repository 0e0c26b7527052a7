"""Stop tokens, stop strings and max_tokens applied to a stream of token ids."""

from jaxllm.request_output import RequestOutput
from jaxllm.sampling import SamplingParams
from jaxllm.tokenizer import byte_level_tokenizer

TOKENIZER = byte_level_tokenizer()
EOS = 257


def feed(text_or_ids, **params):
    ids = list(text_or_ids.encode()) if isinstance(text_or_ids, str) else text_or_ids
    out = RequestOutput(TOKENIZER, SamplingParams(**{"max_tokens": 100, **params}))
    pieces = []
    for token in ids:
        pieces.append(out.add(token))
        if out.finished:
            break
    return out, pieces


def test_eos_stops_and_is_kept_in_ids_but_not_text():
    out, _ = feed([104, 105, EOS, 106])
    assert (out.text, out.token_ids, out.finish_reason) == ("hi", [104, 105, EOS], "stop")


def test_ignore_eos_and_stop_token_ids():
    out, _ = feed([104, EOS, 105], ignore_eos=True, max_tokens=3)
    assert out.finish_reason == "length" and out.text == "hi"
    out, _ = feed([104, 105, 106], stop_token_ids=[105])
    assert out.text == "h" and out.finish_reason == "stop"


def test_max_tokens_finishes_with_length():
    out, pieces = feed("abcdef", max_tokens=3)
    assert out.text == "abc" and "".join(pieces) == "abc" and out.finish_reason == "length"


def test_stop_string_across_tokens_is_held_back_then_dropped():
    out, pieces = feed("hello<|end|>world", stop=["<|end|>"])
    assert out.text == "hello" and out.finish_reason == "stop"
    assert "".join(pieces) == "hello"
    assert all("<" not in p for p in pieces)  # the partial stop string never reached the user


def test_a_false_start_of_a_stop_string_is_released():
    out, pieces = feed("a<|e>b", stop=["<|end|>"], max_tokens=6)
    assert out.text == "a<|e>b" and "".join(pieces) == "a<|e>b"
    assert out.finish_reason == "length"


def test_held_text_is_flushed_when_length_ends_the_request():
    out, pieces = feed("ab<|", stop=["<|end|>"], max_tokens=4)
    assert out.text == "ab<|" and "".join(pieces) == "ab<|"


def test_multibyte_characters_are_never_split():
    out, pieces = feed("é🙂x")
    assert out.text == "é🙂x"
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "é🙂x"
