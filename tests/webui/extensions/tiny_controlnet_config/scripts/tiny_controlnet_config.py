"""Test-only extension: points sd-webui-controlnet's model guesser at the widths of the tiny test checkpoints.

ControlNet builds every SD1.x ControlNet with SD1.5's hyperparameters (``controlnet_default_config`` in its
``scripts/controlnet_model_guess.py``), reading only ``hint_channels`` and ``context_dim`` from the file, and an SDXL
ControlNet with one of three SDXL configs chosen by its transformer blocks (``controlnet_sdxl_mid_config`` for one at
the third level), reading only ``hint_channels``. The tiny ``tiny-sd15-cn`` and ``tiny-sdxl-cn`` have SD1.5's and
SDXL's topologies at a narrower width: the guesser's widths are set from those checkpoints' configs
(``models/Stable-diffusion/<name>.yaml``) once webui has loaded ControlNet.
"""
import sys
from pathlib import Path

from modules import paths, script_callbacks

CONFIGS = Path(paths.models_path) / "Stable-diffusion"
WIDTHS = {  # guesser config -> (checkpoint whose UNet it follows, the UNet parameters it takes)
    "controlnet_default_config": ("tiny-sd15-cn", ("model_channels", "num_heads")),
    "controlnet_sdxl_mid_config": ("tiny-sdxl-cn", ("model_channels", "num_head_channels", "context_dim",
                                                    "adm_in_channels")),
}


def point_the_guesser_at_the_tiny_configs(*_args):
    from omegaconf import OmegaConf

    guess = sys.modules.get("scripts.controlnet_model_guess")
    if guess is None:
        print("tiny_controlnet_config: sd-webui-controlnet is not loaded", file=sys.stderr)
        return
    for config_name, (checkpoint, keys) in WIDTHS.items():
        params = OmegaConf.load(CONFIGS / f"{checkpoint}.yaml").model.params
        unet = (params.get("unet_config") or params.network_config).params
        widths = {key: int(unet[key]) for key in keys}
        getattr(guess, config_name).update(widths)
        print(f"tiny_controlnet_config: ControlNet's {config_name} now has {widths}")


script_callbacks.on_app_started(point_the_guesser_at_the_tiny_configs, name="tiny ControlNet config")
