"""``/memories``: what each memory stands for, its class and the training images retrieved to it
(the bundle's ``hopgate.exemplars``, made by ``hopgate-export exemplars``).

  GET /memories                           every memory's class (and how many exemplars it has)
  GET /memories/{index}                   one memory: class, label, exemplar image URLs
  GET /memories/{index}/exemplars/{k}.png one exemplar thumbnail (PNG)

A bundle without exemplars still answers with each memory's class where its banks say it
(per-class banks) and no images. An index or exemplar that does not exist is 404 ``not_found``
in the one error body.
"""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from hopgate.bundle import BundleMeta

from ..errors import ClientError
from ..lifecycle import require_ready, scorer_of

router = APIRouter(tags=["memories"])
_MISSING: dict[int | str, dict[str, Any]] = {404: {"description": "no such memory or exemplar"}}


class MemoryInfo(BaseModel):
    index: int = Field(description="Global memory index (class x M + memory), as in results")
    class_index: int | None = Field(description="The class this memory stands for (null: "
                                    "a shared bank's memory without exemplars)")
    label: str | None = Field(description="That class's name")
    exemplars: list[str] = Field(description="URLs of its exemplar thumbnails (PNG): the "
                                 "training images retrieved to it with the highest weight")


class MemoryList(BaseModel):
    memories: list[MemoryInfo] = Field(description="Every memory, by index")
    source: str | None = Field(description="What the exemplars were drawn from (null: the "
                               "bundle has none)")


def _meta(request: Request) -> BundleMeta:
    require_ready(request)
    return scorer_of(request).meta


def _info(meta: BundleMeta, index: int) -> MemoryInfo:
    if not 0 <= index < meta.memory_count:
        raise ClientError(404, f"no memory {index}: the bundle has memories 0 to "
                          f"{meta.memory_count - 1}", "not_found")
    c = meta.memory_class(index)
    known = c is not None and 0 <= c < len(meta.class_names)
    n = len(meta.exemplars.images[index]) if meta.exemplars else 0
    return MemoryInfo(index=index, class_index=c if known else None,
                      label=meta.class_names[c] if known and c is not None else None,
                      exemplars=[f"/memories/{index}/exemplars/{k}.png" for k in range(n)])


@router.get("/memories", response_model=MemoryList, summary="Every memory's class")
async def memories(request: Request) -> MemoryList:
    meta = _meta(request)
    return MemoryList(memories=[_info(meta, i) for i in range(meta.memory_count)],
                      source=meta.exemplars.source if meta.exemplars else None)


@router.get("/memories/{index}", response_model=MemoryInfo, responses=_MISSING,
            summary="One memory: its class and its exemplars (training images)")
async def memory(request: Request, index: int) -> MemoryInfo:
    return _info(_meta(request), index)


@router.get("/memories/{index}/exemplars/{k}.png", responses={
    **_MISSING, 200: {"content": {"image/png": {}}, "description": "PNG thumbnail"}},
    response_class=Response, summary="One exemplar thumbnail of a memory (PNG)")
async def exemplar(request: Request, index: int, k: int) -> Response:
    meta = _meta(request)
    info = _info(meta, index)
    if not 0 <= k < len(info.exemplars) or meta.exemplars is None:
        raise ClientError(404, f"memory {index} has {len(info.exemplars)} exemplars, "
                          f"no exemplar {k}", "not_found")
    png = base64.b64decode(meta.exemplars.images[index][k])
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})
