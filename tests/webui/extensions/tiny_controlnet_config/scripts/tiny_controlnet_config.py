"""Test-only extension: points sd-webui-controlnet's model guesser at the width of the tiny test checkpoint.

ControlNet builds every SD1.x ControlNet with SD1.5's hyperparameters (``controlnet_default_config`` in its
``scripts/controlnet_model_guess.py``), reading only ``hint_channels`` and ``context_dim`` from the file. The tiny
``tiny-sd15-cn`` has SD1.5's topology at a narrower width: the guesser's ``model_channels`` and ``num_heads`` are set
from that checkpoint's config (``models/Stable-diffusion/tiny-sd15-cn.yaml``) once webui has loaded ControlNet.
"""
import sys
from pathlib import Path

from modules import paths, script_callbacks

CONFIG = Path(paths.models_path) / "Stable-diffusion" / "tiny-sd15-cn.yaml"


def point_the_guesser_at_the_tiny_config(*_args):
    from omegaconf import OmegaConf

    guess = sys.modules.get("scripts.controlnet_model_guess")
    if guess is None:
        print("tiny_controlnet_config: sd-webui-controlnet is not loaded", file=sys.stderr)
        return
    unet = OmegaConf.load(CONFIG).model.params.unet_config.params
    guess.controlnet_default_config.update(model_channels=int(unet.model_channels), num_heads=int(unet.num_heads))
    print(f"tiny_controlnet_config: ControlNet's SD1.x config now has model_channels={unet.model_channels}, "
          f"num_heads={unet.num_heads}")


script_callbacks.on_app_started(point_the_guesser_at_the_tiny_config, name="tiny ControlNet config")
