"""OneDiff's request forms on webui's generation routes, as an ASGI wrapper: plain ASGI, no webui import.

OneDiff's clients send ``"script": "onediff_diffusion_model"`` and short ``script_args`` forms; ``normalize_request``
rewrites them into webui's before webui parses the body, and a ``script_args`` of the wrong type answers 422 naming the
argument. A body that does not name this script is handed on untouched, unparsed: img2img bodies carry megabytes of
base64 images.
"""
from __future__ import annotations

import json
import re

from .script_args import SCRIPT_TITLE, ScriptArgsError, normalize_request

GENERATION_ROUTES = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")
_NAMES_THIS_SCRIPT = re.compile(re.escape(SCRIPT_TITLE.encode()), re.IGNORECASE)
"""The script's name anywhere in the body, in any case (as ``is_this_script`` compares it): a scan without a copy."""


def accept_onediff_requests(route_app):
    """Wraps one API route's ASGI app."""

    async def app(scope, receive, send):
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if _NAMES_THIS_SCRIPT.search(body):
            try:
                request = normalize_request(json.loads(body))
            except ScriptArgsError as error:
                await answer_422(send, error)
                return
            except ValueError:
                request = None  # not JSON: webui answers it as before
            if request is not None:
                body = json.dumps(request).encode()
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await route_app(scope, replay, send)

    return app


async def answer_422(send, error: ScriptArgsError) -> None:
    detail = [{"loc": ["body", "script_args", error.index], "msg": str(error), "type": "value_error"}]
    payload = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": 422,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def wrap_generation_routes(routes) -> None:
    """Wraps the POST routes of txt2img and img2img among ``routes`` (a Starlette/FastAPI router's)."""
    for route in routes:
        if getattr(route, "path", None) in GENERATION_ROUTES and "POST" in getattr(route, "methods", ()):
            route.app = accept_onediff_requests(route.app)
