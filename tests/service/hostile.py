"""Hostile inputs of issue 14 shared by the in-process and the live-server tests (no torch)."""

from __future__ import annotations

import base64
import io
import struct

import numpy as np
from PIL import Image

V2 = "/v2/models/default/infer"


def rational_strip_offsets_tiff() -> bytes:
    """A small TIFF whose StripOffsets tag (273) is typed RATIONAL: Pillow raises TypeError."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack_from("<H", data, entry)[0] == 273:
            struct.pack_into("<H", data, entry + 2, 5)  # type 5: RATIONAL
            return bytes(data)
    raise AssertionError("no StripOffsets tag")


def deep_json(depth: int = 1000, key: str = "images") -> bytes:
    return (f'{{"{key}": ' + "[" * depth + "]" * depth + "}").encode()


def uint8_input(value: int, n: int = 1) -> dict:
    return {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [n, 28, 28, 1],
                        "data": [value] * (n * 784)}]}


def bytes_input(data: list, shape: list[int], b64: bool = False) -> dict:
    inp: dict = {"name": "image_bytes", "datatype": "BYTES", "shape": shape, "data": data}
    if b64:
        inp["parameters"] = {"base64": True}
    return {"inputs": [inp]}


def binary(header: bytes, tail: bytes) -> dict:
    """Client kwargs for the binary tensor extension: JSON header, then raw bytes."""
    return {"content": header + tail,
            "headers": {"inference-header-content-length": str(len(header))}}


def v2_cases(png: bytes) -> list[tuple[str, dict, int, str]]:
    """(name, request kwargs for the client, status, a word the message must contain)."""
    b64 = base64.b64encode(png).decode()
    js = {"content-type": "application/json"}
    return [
        ("nested 1,000 deep", {"content": deep_json(key="inputs"), "headers": js}, 400,
         "recursion"),
        ("inputs a string", {"json": {"inputs": "a"}}, 400, "inputs"),
        ("parameters not an object", {"json": {**bytes_input([b64], [1], True),
                                               "parameters": 3}}, 400, "parameters"),
        ("input parameters not an object", {"json": {"inputs": [{
            "name": "x", "datatype": "BYTES", "shape": [1], "data": [b64],
            "parameters": "base64"}]}}, 400, "parameters"),
        ("outputs not objects", {"json": {**uint8_input(0), "outputs": [3]}}, 400, "outputs"),
        ("outputs not a list", {"json": {**uint8_input(0), "outputs": {"name": "score"}}}, 400,
         "outputs"),
        ("unknown output", {"json": {**uint8_input(0), "outputs": [{"name": "nope"}]}}, 400,
         "unknown output"),
        ("UINT8 300", {"json": uint8_input(300)}, 400, "0..255"),
        ("UINT8 -1", {"json": uint8_input(-1)}, 400, "0..255"),
        ("UINT8 a float", {"json": uint8_input(1.5)}, 400, "0..255"),  # type: ignore[arg-type]
        ("UINT8 too few elements", {"json": {"inputs": [{
            "name": "images", "datatype": "UINT8", "shape": [1, 28, 28, 1], "data": [0]}]}},
         400, "needs 784"),
        ("UINT8 wrong image size", {"json": {"inputs": [{
            "name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 1],
            "data": [0] * 1024}]}}, 400, "[N, 28, 28, 1]"),
        ("shape with N = 0", {"json": {"inputs": [{
            "name": "images", "datatype": "UINT8", "shape": [0, 28, 28, 1], "data": []}]}},
         400, "N = 0"),
        ("empty BYTES list", {"json": bytes_input([], [0])}, 400, "N = 0"),
        ("empty BYTES list, shape [1]", {"json": bytes_input([], [1])}, 400, "got 0"),
        ("BYTES element 2**62", {"json": bytes_input([2**62], [1])}, 400, "must be a string"),
        ("BYTES element a huge int", {"json": bytes_input([10**30], [1])}, 400, "string"),
        ("BYTES shape [1], 3 elements", {"json": bytes_input([b64] * 3, [1], True)}, 400,
         "got more"),
        ("BYTES shape [3], 1 element", {"json": bytes_input([b64], [3], True)}, 400, "got 1"),
        ("BYTES bad base64", {"json": bytes_input(["@@@"], [1], True)}, 400, "base64"),
        ("BYTES too many images", {"json": bytes_input([b64] * 40, [40], True)}, 413, "limit"),
        ("datatype FP32", {"json": {"inputs": [{
            "name": "images", "datatype": "FP32", "shape": [1], "data": [0.5]}]}}, 400,
         "datatype"),
        ("shape a string", {"json": {"inputs": [{
            "name": "images", "datatype": "UINT8", "shape": "1,28,28,1", "data": [0]}]}}, 400,
         "shape"),
        ("two inputs", {"json": {"inputs": [bytes_input([b64], [1], True)["inputs"][0]] * 2}},
         400, "inputs"),
        ("binary size over the body", binary(b'{"inputs":[{"name":"x","datatype":"BYTES",'
                                             b'"shape":[1],"parameters":{"binary_data_size":'
                                             b'1000000}}]}', b""), 400, "binary_data_size"),
        ("binary BYTES length over the body", binary(
            b'{"inputs":[{"name":"x","datatype":"BYTES","shape":[1],'
            b'"parameters":{"binary_data_size":8}}]}', struct.pack("<I", 2**31) + b"abcd"),
         400, "exceeds"),
        ("header length not a number", {"content": b"{}", "headers": {
            "inference-header-content-length": "-5"}}, 400, "Inference-Header"),
        ("image that is not an image", {"json": bytes_input(
            [base64.b64encode(b"hello").decode()], [1], True)}, 415, "image 0"),
    ]
