"""The SGLang client over real HTTP: against `taqrir model serve`, and against failing servers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from inference.backend import make_backend
from inference.config import InferenceSettings
from inference.drafting import draft_report
from inference.errors import BackendUnavailable, OutputRejected
from inference.scripts import arabic_letter_ratio, script_pattern
from inference.sections import sections_schema
from inference.sglang import SGLangBackend, request_body
from inference.types import GenerationRequest, Message, SamplingParams, StudyContext
from tests.conftest import free_port

from .conftest import png_bytes

CONTEXT = StudyContext(modality="CR", body_part="CHEST", patient_age="030Y", patient_sex="F")
Reply = Callable[[dict[str, Any]], tuple[int, dict[str, Any]]]


def completion(text: str) -> dict[str, Any]:
    return {"model": "fake", "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 600, "completion_tokens": 20}}


@pytest.fixture
def fake_server() -> Iterator[Callable[[Reply, float], str]]:
    """Start small real HTTP servers whose completions come from a function (failure injection)."""
    servers: list[ThreadingHTTPServer] = []

    def start(reply: Reply, delay: float = 0.0) -> str:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._send(200, {"status": "ok"} if self.path == "/health" else {"data": [{"id": "fake"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(delay)
                self._send(*reply(body))

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def settings_for(url: str, **kw: Any) -> InferenceSettings:
    return InferenceSettings(backend="sglang", server_url=url, model_name="fake", retry_backoff=0.01,
                             retry_backoff_max=0.05, **kw)


def test_request_body_image_first_system_explicit_schema() -> None:
    request = GenerationRequest([png_bytes(8, 8)], [Message("system", "SYS"), Message("user", "Q", 1)],
                                SamplingParams(), json_schema=sections_schema(), allowed_script="arabic")
    body = request_body(request, "m")
    assert body["messages"][0] == {"role": "system", "content": "SYS"}
    parts = body["messages"][1]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[1] == {"type": "text", "text": "Q"}
    assert body["temperature"] == 0.1 and body["top_p"] == 1.0 and body["max_tokens"] == 1024
    assert body["stop"] == ["<|eot_id|>"]
    schema = body["response_format"]["json_schema"]["schema"]
    assert body["response_format"]["type"] == "json_schema"
    assert schema["properties"]["findings"]["pattern"] == script_pattern("arabic")
    assert "minLength" not in schema["properties"]["findings"]  # xgrammar ignores it beside a pattern


def test_generate_and_draft_against_taqrir_model_serve(served_tiny: str) -> None:
    settings = InferenceSettings(backend="sglang", server_url=served_tiny, model_name="tiny-bimedix2", seed=4)
    backend = make_backend(settings, data_dir=settings_dir())
    try:
        backend.ready()
        assert backend.describe()["tiny"] is True
        requests = [GenerationRequest([png_bytes(40 + i, 30)], [Message("user", "Describe.", 1)],
                                      SamplingParams(max_new_tokens=8, seed=i), json_schema=sections_schema())
                    for i in range(3)]
        results = backend.generate(requests)
        assert [set(json.loads(r.text)) for r in results] == [{"findings", "impression"}] * 3
        assert all(r.prompt_tokens > 576 and r.completion_tokens > 0 for r in results)
        report = draft_report(backend, [png_bytes(64, 48)], CONTEXT, settings)
    finally:
        backend.close()
    assert report.provenance.backend == "sglang" and report.provenance.model_revision.startswith("tiny:sha256:")
    assert arabic_letter_ratio(report.arabic.impression) >= 0.9


def settings_dir() -> Path:
    """data_dir for make_backend (unused by the sglang backend)."""
    return Path(".")


def test_server_down_retries_then_unavailable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    backend = make_backend(settings_for(url, max_retries=2), data_dir=settings_dir())
    try:
        with pytest.raises(BackendUnavailable, match="after 3 attempts"):
            backend.generate([GenerationRequest([], [Message("user", "hi")])])
        with pytest.raises(BackendUnavailable):
            backend.ready()
    finally:
        backend.close()


def test_slow_server_times_out(fake_server: Callable[[Reply, float], str]) -> None:
    url = fake_server(lambda body: (200, completion("late")), 2.0)
    backend = make_backend(settings_for(url, request_timeout=0.3, max_retries=1), data_dir=settings_dir())
    started = time.perf_counter()
    try:
        with pytest.raises(BackendUnavailable, match="ReadTimeout"):
            backend.generate([GenerationRequest([], [Message("user", "hi")])])
    finally:
        backend.close()
    assert time.perf_counter() - started < 2.5


def test_transient_5xx_and_429_are_retried(fake_server: Callable[[Reply, float], str]) -> None:
    calls: list[int] = []
    good = {"findings": "The lungs are clear.", "impression": "Normal."}

    def reply(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        calls.append(1)
        if len(calls) == 1:
            return 503, {"error": "loading"}
        if len(calls) == 2:
            return 429, {"error": "busy"}
        return 200, completion(json.dumps(good))

    backend = SGLangBackend(fake_server(reply, 0.0), model_name="fake", retry_backoff=0.01, max_retries=3)
    try:
        (result,) = backend.generate([GenerationRequest([], [Message("user", "hi")])])
    finally:
        backend.close()
    assert json.loads(result.text) == good and len(calls) == 3 and result.prompt_tokens == 600


def test_malformed_output_is_rejected_after_one_retry(fake_server: Callable[[Reply, float], str]) -> None:
    url = fake_server(lambda body: (200, completion("I am not able to read this image")), 0.0)
    backend = make_backend(settings_for(url), data_dir=settings_dir())
    try:
        with pytest.raises(OutputRejected) as info:
            draft_report(backend, [png_bytes(20, 20)], CONTEXT, settings_for(url))
    finally:
        backend.close()
    assert info.value.raw_outputs == ["I am not able to read this image"] * 2
    assert "english" in info.value.reason


def test_non_arabic_arabic_is_rejected(fake_server: Callable[[Reply, float], str]) -> None:
    english = {"findings": "The lungs are clear.", "impression": "Normal chest."}
    arabic = {"findings": "الرئتان صافيتان.", "impression": "صدر طبيعي."}
    requests: list[dict[str, Any]] = []

    def reply(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        requests.append(body)
        # English answers every turn, including the translation turn: the "Arabic" is English.
        return 200, completion(json.dumps(english))

    url = fake_server(reply, 0.0)
    backend = make_backend(settings_for(url), data_dir=settings_dir())
    try:
        with pytest.raises(OutputRejected, match="Arabic-script"):
            draft_report(backend, [png_bytes(20, 20)], CONTEXT, settings_for(url))
    finally:
        backend.close()
    # The translation request repeats the English request first (prefix-cache friendly).
    en_body, ar_body = requests[0], requests[1]
    assert ar_body["messages"][:2] == en_body["messages"]
    assert ar_body["messages"][2]["role"] == "assistant"

    ok = fake_server(lambda body: (200, completion(json.dumps(arabic if len(body["messages"]) > 2 else english))), 0.0)
    backend = make_backend(settings_for(ok), data_dir=settings_dir())
    try:
        report = draft_report(backend, [png_bytes(20, 20)], CONTEXT, settings_for(ok))
    finally:
        backend.close()
    assert report.arabic.findings == arabic["findings"] and report.english.findings == english["findings"]


def test_serve_rejects_bad_requests_in_openai_shape(served_tiny: str) -> None:
    import httpx

    bad_image = {"model": "tiny-bimedix2", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.org/x.png"}}, {"type": "text", "text": "hi"}]}]}
    response = httpx.post(f"{served_tiny}/v1/chat/completions", json=bad_image, timeout=30)
    assert response.status_code == 400 and "data URLs" in response.json()["error"]["message"]
    bad_schema = {"model": "tiny-bimedix2", "messages": [{"role": "user", "content": "hi"}],
                  "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "array"}}}}
    response = httpx.post(f"{served_tiny}/v1/chat/completions", json=bad_schema, timeout=30)
    assert response.status_code == 400 and "object" in response.json()["error"]["message"]


def test_concurrent_clients_are_batched(served_tiny: str) -> None:
    backend = SGLangBackend(served_tiny, model_name="tiny-bimedix2", max_concurrency=4)
    requests = [GenerationRequest([png_bytes(30 + i, 30)], [Message("user", "Describe.", 1)],
                                  SamplingParams(max_new_tokens=6, seed=1), json_schema=sections_schema("latin"))
                for i in range(8)]
    try:
        results = backend.generate(requests)
    finally:
        backend.close()
    assert len(results) == 8 and all(json.loads(r.text)["findings"] for r in results)


def test_concurrency_limit_holds(fake_server: Callable[[Reply, float], str]) -> None:
    lock = threading.Lock()
    in_flight = [0]
    peak = [0]
    good = json.dumps({"findings": "Clear.", "impression": "Normal."})

    def reply(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.1)
        with lock:
            in_flight[0] -= 1
        return 200, completion(good)

    backend = SGLangBackend(fake_server(reply, 0.0), model_name="fake", max_concurrency=2)
    try:
        results = backend.generate([GenerationRequest([], [Message("user", str(i))]) for i in range(6)])
    finally:
        backend.close()
    assert len(results) == 6 and peak[0] == 2
