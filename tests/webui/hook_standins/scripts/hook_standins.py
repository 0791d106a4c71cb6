"""Test-only webui extension: hooks the UNet the way other extensions do, one way per request, chosen with
``alwayson_scripts: {"hook stand-ins": {"args": [kind]}}``. Each changes the image, so that equality with eager means
the hook ran.

- ``attn2``: an instance forward on every ``attn2`` that adds attention to a second context, installed for the
  generation and removed after it (IP-Adapter's and Regional Prompter's hooks);
- ``sag``: an instance forward on the middle block's ``attn1`` that keeps its output for a ``cfg_denoised`` callback,
  which fails when the forward did not run (Self-attention guidance);
- ``freeu``: webui's ``th.cat`` (the UNet's skip-connection concatenation), patched once at load and active when asked
  for, changing from step to step (FreeU).

``GET /hook-standins/lost`` lists the hooks that were not in place any more when a generation ended.
"""
import functools

import gradio as gr
from lib_hook_standins import ACTIVE, stepped_cat
from modules import script_callbacks, scripts, sd_hijack_unet

LOST = []
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


sd_hijack_unet.th.cat = functools.partial(stepped_cat, original=sd_hijack_unet.th.cat)


class HookStandIns(scripts.Script):
    def title(self):
        return "hook stand-ins"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return [gr.Textbox(label="hook stand-in", value="")]

    def process(self, p, kind=""):
        ACTIVE["kind"] = kind
        unet = p.sd_model.model.diffusion_model
        wrap = {"attn2": add_second_context, "sag": keep_output}.get(kind)
        self.installed = [
            (module, vars(module).get("forward"), wrap(module.forward))
            for name, module in unet.named_modules()
            if wrap and (name.endswith("attn2") if kind == "attn2" else name == "middle_block.1.transformer_blocks.0.attn1")
        ]
        for module, _, forward in self.installed:
            module.forward = forward

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


script_callbacks.on_cfg_denoised(use_kept_output, name="hook stand-ins: sag")
script_callbacks.on_app_started(add_route, name="hook stand-ins: lost hooks")
