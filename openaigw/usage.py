"""Token usage: read from answers as they pass, or estimated when an answer is cut short."""

from __future__ import annotations

import json
import re
import zlib
from typing import Any, Callable, Dict, List, NamedTuple, Optional

from openaigw.sse import EventSplitter, event_data, split_events

JSON_COPY_LIMIT = 16 << 20  # bytes of a JSON answer kept to read its usage
EVENT_LIMIT = 1 << 20  # an unfinished event longer than this: stop looking (estimate)
DECODE_LIMIT = 1 << 20  # bytes one compressed read may expand to before we stop looking
_NULL_USAGE = (b',"usage":null', b'"usage":null,', b', "usage": null', b'"usage": null, ')
_DECODER = json.JSONDecoder()
_KEY_END = re.compile(r"[ \t\n\r]*:[ \t\n\r]*")  # (JSON's whitespace)
# What may follow a top-level member for :func:`_last_usage` to be sure: members with
# plain keys and scalar values (as JSON's grammar has them), then the object's end.
_STRING = r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9A-Fa-f]{4})*"'
_SCALAR = _STRING + r"|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null"
_LAST_MEMBERS = re.compile(
    r'(?:[ \t\n\r]*,[ \t\n\r]*"[^"\\\x00-\x1f]*"[ \t\n\r]*:[ \t\n\r]*(?:%s))*[ \t\n\r]*\}[ \t\n\r]*' % _SCALAR)
_UNSURE = object()


class Usage(NamedTuple):
    """Tokens an answer used (``estimated``: counted by the gateway, not the upstream).
    (A NamedTuple: made for every answer, at under half a frozen dataclass's cost.)"""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated: bool = False


def ask_for_usage(body: Dict[str, Any]) -> bool:
    """Make a streaming chat or completions request ask for the usage chunk; True if it
    had not.  (Other APIs, such as Responses, report usage in their streams anyway.)"""
    if body.get("stream") is not True or not ("messages" in body or "prompt" in body):
        return False
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return True


def with_usage_asked(raw: bytes) -> Optional[bytes]:
    """``raw``, the text of a JSON object that has no ``stream_options``, asking for the
    usage chunk: the member put first, the client's bytes otherwise as they came (no
    re-encoding of a body that may be long).  None if ``raw`` is not UTF-8 text that
    opens an object (JSON may come in UTF-16 or 32 too): serialise it instead."""
    start = len(raw) - len(raw.lstrip(b" \t\r\n"))
    if raw[start : start + 1] != b"{" or raw.find(b"\x00", 0, start + 4) >= 0:
        return None
    return raw[: start + 1] + b'"stream_options":{"include_usage":true},' + raw[start + 1 :]


def estimate_prompt_tokens(body: Any) -> int:
    """About four characters a token, over the text of messages, prompt or input."""
    if not isinstance(body, dict):
        return 0
    chars = 0
    count = 0
    pending = []
    for key in ("messages", "prompt", "input"):
        if key in body:
            pending.append(body[key])
            count += len(body[key]) if isinstance(body[key], list) and key == "messages" else 0
    while pending:  # a stack, not a recursive closure: no reference cycle per call
        value = pending.pop()
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, dict):
            pending.extend(value[key] for key in ("content", "text", "input", "prompt") if key in value)
    return chars // 4 + 4 * count


def _usage_of(answer: Any) -> Optional[Usage]:
    """The usage of a chat/completions answer or chunk, or of a Responses API one
    (``response.usage`` in its stream events)."""
    if not isinstance(answer, dict):
        return None
    usage = _parse_usage(answer.get("usage"))
    if usage is None and isinstance(answer.get("response"), dict):
        usage = _parse_usage(answer["response"].get("usage"))
    return usage


def _last_usage(body: bytes) -> Any:
    """The ``usage`` member of the JSON object ``body``, found without parsing all of
    it: the last ``"usage"`` in the text, if it is a key whose value and the members
    after it (plain keys, scalar values) close the top-level object (so, in a valid
    document, the top-level object's last ``usage``).  None when the text names no ``usage`` at all (nor
    could, with escapes); ``_UNSURE`` when only a whole parse can tell.  (What comes
    before the member is not checked: an answer malformed only there is still
    metered by its own count.)"""
    at = body.rfind(b'"usage"')
    if at < 0:
        return None if body.find(b"\\u") < 0 else _UNSURE  # ("us\u0061ge" is "usage" too)
    before = at - 1
    while before >= 0 and body[before] in b" \t\n\r":
        before -= 1
    if before < 0 or body[before] not in b"{,":  # not a key (or in a string: \"usage")
        return _UNSURE
    try:
        text = body[at:].decode("utf-8", "surrogatepass")  # (an ASCII quote: never mid-character)
        colon = _KEY_END.match(text, 7)
        if colon is None:
            return _UNSURE
        usage, end = _DECODER.raw_decode(text, colon.end())
    except (ValueError, RecursionError):
        return _UNSURE
    # (Keys after it are plain: none is "usage" spelled with escapes.)
    return usage if _LAST_MEMBERS.fullmatch(text, end) else _UNSURE


def _json_usage(body: bytes) -> Optional[Usage]:
    """The usage of a JSON answer (``_usage_of`` the parsed answer), from its
    top-level ``usage`` member alone when :func:`_last_usage` finds it."""
    if body[:4].find(b"\x00") >= 0 or body[:2] in (b"\xff\xfe", b"\xfe\xff"):
        found: Any = _UNSURE  # UTF-16 or 32 (as json.loads detects it)
    else:
        found = _last_usage(body)
    if found is None:
        return None
    if found is not _UNSURE:
        usage = _parse_usage(found)
        if usage is not None:
            return usage
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return _usage_of(answer)


def _parse_usage(value: Any) -> Optional[Usage]:
    if not isinstance(value, dict):
        return None
    prompt = value.get("prompt_tokens", value.get("input_tokens"))
    completion = value.get("completion_tokens", value.get("output_tokens", 0))
    if type(prompt) is not int or type(completion) is not int:  # (true is no count either)
        return None
    total = value.get("total_tokens")
    return Usage(prompt, completion, total if type(total) is int else prompt + completion)


class UsageMeter:
    """Watches one response body for its ``usage``, without holding a stream.

    Event streams are cut into events to find the usage chunk (and, with
    ``strip_usage``, to keep it, and the ``"usage": null`` fields the request did not
    ask for, from the client).  JSON answers are copied, up to a bound, and read at
    the end.  Compressed bodies (gzip, deflate) are inspected through a decoded copy
    and relayed untouched.
    """

    def __init__(
        self,
        content_type: bytes,
        content_encoding: bytes,
        strip_usage: bool,
    ) -> None:
        media = content_type.split(b";", 1)[0].strip().lower()
        self._sse = media == b"text/event-stream"
        self._json = media == b"application/json" or media.endswith(b"+json")
        encoding = content_encoding.strip().lower()
        self._decoder: Any = None
        if encoding in (b"gzip", b"x-gzip", b"deflate"):
            self._decoder = zlib.decompressobj(47)  # gzip or zlib header, detected
        elif encoding not in (b"", b"identity"):
            self._sse = self._json = False  # cannot read it: estimate
        self._strip = strip_usage and self._sse and self._decoder is None
        self._splitter = EventSplitter()
        self._copy: List[bytes] = []
        self._copied = 0
        self._events = 0
        self._bytes = 0
        self._found: Optional[Usage] = None

    def feed(self, data: bytes) -> bytes:
        """Observe ``data``; return the bytes to relay to the client."""
        self._bytes += len(data)
        plain = data
        if self._decoder is not None:
            try:
                plain = self._decoder.decompress(data, DECODE_LIMIT)
            except zlib.error:
                self._give_up()
                return data
            if self._decoder.unconsumed_tail:  # expands too much (or a bomb): stop looking
                self._give_up()
                return data
        if self._sse:
            events, count = self._splitter.take(plain)
            # Only events naming "usage" need a look: the last ones (or, once the
            # gateway asked for usage, every one: "usage":null, stripped).
            if events.find(b'"usage"') < 0:  # (find, not in: see EventSplitter)
                self._events += count
            elif count == 1:
                events = self._sse_event(events)
            else:
                events = b"".join([self._sse_event(event) for event in split_events(events)])
            if len(self._splitter.pending) > EVENT_LIMIT:
                strip, rest = self._strip, self._splitter.pending
                self._give_up()
                return events + rest if strip else data
            if self._strip:
                return events
        elif self._json:
            self._copy.append(plain)
            self._copied += len(plain)
            if self._copied > JSON_COPY_LIMIT:
                self._give_up()
        return data

    def _give_up(self) -> None:
        """Stop inspecting (the usage will be estimated) and just relay."""
        self._decoder = None
        self._sse = self._json = self._strip = False
        self._copy = []

    def _sse_event(self, event: bytes) -> bytes:
        if event.find(b'"usage"') < 0:
            self._events += 1
            return event
        if event.find(b'"usage":{') >= 0 or event.find(b'"usage": {') >= 0:
            data = event_data(event)
            try:
                chunk = json.loads(data) if data else None
            except (ValueError, RecursionError):
                chunk = None
            usage = _usage_of(chunk)
            if usage is not None:
                self._found = usage
                if self._strip and not chunk.get("choices"):
                    return b""  # the chunk the gateway asked for, not the client
        else:
            self._events += 1
        if self._strip:
            for null in _NULL_USAGE:
                event = event.replace(null, b"")
                if event.find(b'"usage"') < 0:
                    break  # (every pattern names it: nothing left to strip)
        return event

    def finish(self, complete: bool) -> bytes:
        """The body ended (``complete``: cleanly); return any bytes still to relay."""
        if self._json and complete:
            self._found = _json_usage(b"".join(self._copy))
        self._copy = []
        return self._splitter.rest() if self._strip and complete else b""

    def usage(self, prompt_estimate: Callable[[], int]) -> Usage:
        """The upstream's own count, or an estimate flagged as such (the prompt's
        tokens from ``prompt_estimate``)."""
        if self._found is not None:
            return self._found
        completion = self._events if self._sse else self._bytes // 4
        prompt = prompt_estimate()
        return Usage(prompt, completion, prompt + completion, estimated=True)
