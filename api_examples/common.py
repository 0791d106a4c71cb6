"""Shared by txt2img.py and img2img.py: the request, its errors in plain words, and saving the images."""
from __future__ import annotations

import argparse
import base64
import sys
import time
from pathlib import Path

import requests

SCRIPT = "onediff_diffusion_model"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--url", default="http://127.0.0.1:7860", help="webui's address (default %(default)s)")
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--compiler-cache", default="None", help="a saved compiler cache to load first")
    p.add_argument("--save-cache", default="", help="save what this request compiles under this name")
    p.add_argument("--quantize", action="store_true",
                   help="'Model Quantization(int8) Speed Up': 8-bit layers, format from Settings > OneDiff "
                        "(its default, auto, quantizes SDXL and keeps SD1.x/SD2.x unquantized)")
    return p


def payload(args: argparse.Namespace) -> dict:
    return {
        "prompt": args.prompt,
        "width": args.width,
        "height": args.height,
        "steps": args.steps,
        "seed": args.seed,
        "script_name": SCRIPT,
        # the Script's arguments in UI order: quantization, compiler_cache, saved_cache_name, always_recompile
        "script_args": [args.quantize, args.compiler_cache, args.save_cache, False],
    }


def post(url: str, route: str, body: dict) -> dict:
    try:
        response = requests.post(f"{url.rstrip('/')}{route}", json=body, timeout=3600)
    except requests.ConnectionError:
        sys.exit(f"webui is not reachable at {url}: start it (./webui.sh --api) or pass --url")
    if response.status_code == 404:
        sys.exit(f"{url} answered 404 for {route}: webui was started without --api; restart it with --api")
    if response.status_code == 422:
        sys.exit(f"webui refused the request: {response.json().get('detail')}")
    response.raise_for_status()
    return response.json()


def save_images(result: dict, folder: Path) -> list[Path]:
    import json

    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    infotexts = json.loads(result.get("info") or "{}").get("infotexts", [])
    paths = []
    for index, image in enumerate(result["images"]):
        path = folder / f"{stamp}-{index}.png"
        path.write_bytes(base64.b64decode(image.split(",", 1)[-1]))
        paths.append(path)
        print(path)
        if index < len(infotexts):
            print("  " + infotexts[index].splitlines()[-1])
    return paths
