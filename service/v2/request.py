"""The V2 inference request: a pydantic model (it is the request body in /openapi.json) and
the checks of shape x datatype x data that run before anything is allocated from it.

``parse_infer`` turns the raw body (JSON, or the JSON header plus binary tensors of the
``binary_data`` extension) into its one or two input tensors (scored in the order sent):
a list of encoded images (``BYTES``) or a uint8 ``[N, H, W, C]`` array (``UINT8``). Every
client mistake is a ``ClientError`` (400, or 413 for more than ``max_images`` images in all).

BYTES in JSON are strings, which cannot hold raw bytes: an element is a base64-encoded image
(what tritonclient and KServe clients send with ``binary_data=False``). Without
``parameters.base64`` it is read as base64 when that gives an image, else as raw latin-1
bytes when those are one, else a 400 naming ``parameters.base64`` (true / false: explicit).

Order of the checks: the header (``Inference-Header-Content-Length`` within the body) ->
the JSON through the model (strict types, at most 200 levels deep: jiter's limit) -> one or
two inputs with distinct names -> each shape against the datatype, the bundle's size and
``max_images`` (1 <= N) -> the data's element count (JSON: counted without building
anything; binary: bytes counted against ``binary_data_size``) -> only then the arrays or the
lists of blobs are built. No size in the request is ever used to allocate before it has
been checked against the body.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ClientError, ImageError
from ..imaging import sniff

Dim = Annotated[int, Field(ge=0, le=2**40)]
MAX_DEPTH = 8  # nesting of JSON ``data`` (row-major nested lists): deeper is refused


class _Params(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class InputParameters(_Params):
    binary_data_size: int | None = Field(None, ge=0)  # bytes of this tensor after the header
    base64: bool | None = None  # BYTES JSON data: base64 or latin-1 (unset: the one an image)


class OutputParameters(_Params):
    binary_data: bool | None = None


class RequestParameters(_Params):
    binary_data_output: bool | None = None
    target_tpr: float | None = None  # this request's threshold (threshold.py), one of two
    log_lambda: float | None = None


class InferInput(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    name: str = Field(max_length=256)
    datatype: Literal["BYTES", "UINT8"]
    shape: list[Dim] = Field(min_length=1, max_length=4)
    data: list[Any] | None = None  # flat or nested row-major; absent with binary_data_size
    parameters: InputParameters | None = None


class InferOutput(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    name: str = Field(max_length=256)
    parameters: OutputParameters | None = None


class InferRequest(BaseModel):
    """``POST /v2/models/{name}/infer``: one or two input tensors, ``BYTES [N]`` of encoded
    images (base64 in JSON) and/or ``UINT8 [N, H, W, C]`` at the bundle's size."""

    model_config = ConfigDict(extra="allow", strict=True)

    id: str | None = Field(None, max_length=256)
    inputs: list[InferInput] = Field(min_length=1, max_length=2)
    outputs: list[InferOutput] | None = Field(None, max_length=64)
    parameters: RequestParameters | None = None


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """The model's JSON schema with its ``$defs`` inlined (it goes into openapi_extra)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(dict(defs[ref.removeprefix("#/$defs/")]))
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    out: dict[str, Any] = walk(schema)
    return out


INFER_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _inline(InferRequest.model_json_schema())},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
}}}


def _bad(message: str, status: int = 400) -> ClientError:
    return ClientError(status, f"bad V2 request: {message}")


def _validation_message(e: ValidationError) -> str:
    errs = e.errors(include_url=False, include_input=False)
    parts = [f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
             for err in errs[:3]]
    more = f" (and {len(errs) - 3} more)" if len(errs) > 3 else ""
    return "; ".join(parts) + more


def _count(data: list[Any], limit: int) -> int:
    """Leaves of a (nested) data list, without building anything; stops past ``limit``."""
    n, stack = 0, [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _bad(f"data nested deeper than {MAX_DEPTH} levels")
        for x in node:
            if isinstance(x, list):
                stack.append((x, depth + 1))
            else:
                n += 1
            if n > limit:
                return n
    return n


def _flatten(data: list[Any]) -> list[Any]:
    """Row-major leaves (called only once ``_count`` has bounded them)."""
    out: list[Any] = []
    stack: list[Any] = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def parse_bytes(raw: bytes, n: int) -> list[bytes]:
    """Triton's BYTES serialisation (4-byte little-endian length, then the bytes), exactly
    ``n`` elements filling ``raw``; every length is checked against what is left."""
    out: list[bytes] = []
    i = 0
    while i < len(raw):
        if len(out) == n:
            raise _bad(f"binary BYTES data holds more than the shape's {n} elements")
        if i + 4 > len(raw):
            raise _bad(f"binary BYTES element {len(out)}: truncated length")
        (size,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + size > len(raw):
            raise _bad(f"binary BYTES element {len(out)}: length {size} exceeds the "
                       f"{len(raw) - i} bytes left")
        out.append(raw[i:i + size])
        i += size
    if len(out) != n:
        raise _bad(f"binary BYTES data holds {len(out)} elements; the shape says {n}")
    return out


def _check_shape(inp: InferInput, image: tuple[int, int, int], max_images: int,
                 before: int = 0) -> int:
    """N, once the shape fits the datatype, the bundle and the limit (with ``before`` images
    in the inputs before this one)."""
    shape = list(inp.shape)
    if inp.datatype == "BYTES":
        if len(shape) != 1:
            raise _bad(f"BYTES input must have shape [N], got {shape}")
    elif len(shape) != 4 or tuple(shape[1:]) != image:
        h, w, c = image
        raise _bad(f"UINT8 input must have shape [N, {h}, {w}, {c}], got {shape}")
    n = shape[0]
    if n == 0:
        raise _bad("shape has N = 0: send at least one image")
    if before + n > max_images:
        raise _bad(f"{before + n} images; the limit is {max_images}", 413)
    return n


def _json_data(inp: InferInput, n: int, image: tuple[int, int, int]) -> list[bytes] | np.ndarray:
    if inp.data is None:
        raise _bad(f"input {inp.name!r} has neither data nor parameters.binary_data_size")
    want = n if inp.datatype == "BYTES" else n * math.prod(image)
    got = _count(inp.data, want)
    if got != want:
        raise _bad(f"input {inp.name!r}: shape {list(inp.shape)} needs {want} data elements, "
                   f"got {'more' if got > want else got}")
    flat = _flatten(inp.data)
    if inp.datatype == "UINT8":
        for i, x in enumerate(flat):
            if type(x) is not int or not 0 <= x <= 255:
                what = "out of range" if type(x) is int else f"a {type(x).__name__}"
                raise _bad(f"UINT8 data[{i}] is {what}: must be an integer in 0..255")
        return np.asarray(flat, dtype=np.uint8).reshape(n, *image)
    b64 = inp.parameters.base64 if inp.parameters else None
    out: list[bytes] = []
    for i, s in enumerate(flat):
        if not isinstance(s, str):
            raise _bad(f"BYTES data[{i}] is {type(s).__name__}: must be a string"
                       + (" (base64)" if b64 is not False else ""))
        out.append(_element(i, s, b64))
    return out


def _is_image(blob: bytes) -> bool:
    try:
        return bool(sniff(blob))
    except ImageError:
        return False


def _element(i: int, s: str, b64: bool | None) -> bytes:
    """One JSON BYTES element: base64 or latin-1 as ``b64`` says, else whichever is an image."""
    if b64 is not False:
        try:
            decoded = base64.b64decode(s, validate=True)
            if b64 or _is_image(decoded):
                return decoded
        except (binascii.Error, ValueError):
            if b64:
                raise _bad(f"BYTES data[{i}] is not valid base64") from None
    neither = _bad(f"BYTES data[{i}] is no image, as base64 (standard alphabet, no line "
                   "breaks) nor as raw latin-1 bytes; set parameters.base64 to choose")
    try:
        raw = s.encode("latin-1")
    except UnicodeEncodeError:
        raise neither from None
    if b64 is False or _is_image(raw):
        return raw
    raise neither


def _binary_data(inp: InferInput, n: int, image: tuple[int, int, int], rest: bytes,
                 size: int) -> list[bytes] | np.ndarray:
    if size > len(rest):
        raise _bad(f"binary_data_size {size} exceeds the {len(rest)} bytes after the header")
    raw = rest[:size]
    if inp.datatype == "BYTES":
        return parse_bytes(raw, n)
    want = n * math.prod(image)
    if size != want:
        raise _bad(f"UINT8 shape {list(inp.shape)} needs {want} bytes, got {size}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(n, *image)


Tensor = list[bytes] | np.ndarray  # encoded images (BYTES) or uint8 [N, H, W, C] (UINT8)


def parse_infer(body: bytes, header_length: str | None, image: tuple[int, int, int],
                max_images: int) -> tuple[InferRequest, list[Tensor]]:
    """The request model and its input tensors in order, every size checked before use."""
    header, rest = body, b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise _bad(f"Inference-Header-Content-Length must be a byte count within the "
                       f"body's {len(body)} bytes")
        header, rest = body[:int(header_length)], body[int(header_length):]
    if not header:
        raise _bad("empty body: send a JSON inference request")
    try:
        req = InferRequest.model_validate_json(header)
    except ValidationError as e:
        raise _bad(_validation_message(e)) from None
    names = [inp.name for inp in req.inputs]
    if len(set(names)) < len(names):
        raise _bad(f"two inputs named {names[0]!r}: each input once")
    tensors: list[Tensor] = []
    total = 0
    for inp in req.inputs:  # sizes first, for all: nothing is built for a request too large
        total += _check_shape(inp, image, max_images, total)
    for inp in req.inputs:
        n = inp.shape[0]
        size = inp.parameters.binary_data_size if inp.parameters else None
        if size is not None:
            tensors.append(_binary_data(inp, n, image, rest, size))
            rest = rest[size:]
        else:
            tensors.append(_json_data(inp, n, image))
    if rest:
        raise _bad(f"{len(rest)} bytes after the inputs' binary data (binary_data_size)")
    return req, tensors
