"""Schemathesis against the OpenAPI document of a real uvicorn process: generated requests,
valid and invalid, never get a 5xx, and every answer matches the documented schema."""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, cast

import httpx
import pytest

# schemathesis 4 needs Python >= 3.9 ([dev] installs it there); older interpreters skip, visibly.
schemathesis = pytest.importorskip("schemathesis", minversion="4.0", reason="schemathesis 4 is not installed")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.reliability.corpus import photo_jpeg, valid_png
from tests.reliability.server import ServerProcess

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES_PER_OPERATION_AND_MODE = 40


@pytest.mark.slow
def test_generated_requests_never_get_a_5xx_and_match_the_schema(server: ServerProcess) -> None:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [cast(Any, result).ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/predict", "GET /v1/model", "GET /healthz", "GET /readyz"}
    statuses: Counter = Counter()
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES_PER_OPERATION_AND_MODE,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def run(case: Any) -> None:
                response = case.call(base_url=server.url, timeout=30)
                case.validate_response(response, checks=CHECKS)
                assert response.headers.get("x-request-id")
                statuses[(operation.label, response.status_code)] += 1

            try:
                run()
            except Unsatisfiable:
                # A GET without parameters has no invalid form; the positive run covered it.
                assert mode is GenerationMode.NEGATIVE and operation.method == "get", operation.label
    # A real picture too, so the 200 body is checked against its schema as well.
    predict = schema["/v1/predict"]["POST"]
    for picture in (valid_png(), photo_jpeg()):
        body: Dict[str, Any] = {"image": picture, "roi": '{"bbox": [0, 0, 60, 40]}'}
        case = predict.Case(body=body, media_type="multipart/form-data")
        response = case.call(base_url=server.url, timeout=30)
        case.validate_response(response, checks=CHECKS)
        statuses[("POST /v1/predict", response.status_code)] += 1
    assert statuses[("POST /v1/predict", 200)] == 2, statuses
    # The generator did reach the model, and the validation paths.
    assert statuses[("POST /v1/predict", 422)] + statuses[("POST /v1/predict", 415)] > 0, statuses
    assert httpx.get(server.url + "/readyz", timeout=5.0).status_code == 200
    assert not [r for r in server.log_records() if r["level"] in ("error", "critical") or "exception" in r]
    print(dict(statuses))
