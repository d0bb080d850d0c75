"""Issue 14: schemathesis against the live OpenAPI document of a real hopgate-serve on
loopback (integration tier), every operation, V2 infer included (its request body is the
pydantic model of service/v2/request.py). Bounded: a few dozen examples per operation,
positive and negative, so the whole run takes well under a minute.

What must hold on every response: no server error, a status the operation documents, the
documented content type, a body that validates against the documented schema, and schema-
invalid requests refused with a 4xx."""

from __future__ import annotations

import copy

import httpx
import pytest
import schemathesis
from conftest import FAST_SETTINGS, serve
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from hopgate.service.app import create_app
from hopgate.service.config import Settings

pytestmark = pytest.mark.integration
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with serve(tmp_path_factory.mktemp("st"), max_body_bytes=2_000_000, max_images=32) as s:
        yield s


# The document is built from the app's routes (no bundle needed); the first test checks that
# the live server serves exactly this document.
DOCUMENT = create_app(Settings(**FAST_SETTINGS)).openapi()


def _one_model(document: dict) -> dict:
    """The document with the V2 ``{name}`` pinned to the one model served ("default"), so the
    fuzzer gets past the 404 of a random name into the request bodies."""
    doc = copy.deepcopy(document)
    for path, item in doc["paths"].items():
        for op in item.values():
            for p in op.get("parameters", []):
                if path.startswith("/v2/models/") and p["name"] == "name":
                    p["schema"] = {"type": "string", "enum": ["default"]}
    return doc


schema = schemathesis.openapi.from_dict(_one_model(DOCUMENT))


def test_the_live_server_serves_this_document(live):
    assert httpx.get(live.url + "/openapi.json").json() == DOCUMENT


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_every_operation(case, live):
    case.call_and_validate(base_url=live.url, checks=CHECKS, timeout=30)
