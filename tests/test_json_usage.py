"""The usage of a JSON answer read from its top-level ``usage`` member alone: the same
result as parsing the whole answer, for every shape of document."""

from __future__ import annotations

import json

import pytest

from openaigw.usage import Usage, UsageMeter, _json_usage, _usage_of

USAGE = {"prompt_tokens": 14, "completion_tokens": 9, "total_tokens": 23,
         "prompt_tokens_details": {"cached_tokens": 0}}
CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": 'say "usage": {"prompt_tokens": 1}'}}],
    "usage": USAGE, "system_fingerprint": "fp_1"}
OTHER = {"prompt_tokens": 1, "completion_tokens": 2}


def texts(value) -> list:
    """``value`` as JSON in several spellings."""
    return [json.dumps(value).encode(), json.dumps(value, separators=(",", ":")).encode(),
            json.dumps(value, indent=2).encode(), json.dumps(value, ensure_ascii=False).encode(),
            b" \r\n" + json.dumps(value).encode() + b"\n\t "]


DOCUMENTS = {
    "chat, usage before the last member": CHAT,
    "usage last": {"data": [{"embedding": [0.1, 0.2]}], "usage": {"prompt_tokens": 8, "total_tokens": 8}},
    "usage first": {"usage": USAGE, "choices": [], "x": {"y": [1, {"z": None}]}},
    "only usage": {"usage": OTHER},
    "usage null, Responses API nested": {"usage": None, "response": {"usage": {"input_tokens": 5, "output_tokens": 7}}},
    "Responses API answer": {"object": "response", "output": [], "usage": {"input_tokens": 5, "output_tokens": 7}},
    "nested usage only": {"choices": [{"usage": OTHER}], "id": "x"},
    "nested usage after the top-level one": {"usage": USAGE, "choices": [{"usage": OTHER}]},
    "usage as a string value": {"usage": USAGE, "note": "usage", "kind": ["usage", {"a": "usage"}]},
    "counts not integers": {"usage": {"prompt_tokens": True, "completion_tokens": 2}},
    "usage not an object": {"usage": [1, 2], "choices": []},
    "no usage": {"id": "x", "choices": []},
    "unicode around": {"content": "héllo \u2028 😀", "usage": OTHER, "after": "ü"},
    "not an object": [{"usage": OTHER}],
    "scalars of every kind after": {"usage": OTHER, "a": -1.5e-3, "b": 0, "c": True, "d": False, "e": None,
                                    "f": "tab\t \"quoted\" \\ / \u00e9 😀", "g": ""},
    "a string after that looks like an end": {"usage": OTHER, "a": "} ,\"usage\": {}"},
}


def reference(body: bytes):
    try:
        return _usage_of(json.loads(body))
    except (ValueError, RecursionError):
        return None


@pytest.mark.parametrize("name", DOCUMENTS)
def test_same_usage_as_a_whole_parse(name):
    for body in texts(DOCUMENTS[name]):
        assert _json_usage(body) == reference(body), body


SPELLED = {
    "duplicate top-level keys: the last counts": b'{"usage": {"prompt_tokens": 1}, "usage": {"prompt_tokens": 2}}',
    "a later key spelled with escapes": b'{"usage": {"prompt_tokens": 1}, "us\\u0061ge": {"prompt_tokens": 2}}',
    "the only key spelled with escapes": b'{"\\u0075sage": {"prompt_tokens": 3}}',
    "a key that ends in usage": b'{"x\\"usage": {"prompt_tokens": 3}}',
    "in a string, escaped": b'{"a": "\\"usage\\": {\\"prompt_tokens\\": 1}}"}',
    "UTF-16": json.dumps({"usage": OTHER}).encode("utf-16"),
    "UTF-16 without BOM": json.dumps({"usage": OTHER}).encode("utf-16-le"),
    "UTF-32": json.dumps({"usage": OTHER}).encode("utf-32"),
    "UTF-8 BOM": b"\xef\xbb\xbf" + json.dumps({"usage": OTHER}).encode(),
    "cut short in the usage": b'{"id": "x", "usage": {"prompt_tokens": 1',
    "extra data after": b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}} {}',
    "unclosed after": b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "x": 1',
    "bad member after": b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "x" 1}',
    "bad UTF-8 after": b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "x": "\xff"}',
    "deep after": b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "x": ' + b"[" * 100000 + b"]" * 100000 + b"}",
    "empty": b"",
    "not JSON": b"usage",
    "a control character after": b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "x": "a\x01"}',
    "a bad number after": b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "x": 01}',
    "an escaped pair after": b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "x": "\\ud83d\\ude00"}',
    "a bad escape after": b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "x": "\\x"}',
}


@pytest.mark.parametrize("name", SPELLED)
def test_same_usage_as_a_whole_parse_for_odd_spellings(name):
    assert _json_usage(SPELLED[name]) == reference(SPELLED[name])


def test_what_comes_before_the_member_is_not_checked():
    """The one difference from a whole parse: an answer malformed only before its
    usage is still metered by the count it gives."""
    body = b'{"choices": [oops], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}'
    assert reference(body) is None
    assert _json_usage(body) == Usage(1, 2, 3)


def test_meter_reads_the_usage_of_an_answer_in_several_reads():
    body = json.dumps(CHAT).encode()
    meter = UsageMeter(b"application/json; charset=utf-8", b"", False)
    for i in range(0, len(body), 7):
        assert meter.feed(body[i:i + 7]) == body[i:i + 7]
    meter.finish(True)
    assert meter.usage(lambda: 0) == Usage(14, 9, 23)
