"""Sampler-level benchmark: a whole Euler-ancestral run with webui's CFG batching, eager vs compiled, one process.

    python bench/sampler_bench.py                       # SDXL 1024x1024 and SD1.5 512x512, 30 steps, GPU fp16
    python bench/sampler_bench.py --tiny --device cpu   # tiny shapes on the CPU (CI smoke run)

Each step is one UNet call on the batch [cond, uncond] (webui's "batch cond/uncond"), as k-diffusion's Euler a runs in
webui with the model's own discrete schedule; the VAE and text encoders are left out. The compiled run starts after
the compile (warm), as every image after the first does.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import runpy
from pathlib import Path

import torch

runpy.run_path(str(Path(__file__).with_name("bootstrap.py")))

from sd_webui_onediff.bench import unet_bench  # noqa: E402
from sd_webui_onediff.compile import CompiledUNet  # noqa: E402
from sd_webui_onediff.compile.attention import SdpaAttention  # noqa: E402


def discrete_sigmas(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SD's training schedule: betas linear in sqrt from 0.00085 to 0.012 over 1000 steps; sigma = sqrt((1-a)/a).
    Returns every training sigma and ``steps`` of them spaced evenly in timestep, from the largest, then 0."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    t = torch.linspace(999, 0, steps, dtype=torch.float64)
    log_sigmas = sigmas.log()
    low, frac = t.floor().long(), t - t.floor()
    chosen = (log_sigmas[low] * (1 - frac) + log_sigmas[(low + 1).clamp(max=999)] * frac).exp()
    return sigmas.float(), torch.cat([chosen, chosen.new_zeros(1)]).float()


def timestep(sigma: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The (fractional) training timestep of ``sigma``, by interpolation in log sigma."""
    log_sigmas = sigmas.log().to(sigma.device)
    distances = sigma.log() - log_sigmas
    low = (distances >= 0).cumsum(0).argmax(0).clamp(max=log_sigmas.shape[0] - 2)
    w = ((log_sigmas[low] - sigma.log()) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    return low + w


def euler_ancestral(unet, x, sigmas, schedule, cond_kwargs, cfg_scale: float, generator) -> torch.Tensor:
    """x_{i+1} = x_i + d_i (sigma_down - sigma_i) + sigma_up z, with d_i = (x_i - D(x_i)) / sigma_i and
    D the classifier-free-guided denoiser: uncond + s (cond - uncond), both halves in one UNet call."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        c_in = 1 / (sigma**2 + 1) ** 0.5
        x_in = torch.cat([x, x]) * c_in
        t = timestep(sigma, schedule).expand(2).to(x.device)
        eps = unet_bench.arch.output_tensor(unet(x_in, t, **cond_kwargs)).float()
        cond_eps, uncond_eps = eps.chunk(2)
        denoised = x - sigma * (uncond_eps + cfg_scale * (cond_eps - uncond_eps))
        sigma_up = min(float(sigma_next), float((sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5))
        sigma_down = (float(sigma_next) ** 2 - sigma_up**2) ** 0.5
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + torch.randn(x.shape, generator=generator, device="cpu").to(x.device) * sigma_up
    return x


def run_model(name: str, args, device: torch.device) -> dict:
    build, full, tiny, make_inputs, latent = unet_bench.CASES[name]
    config, latent = (tiny, 16) if args.tiny else (full, latent)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet = build(config).to(device, dtype)
    (_x, _t, *positional), kwargs = make_inputs(config, batch=2, latent=latent)
    if positional:  # diffusers' UNet takes the context positionally; wrap it into the keyword form
        kwargs = {"encoder_hidden_states": positional[0], **kwargs}
    _, cond_kwargs = unet_bench.on_device((), kwargs, device)
    schedule, sigmas = discrete_sigmas(args.steps)
    autocast = unet_bench.fp16_autocast(device)
    sdp = SdpaAttention(unet, upcast=False)

    def sample(model, install=contextlib.nullcontext):
        generator = torch.Generator().manual_seed(0)
        x = (torch.randn((1, 4, latent, latent), generator=generator) * sigmas[0]).to(device)

        def run():
            with torch.no_grad(), autocast, install():
                return euler_ancestral(model, x, sigmas, schedule, cond_kwargs, 7.0, generator)

        return unet_bench.wall_seconds(run, device)

    eager_x, eager_s = sample(unet, sdp.installed)
    compiled = CompiledUNet(unet)
    _, first_s = unet_bench.wall_seconds(lambda: sample(compiled), device)
    compiled_x, compiled_s = sample(compiled)
    error = ((compiled_x - eager_x).float().norm() / eager_x.float().norm()).item()
    return {"model": name + (" tiny" if args.tiny else ""), "steps": args.steps, "eager_s": eager_s,
            "compiled_s": compiled_s, "eager_it_s": args.steps / eager_s, "compiled_it_s": args.steps / compiled_s,
            "speedup": eager_s / compiled_s, "first_run_s": first_s, "latent_rel_err": error,
            "finite": bool(torch.isfinite(compiled_x).all())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(unet_bench.CASES), default=["sdxl", "sd15"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [run_model(name, args, device) for name in args.models]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\ncard: {card}   torch: {torch.__version__}   Euler a, CFG 7 (batch [cond, uncond]), no VAE")
    print("| model | steps | eager s | compiled s | eager it/s | compiled it/s | speedup | first run (compile) s | latent rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['steps']} | {r['eager_s']:.2f} | {r['compiled_s']:.2f} | {r['eager_it_s']:.1f} | "
              f"{r['compiled_it_s']:.1f} | {r['speedup']:.2f}x | {r['first_run_s']:.1f} | {r['latent_rel_err']:.1e} |")
    broken = [r["model"] for r in rows if not r["finite"] or not math.isfinite(r["latent_rel_err"])]
    if broken:
        raise SystemExit(f"non-finite compiled samples for {', '.join(broken)}")


if __name__ == "__main__":
    main()
