"""Issue 14: hypothesis-driven fuzzing of the image decoder and of the V2 parser (fast tier,
no server; each test is bounded by max_examples and a deadline and runs in seconds).

The property is the same for both: whatever the bytes, the answer is a result or a
``ClientError``/``ImageError`` (a 4xx naming the problem, no object reprs) -- never another
exception, and never an allocation sized by the request rather than by its body."""

from __future__ import annotations

import io
import json
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inputs import encode, synthetic
from PIL import Image

from hopgate.service.errors import ClientError, ImageError
from hopgate.service.imaging import decode
from hopgate.service.v2.request import parse_infer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow on corrupt tags
FUZZ = settings(max_examples=300, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
IMAGE = (28, 28, 1)


def _seeds() -> list[bytes]:
    arr = synthetic(1, seed=2)[0]
    out = [encode(arr, f) for f in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")]
    buf = io.BytesIO()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(buf, "PNG")
    return [*out, buf.getvalue(), out[4], out[4]]  # TIFF thrice: its IFD is mutated too


SEEDS = _seeds()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid image of some format with bytes flipped, cut, or spliced in."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "int", "tiff_tag"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "tiff_tag" and data[:4] == b"II*\x00":  # retype / recount one IFD entry
            ifd = struct.unpack_from("<I", data, 4)[0]
            if ifd + 2 <= len(data):
                k = draw(st.integers(0, max(struct.unpack_from("<H", data, ifd)[0] - 1, 0)))
                entry = ifd + 2 + 12 * k
                if entry + 8 <= len(data):
                    struct.pack_into("<HI", data, entry + 2, draw(st.integers(1, 13)),
                                     draw(st.sampled_from([0, 1, 2, 3, 2**31])))
        elif op == "flip" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[i:i + draw(st.integers(1, 64))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif i + 4 <= len(data):  # a header field set to an extreme value
            struct.pack_into("<I", data, i, draw(st.sampled_from([0, 1, 2**16, 2**31, 2**32 - 1])))
    return bytes(data)


def _decodes_or_fails_cleanly(data: bytes) -> None:
    try:
        out = decode(data, *IMAGE, max_pixels=4_000_000)
    except ImageError as e:
        assert 400 <= e.status < 500 and e.message and " at 0x" not in e.message
        return
    assert out.shape == IMAGE and out.dtype == np.uint8


@FUZZ
@given(mutated())
def test_decoder_on_mutated_images(data: bytes) -> None:
    _decodes_or_fails_cleanly(data)


@FUZZ
@given(st.integers(0, 15), st.integers(1, 13), st.sampled_from([None, 0, 2, 2**31]))
def test_decoder_on_retyped_tiff_tags(k: int, typ: int, count: int | None) -> None:
    """One IFD entry of a valid TIFF given another field type (and count): the 906-byte
    TIFF of issue 14 had its StripOffsets typed RATIONAL, and Pillow raised TypeError."""
    data = bytearray(SEEDS[4])
    ifd = struct.unpack_from("<I", data, 4)[0]
    entry = ifd + 2 + 12 * (k % struct.unpack_from("<H", data, ifd)[0])
    struct.pack_into("<H", data, entry + 2, typ)
    if count is not None:
        struct.pack_into("<I", data, entry + 4, count)
    _decodes_or_fails_cleanly(bytes(data))


@FUZZ
@given(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\x00",
                        b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBP"]), st.binary(max_size=300))
def test_decoder_on_magic_then_noise(magic: bytes, tail: bytes) -> None:
    _decodes_or_fails_cleanly(magic + tail)


# --- the V2 parser -------------------------------------------------------------------------

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                      st.floats(allow_nan=False), st.text(max_size=8))
JSON_ANY = st.recursive(JSON_LEAF, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=6), kids, max_size=4)),
    max_leaves=20)


@st.composite
def infer_docs(draw: st.DrawFn) -> dict:
    """Near-valid V2 requests: every field may be of the wrong type or out of range."""
    dtype = draw(st.sampled_from(["UINT8", "BYTES", "BYTES", "FP32", 3]))
    n = draw(st.sampled_from([1, 2, 1, 0, 33, 2**62, -1]))
    match = [n, 28, 28, 1] if dtype == "UINT8" else [n]
    shape = draw(st.sampled_from([match, match, match, [n, 28, 28, 1], [n], [n, 1], [], "x"]))
    exact = (n * 784 if dtype == "UINT8" else n) if 0 <= n <= 2 else 1
    count = draw(st.sampled_from([exact, exact, exact, 0, 1, exact + 1]))
    item = draw(st.one_of(st.integers(-300, 300), st.sampled_from([2**62, 10**30, 1.5, True]),
                          st.sampled_from(["", "abc", "\u20ac"]), JSON_ANY))
    data = draw(st.one_of(st.just([item] * count), st.just([[item] * count]), JSON_ANY))
    inp: dict = {"name": "x", "datatype": dtype, "shape": shape, "data": data}
    if draw(st.booleans()):
        inp["parameters"] = draw(st.one_of(st.just({"base64": True}), JSON_ANY))
    doc: dict = {"inputs": draw(st.sampled_from([[inp], [inp], [inp], [inp, inp], inp, "a", []]))}
    if draw(st.booleans()):
        doc["outputs"] = draw(st.one_of(st.just([{"name": "score"}]), JSON_ANY))
    if draw(st.booleans()):
        doc["parameters"] = draw(JSON_ANY)
    return doc


def _parses_or_refuses(body: bytes, header_length: str | None = None) -> None:
    """A tensor or a 400/413, allocating no more than a small multiple of the body."""
    tracemalloc.start()
    try:
        req, tensors = parse_infer(body, header_length, IMAGE, max_images=32)
    except ClientError as e:
        assert e.status in (400, 413) and e.message.startswith("bad V2 request")
        assert len(e.message) < 600
        return
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 200_000 + 50 * len(body), f"{peak} bytes for a {len(body)}-byte body"
    assert len(tensors) == len(req.inputs)  # one or two inputs, in order
    assert sum(inp.shape[0] for inp in req.inputs) <= 32
    for inp, tensor in zip(req.inputs, tensors):
        n = inp.shape[0]
        assert n >= 1
        if isinstance(tensor, np.ndarray):
            assert tensor.shape == (n, *IMAGE) and tensor.dtype == np.uint8
        else:
            assert len(tensor) == n and all(isinstance(b, bytes) for b in tensor)


@FUZZ
@given(infer_docs())
def test_v2_parser_on_wrong_json(doc: dict) -> None:
    _parses_or_refuses(json.dumps(doc).encode())


ITEM = st.one_of(st.integers(-300, 300), st.integers(-(2**64), 2**64), st.booleans(),
                st.floats(allow_nan=False), st.text(max_size=6),
                st.lists(st.integers(), max_size=2))


@FUZZ
@given(st.sampled_from(["UINT8", "BYTES"]), st.integers(1, 2), ITEM, st.booleans(),
       st.booleans())
def test_v2_parser_on_well_shaped_requests(dtype: str, n: int, item: object, b64: bool,
                                           nested: bool) -> None:
    """Right datatype, shape and element count; only the elements' values are fuzzed."""
    count = n * 784 if dtype == "UINT8" else n
    data: list = [item] * count
    if nested:
        data = [data[i:i + count // n] for i in range(0, count, count // n)]
    inp: dict = {"name": "x", "datatype": dtype, "shape": [n, 28, 28, 1] if dtype == "UINT8"
                 else [n], "data": data}
    if b64:
        inp["parameters"] = {"base64": True}
    _parses_or_refuses(json.dumps({"inputs": [inp]}).encode())


@FUZZ
@given(st.integers(0, 3), st.lists(st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=8)),
                                   max_size=4), st.integers(0, 2**40), st.booleans())
def test_v2_parser_on_binary_bytes(n: int, items: list, size: int, honest: bool) -> None:
    raw = b"".join(struct.pack("<I", length) + blob for length, blob in items)
    header = json.dumps({"inputs": [{"name": "b", "datatype": "BYTES", "shape": [n],
                                     "parameters": {"binary_data_size":
                                                    len(raw) if honest else size}}]}).encode()
    _parses_or_refuses(header + raw, str(len(header)))


@pytest.mark.parametrize("depth", [10, 150, 1000, 100_000])
def test_v2_parser_on_deep_nesting(depth: int) -> None:
    data = "[" * depth + "0" + "]" * depth
    body = ('{"inputs":[{"name":"x","datatype":"UINT8","shape":[1,28,28,1],"data":'
            + data + "}]}").encode()
    _parses_or_refuses(body)
