"""Test-only webui extension: hooks the UNet the way other extensions do, one way per request, chosen with
``alwayson_scripts: {"hook stand-ins": {"args": [kind]}}``. Each changes the image, so that equality with eager means
the hook ran.

- ``attn2``: an instance forward on every ``attn2`` that adds attention to a second context, installed for the
  generation and removed after it (IP-Adapter's and Regional Prompter's hooks);
- ``sag``: an instance forward on the middle block's ``attn1`` that keeps its output for a ``cfg_denoised`` callback,
  which fails when the forward did not run (Self-attention guidance);
- ``freeu``: webui's ``th.cat`` (the UNet's skip-connection concatenation), patched once at load and active when asked
  for, changing from step to step (FreeU);
- ``dynthres``: the sampler swapped, for the batch, for one whose CFG denoiser combines cond and uncond with a
  thresholding formula (Dynamic Thresholding replaces ``CFGDenoiser.combine_denoised`` this way);
- ``adetailer``: a second pass over each finished image, in ``postprocess_image``: img2img inpainting of a fixed
  region through a nested ``process_images`` sharing p's infotext parameters, with a copy of the script runner keeping
  only whitelisted always-on scripts (ADetailer, with a rectangle where it has a detector's mask); ``adetailer SIZE``
  inpaints at SIZE x SIZE (ADetailer's separate inpaint width and height), not at the image's size.

``GET /hook-standins/lost`` lists the hooks that were not in place any more when a generation ended;
``GET /hook-standins/inner-pass-unets`` the class of the UNet each ``adetailer`` inner pass started with.
"""
import functools
from copy import copy

import gradio as gr
import torch
from lib_hook_standins import ACTIVE, stepped_cat
from modules import script_callbacks, scripts, sd_hijack_unet, sd_samplers, sd_samplers_common, sd_samplers_kdiffusion
from modules.processing import StableDiffusionProcessingImg2Img, process_images
from PIL import Image, ImageDraw

LOST = []
INNER_PASS_UNETS = []
OUTSIDE_THE_UNET = ("dynthres", "adetailer")
SAG_OUTPUT = {}


def add_second_context(original):
    def forward(x, context=None, **kwargs):
        return original(x, context=context, **kwargs) + 0.5 * original(x, context=-context, **kwargs)

    return forward


def keep_output(original):
    def forward(x, *args, **kwargs):
        out = original(x, *args, **kwargs)
        SAG_OUTPUT["attn1"] = out
        return out

    return forward


def use_kept_output(params):
    if ACTIVE["kind"] == "sag":
        params.x += 20 * SAG_OUTPUT.pop("attn1").std()  # KeyError when the hooked forward did not run


class ThresholdingDenoiser(sd_samplers_kdiffusion.CFGDenoiserKDiffusion):
    """Guidance at the requested scale, each sample's values clamped at a percentile of their magnitude and rescaled
    to the range guidance at a low scale gives."""

    MIMIC_SCALE = 1.5
    PERCENTILE = 0.9

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        full = super().combine_denoised(x_out, conds_list, uncond, cond_scale)
        mimic = super().combine_denoised(x_out, conds_list, uncond, self.MIMIC_SCALE)
        flat, limit_to = full.flatten(1), mimic.flatten(1).abs().amax(dim=1, keepdim=True)
        limit = torch.quantile(flat.abs().float(), self.PERCENTILE, dim=1, keepdim=True).to(flat.dtype).clamp_min(1e-6)
        return (flat.clamp(-limit, limit) / limit * limit_to).view_as(full)


def swap_sampler(p) -> None:
    """Registers a copy of p's sampler whose constructor puts a ``ThresholdingDenoiser`` in, and selects it."""
    original = sd_samplers.all_samplers_map[p.sampler_name]

    def construct(model):
        sampler = original.constructor(model)
        sampler.model_wrap_cfg = ThresholdingDenoiser(sampler)
        return sampler

    p.standin_sampler_name, p.sampler_name = p.sampler_name, f"{p.sampler_name} (thresholded)"
    sd_samplers.all_samplers_map[p.sampler_name] = sd_samplers_common.SamplerData(
        p.sampler_name, construct, original.aliases, original.options)
    if p.sampler is not None:  # img2img made its sampler before the batch
        p.sampler = sd_samplers.create_sampler(p.sampler_name, p.sd_model)


def restore_sampler(p) -> None:
    del sd_samplers.all_samplers_map[p.sampler_name]
    p.sampler_name = p.standin_sampler_name


def detail_region(p, pp, size: int | None) -> None:
    """Inpaints a fixed region of ``pp.image`` again (ADetailer's pass over a detected face), sharing p's infotext."""
    mask = Image.new("L", pp.image.size)
    ImageDraw.Draw(mask).rectangle((8, 8, pp.image.width // 2, pp.image.height // 2), fill=255)
    inner = StableDiffusionProcessingImg2Img(
        sd_model=p.sd_model, init_images=[pp.image], mask=mask, mask_blur=2, inpainting_fill=1, inpaint_full_res=True,
        inpaint_full_res_padding=8, denoising_strength=0.6, prompt=p.prompt + ", detailed", negative_prompt=p.negative_prompt,
        seed=p.seeds[p.batch_index], sampler_name=p.sampler_name, batch_size=1, n_iter=1, steps=p.steps,
        cfg_scale=p.cfg_scale, width=size or p.width, height=size or p.height, extra_generation_params=p.extra_generation_params,
        do_not_save_samples=True, do_not_save_grid=True,
    )
    inner.scripts = copy(p.scripts)
    inner.scripts.alwayson_scripts = []  # ADetailer keeps a whitelist (wildcards, Dynamic Thresholding...): none here
    inner.script_args = p.script_args
    INNER_PASS_UNETS.append(type(inner.sd_model.model.diffusion_model).__name__)
    try:
        pp.image = process_images(inner).images[0]
    finally:
        inner.close()


sd_hijack_unet.th.cat = functools.partial(stepped_cat, original=sd_hijack_unet.th.cat)


class HookStandIns(scripts.Script):
    def title(self):
        return "hook stand-ins"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return [gr.Textbox(label="hook stand-in", value="")]

    def process(self, p, kind=""):
        # FreeU's switch, read by the traced th.cat, is its own: the hooks outside the UNet leave it alone.
        ACTIVE["kind"] = "" if kind.split(" ")[0] in OUTSIDE_THE_UNET else kind
        unet = p.sd_model.model.diffusion_model
        wrap = {"attn2": add_second_context, "sag": keep_output}.get(kind)
        self.installed = [
            (module, vars(module).get("forward"), wrap(module.forward))
            for name, module in unet.named_modules()
            if wrap and (name.endswith("attn2") if kind == "attn2" else name == "middle_block.1.transformer_blocks.0.attn1")
        ]
        for module, _, forward in self.installed:
            module.forward = forward

    def process_batch(self, p, kind="", **kwargs):
        if kind == "dynthres":
            swap_sampler(p)

    def postprocess_batch(self, p, kind="", **kwargs):
        if kind == "dynthres":
            restore_sampler(p)

    def postprocess_image(self, p, pp, kind=""):
        name, _, size = kind.partition(" ")
        if name == "adetailer":
            detail_region(p, pp, int(size) if size else None)

    def postprocess(self, p, processed, *args):
        for module, previous, forward in self.installed:
            if vars(module).get("forward") is not forward:
                LOST.append(f"{type(module).__name__} forward of {ACTIVE['kind']}")
            if previous is None:
                vars(module).pop("forward", None)
            else:
                module.forward = previous
        ACTIVE["kind"] = ""


def add_route(_demo, app):
    app.add_api_route("/hook-standins/lost", lambda: LOST, methods=["GET"])
    app.add_api_route("/hook-standins/inner-pass-unets", lambda: INNER_PASS_UNETS, methods=["GET"])


script_callbacks.on_cfg_denoised(use_kept_output, name="hook stand-ins: sag")
script_callbacks.on_app_started(add_route, name="hook stand-ins: lost hooks")
