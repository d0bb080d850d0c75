"""The web page at ``/`` and the offline ``/docs``: everything served from the package, no CDN.

  GET /            the page (static/index.html + page.js + page.css): drop or pick images,
                   see each verdict, the score on the ID score distribution with the threshold,
                   the p-value, the retrieved memories with their exemplars, a live panel
  GET /page/model  what the page draws: threshold, the ID calibration quantiles, classes
  GET /docs        Swagger UI on its own assets (the ``fastapi-offline`` package ships them)
  /static/...      the page's files; /static/swagger/... Swagger UI's

The page and its files (Swagger UI's too) need no API key: they hold no data. Everything the
page fetches (``/page/model``, ``/score``, ``/memories``) does, so it asks for the key when
the server answers 401; ``/docs`` and ``/openapi.json`` stay behind the key as before. The
live panel reads ``/metrics`` (exempt as ever).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import Field

from ..lifecycle import require_ready, scorer_of
from ..schema import ModelInfo

STATIC = Path(__file__).resolve().parent / "static"
PUBLIC_PATHS = frozenset({"/", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)

router = APIRouter()


def public(path: str) -> bool:
    """Paths served without the API key: the page and its files."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def swagger_assets() -> Path:
    return Path(str(files("fastapi_offline") / "static"))


class PageModel(ModelInfo):
    """What /score's ``model`` says, plus what the page draws."""

    score_quantiles: list[float] = Field(description="Evenly spaced quantiles of the ID "
                                         "calibration scores (the ID score distribution)")
    calibration_size: int = Field(description="ID images the quantiles were taken from")
    memories: int = Field(description="Memories in the bundle (GET /memories/{index})")
    exemplars: bool = Field(description="Whether the bundle carries memory exemplars")


@router.get("/", include_in_schema=False)
async def page() -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> Response:
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")


@router.get("/page/model", response_model=PageModel, tags=["page"],
            summary="What the web page draws: the ID score distribution and the threshold")
async def page_model(request: Request) -> PageModel:
    require_ready(request)
    scorer = scorer_of(request)
    m = scorer.meta
    return PageModel(**scorer.model_info().model_dump(), score_quantiles=m.score_quantiles,
                     calibration_size=m.calibration_size, memories=m.memory_count,
                     exemplars=m.exemplars is not None)


@router.get("/docs", include_in_schema=False)
async def docs() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json", title="hopgate API",
        swagger_js_url="/static/swagger/swagger-ui-bundle.js",
        swagger_css_url="/static/swagger/swagger-ui.css",
        swagger_favicon_url="/static/swagger/favicon.png",
        swagger_ui_parameters={"validatorUrl": None})  # no call to the public validator


def install(app: FastAPI) -> None:
    """The page's routes and files (create_app makes the app with ``docs_url=None``)."""
    app.include_router(router)
    app.mount("/static/swagger", StaticFiles(directory=swagger_assets()), name="swagger")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
