"""The ASGI wrapper on webui's txt2img/img2img routes: OneDiff's request forms rewritten, other bodies untouched."""
import asyncio
import json

from sd_webui_onediff.api_requests import accept_onediff_requests


def post(body: bytes, chunk: int = 5):
    """(body the route received, responses the wrapper sent itself) for ``body`` sent in chunks."""
    received, sent = [], []
    chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = iter([{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)])

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    async def route(scope, receive, send):
        received.append((await receive())["body"])

    asyncio.run(accept_onediff_requests(route)({"type": "http"}, receive, send))
    return received, sent


def test_bodies_that_do_not_name_the_script_pass_unparsed():
    """Bytes re-serialized by ``json`` would lose this spacing; an img2img body's base64 stays as sent."""
    body = b'{"prompt":  "a cat",\n "init_images": ["iVBORw0KGgo' + b"A" * 10_000 + b'"], "script_name": "other"}'
    assert post(body) == ([body], [])
    assert post(b"not json at all") == ([b"not json at all"], [])


def test_onediff_forms_are_rewritten_into_webuis():
    received, _ = post(json.dumps({"prompt": "a cat", "script": "OneDiff_Diffusion_Model", "script_args": [True]}).encode())
    request = json.loads(received[0])
    assert request["script_name"] == "onediff_diffusion_model"
    assert request["script_args"] == [True, "None", "", False]


def test_wrong_script_args_answer_422_naming_the_argument():
    received, sent = post(json.dumps({"script_name": "onediff_diffusion_model", "script_args": [False, 5]}).encode())
    assert received == [] and sent[0]["status"] == 422
    assert "script_args[1] (compiler_cache) must be a string" in json.loads(sent[1]["body"])["detail"][0]["msg"]
