"""Build tiny random-weight Stable Diffusion checkpoints for webui tests.

The models are instantiated from the REAL classes of webui's repositories (ldm for SD1.x, sgm for SDXL) through the
tiny omegaconf configs in ``configs/``; the checkpoint is the model's ``state_dict()`` saved as safetensors, with the
config copied beside it as ``<name>.yaml`` (webui picks a config placed next to a checkpoint and classifies the model
as SD1/SDXL by itself).

Run it with the webui venv's python, e.g.::

    SD_WEBUI_PATH=/work/sd-webui HF_HOME=... HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \\
        /work/sd-webui/venv/bin/python tests/webui/checkpoints.py OUT_DIR

which writes the default set (see ``DEFAULT_CHECKPOINTS``). HF_HOME must hold the tokenizer/config of the text
encoders (only configs and tokenizers are read from there; all weights are random).
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"

# name -> (config file, seed)
DEFAULT_CHECKPOINTS = {
    "tiny-sd15-a": ("tiny-sd15.yaml", 1),
    "tiny-sd15-b": ("tiny-sd15.yaml", 2),
    "tiny-sdxl": ("tiny-sdxl.yaml", 3),
}
CONTROLNET_CHECKPOINTS = {"tiny-sd15-cn": ("tiny-sd15-cn.yaml", 4), "tiny-sdxl-cn": ("tiny-sdxl-cn.yaml", 5)}
"""For the ControlNet tests only (``WebUI.add_controlnet``), not in every test webui: SD1.5's and SDXL's full UNet
topologies at a narrow width."""

_prepared = False
_last_check: dict = {}


def _prepare_imports(webui_path: str | os.PathLike | None = None) -> None:
    """Make ldm/sgm importable from webui's repositories/ and apply the shims webui applies itself."""
    global _prepared
    if _prepared:
        return
    webui_path = Path(webui_path or os.environ.get("SD_WEBUI_PATH", ""))
    repos = webui_path / "repositories"
    for sub in ("stable-diffusion-stability-ai", "generative-models", "k-diffusion"):
        p = repos / sub
        if not p.is_dir():
            raise RuntimeError(f"{p} not found: set SD_WEBUI_PATH to a webui checkout with repositories/")
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    # webui (modules/initialize_util.py) aliases this module removed from pytorch_lightning 1.9
    import pytorch_lightning  # noqa: F401
    import pytorch_lightning.utilities.rank_zero
    sys.modules.setdefault("pytorch_lightning.utilities.distributed", pytorch_lightning.utilities.rank_zero)

    # Text encoders: build from config only (no weights on disk; webui does the same through
    # modules/sd_disable_initialization.py and then loads the weights from the checkpoint).
    import transformers

    def _config_only(cls):
        def from_pretrained(name, *args, **kwargs):
            config = cls.config_class.from_pretrained(name)
            return cls(config)
        return from_pretrained

    for cls_name in ("CLIPTextModel", "T5EncoderModel"):
        cls = getattr(transformers, cls_name)
        cls.from_pretrained = staticmethod(_config_only(cls))

    import open_clip
    orig_create = open_clip.create_model_and_transforms

    def create_model_and_transforms(*args, **kwargs):
        kwargs["pretrained"] = None
        return orig_create(*args, **kwargs)

    open_clip.create_model_and_transforms = create_model_and_transforms
    _prepared = True


def _instantiate(config):
    module, cls = config["target"].rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)(**config.get("params", dict()))


def _rerandomise_zero_layers(model) -> list[str]:
    """Give every all-zero conv/linear layer PyTorch's default init again.

    ldm/sgm zero-initialise the UNet's output conv, the last conv of every ResBlock and the proj_out of every
    transformer block (zero_module); with those left at zero the UNet ignores the prompt and every prompt gives the
    same image.
    """
    import torch

    names = []
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
            if m.weight is not None and torch.count_nonzero(m.weight) == 0:
                m.reset_parameters()
                names.append(name)
    return names


def _randomise_norms(model, scale: float = 0.1) -> None:
    """Give LayerNorm/GroupNorm affine parameters small random offsets from their (1, 0) init.

    With weight 1 and bias 0 the text encoder's final LayerNorm makes every token vector zero-mean, so the mean of the
    whole conditioning is ~0; webui's "Original" emphasis rescales by original_mean / new_mean, which is 0/0 = NaN
    for some prompts. Trained models never have exactly (1, 0) here.
    """
    import torch

    for m in model.modules():
        if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and getattr(m, "weight", None) is not None:
            with torch.no_grad():
                m.weight.add_(torch.randn_like(m.weight) * scale)
                if m.bias is not None:
                    m.bias.add_(torch.randn_like(m.bias) * scale)


def _check_sane(model, is_sdxl: bool) -> dict:
    """Run the text encoder + UNet on two prompts; fail on NaN/zero output or prompt-independence."""
    import torch

    for m in model.modules():  # text encoders default to device="cuda"
        if isinstance(getattr(m, "device", None), str):
            m.device = "cpu"
    torch.manual_seed(0)
    with torch.no_grad():
        x = torch.randn(1, 4, 8, 8)
        t = torch.tensor([500])
        outs = []
        for prompt in ("a photo of a cat", "a red car in the rain"):
            if is_sdxl:
                batch = {
                    "txt": [prompt],
                    "original_size_as_tuple": torch.tensor([[64, 64]]),
                    "crop_coords_top_left": torch.tensor([[0, 0]]),
                    "target_size_as_tuple": torch.tensor([[64, 64]]),
                    "aesthetic_score": torch.tensor([[6.0]]),  # the refiner's conditioner needs it; the base ignores it
                }
                c = model.conditioner(batch)
                out = model.model.diffusion_model(x, t, context=c["crossattn"], y=c["vector"])
            else:
                c = model.get_learned_conditioning([prompt])
                out = model.model.diffusion_model(x, t, context=c)
            outs.append(out)
        for o in outs:
            if not torch.isfinite(o).all():
                raise RuntimeError("UNet output has NaN/inf")
            if o.abs().max() == 0:
                raise RuntimeError("UNet output is all zero")
        rel = ((outs[0] - outs[1]).abs().mean() / outs[0].abs().mean()).item()
        if rel < 1e-4:
            raise RuntimeError(f"UNet output barely depends on the prompt (relative difference {rel:g})")
        # VAE decoder output must not be constant
        if is_sdxl:  # sgm's MemoryEfficientAttnBlock needs xformers; webui swaps in its own attention, we use vanilla
            import sgm.modules.diffusionmodules.model as sgm_model
            sgm_model.MemoryEfficientAttnBlock.attention = sgm_model.AttnBlock.attention
        img = model.first_stage_model.decode(torch.randn(1, 4, 8, 8))
        if not torch.isfinite(img).all() or img.std() < 1e-3:
            raise RuntimeError(f"VAE decode is degenerate (std {img.std().item():g})")
    return {"prompt_rel_diff": rel, "unet_out_std": outs[0].std().item(), "vae_out_std": img.std().item()}


def build_checkpoint(config_path, out_path, seed: int, webui_path=None, check: bool = True, half: bool = False) -> Path:
    """Instantiate the model of ``config_path`` with random weights (seeded) and save it (``half``: as float16, which
    halves the file of a full-size model; webui casts to its own dtype on load either way).

    Writes ``out_path`` (``<name>.safetensors``) and ``<name>.yaml`` (a copy of the config) beside it.
    Returns the path of the safetensors file.
    """
    _prepare_imports(webui_path)
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    config_path = Path(config_path)
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        out_path = out_path.with_suffix(".safetensors")
    out_path.parent.mkdir(parents=True, exist_ok=True)

    config = OmegaConf.load(config_path)
    torch.manual_seed(seed)
    model = _instantiate(config.model)
    model.eval()
    _rerandomise_zero_layers(model)
    _randomise_norms(model)
    is_sdxl = hasattr(model, "conditioner")

    if check:
        _last_check[out_path] = _check_sane(model, is_sdxl)

    state_dict = {k: (v.half() if half and v.is_floating_point() else v).detach().contiguous().clone()
                  for k, v in model.state_dict().items()}
    save_file(state_dict, str(out_path))
    shutil.copyfile(config_path, out_path.with_suffix(".yaml"))
    return out_path


def _text_encoder_lora_target(config):
    """(kohya key prefix, config of the CLIP text encoder webui maps it to) for a model config.

    SD1.x: ``lora_te_text_model_*`` -> ``cond_stage_model``; SDXL: ``lora_te1_text_model_*`` -> embedder 0 of the
    conditioner (webui's networks.py maps both onto the HF ``CLIPTextModel`` the embedder holds as ``transformer``).
    """
    params = config.model.params
    if "conditioner_config" in params:
        return "lora_te1_", params.conditioner_config.params.emb_models[0]
    return "lora_te_", params.cond_stage_config


NETWORK_KINDS = ("lora", "loha", "lokr", "ia3", "full", "oft", "norm")
"""The network types of webui's builtin Lora extension that ``build_lora`` can write (keys as each type's loader in
webui's ``network_*.py`` expects them). "full" writes ``diff_b`` for the layers that have a bias: webui 1.10.1's eager
path fails a network that adds a bias to a bias-less layer on its second forward ("no backup bias found"), so no eager
image exists to compare with. "norm" targets the transformer blocks' LayerNorms instead of attention Linears."""


def _network_weights(sd, key, m, kind, rank, strength, gen) -> None:
    import torch

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).contiguous()

    out_f, in_f = m.weight.shape[0], m.weight.shape[-1]
    if kind == "lora":
        sd[f"{key}.lora_down.weight"] = randn(rank, in_f, scale=in_f ** -0.5)
        sd[f"{key}.lora_up.weight"] = randn(out_f, rank, scale=strength * rank ** -0.5)
    elif kind == "loha":
        for w in ("w1", "w2"):
            sd[f"{key}.hada_{w}_a"] = randn(out_f, rank, scale=strength ** 0.5 * rank ** -0.5)
            sd[f"{key}.hada_{w}_b"] = randn(rank, in_f, scale=in_f ** -0.5)
    elif kind == "lokr":
        sd[f"{key}.lokr_w1"] = randn(2, 2, scale=0.5)
        sd[f"{key}.lokr_w2"] = randn(out_f // 2, in_f // 2, scale=strength * in_f ** -0.5)
    elif kind == "ia3":
        sd[f"{key}.weight"] = randn(out_f, scale=strength)
        sd[f"{key}.on_input"] = torch.tensor(False)
    elif kind == "full":
        sd[f"{key}.diff"] = randn(out_f, in_f, scale=strength * in_f ** -0.5)
        if m.bias is not None:
            sd[f"{key}.diff_b"] = randn(out_f, scale=strength)
    elif kind == "oft":
        blocks = 4
        sd[f"{key}.oft_blocks"] = randn(blocks, out_f // blocks, out_f // blocks, scale=0.3 * strength)
    elif kind == "norm":
        sd[f"{key}.w_norm"] = randn(out_f, scale=strength)
        sd[f"{key}.b_norm"] = randn(out_f, scale=strength)
    else:
        raise ValueError(f"unknown network kind {kind!r}; one of {NETWORK_KINDS}")
    if kind in ("lora", "loha", "oft"):
        sd[f"{key}.alpha"] = torch.tensor(float(rank))


def build_lora(config_path, out_path, seed: int, rank: int = 4, strength: float = 1.0, webui_path=None,
               parts=("unet",), kind: str = "lora") -> Path:
    """Write a random kohya-style LoRA for a config's model; ``parts``: any of "unet", "te".

    "unet": the Linear layers of the UNet's transformers (attention, feed-forward, projections), keys ``lora_unet_`` +
    compvis module path with ``_``, which webui's builtin Lora extension maps by replacing ``lora_unet`` with
    ``diffusion_model``. "te": the Linear layers of the CLIP text
    encoder's transformer layers, keys ``lora_te_text_model_encoder_layers_*`` (SD1.x) or ``lora_te1_...`` (SDXL, first
    text encoder). ``kind``: one of ``NETWORK_KINDS``. The file goes to ``<name>.safetensors`` (put it in models/Lora).
    """
    _prepare_imports(webui_path)
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    out_path = Path(out_path).with_suffix(".safetensors")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.load(config_path)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    if "unet" in parts:
        unet = _instantiate(config.model.params.get("unet_config") or config.model.params.network_config)
        for name, m in unet.named_modules():
            if kind == "norm":
                wanted = isinstance(m, torch.nn.LayerNorm) and ".transformer_blocks." in name
            else:  # the layers kohya's LoRA trains: every Linear of the transformer blocks, and their projections
                wanted = isinstance(m, torch.nn.Linear) and (".transformer_blocks." in name
                                                              or name.endswith(("proj_in", "proj_out")))
            if wanted:
                _network_weights(sd, "lora_unet_" + name.replace(".", "_"), m, kind, rank, strength, gen)
    if "te" in parts:
        prefix, encoder_config = _text_encoder_lora_target(config)
        text_model = _instantiate(encoder_config).transformer
        for name, m in text_model.named_modules():
            if isinstance(m, torch.nn.Linear) and name.startswith("text_model.encoder.layers."):
                _network_weights(sd, prefix + name.replace(".", "_"), m, "lora", rank, strength, gen)
    if not sd:
        raise RuntimeError(f"no layers for LoRA parts {parts} found in the model of {config_path}")
    save_file(sd, str(out_path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                           "ss_network_alpha": str(rank)})
    return out_path


# name -> (config file, seed)
DEFAULT_LORAS = {
    "tiny-lora-sd15": ("tiny-sd15.yaml", 11),
    "tiny-lora-sdxl": ("tiny-sdxl.yaml", 13),
}


def build_default_loras(out_dir, webui_path=None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {name: build_lora(CONFIGS / cfg, out_dir / f"{name}.safetensors", seed, webui_path=webui_path)
            for name, (cfg, seed) in DEFAULT_LORAS.items()}


def build_default_checkpoints(out_dir, webui_path=None, checkpoints=DEFAULT_CHECKPOINTS) -> dict[str, Path]:
    out_dir = Path(out_dir)
    result = {}
    for name, (cfg, seed) in checkpoints.items():
        result[name] = build_checkpoint(CONFIGS / cfg, out_dir / f"{name}.safetensors", seed, webui_path=webui_path)
    return result


CONTROLNET_SD15 = dict(in_channels=4, model_channels=320, hint_channels=3, num_res_blocks=2,
                       attention_resolutions=[1, 2, 4], transformer_depth=[1, 1, 1, 0], channel_mult=[1, 2, 4, 4],
                       transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768, num_heads=8)
"""The hyperparameters sd-webui-controlnet's model guesser gives every SD1.x ControlNet (its ``cldm_v15``); it reads
only ``hint_channels`` and ``context_dim`` from the file."""
CONTROLNET_SDXL = dict(num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320, hint_channels=3,
                       num_res_blocks=2, attention_resolutions=[2, 4], transformer_depth=[0, 2, 10], channel_mult=[1, 2, 4],
                       transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048,
                       num_head_channels=64)
"""What the guesser gives an SDXL ControlNet whose file has ten transformer blocks at the third level (full SDXL)."""
CONTROLNET_SDXL_MID = dict(CONTROLNET_SDXL, attention_resolutions=[4], transformer_depth=[0, 0, 1],
                          transformer_depth_middle=1)
"""What the guesser gives an SDXL ControlNet with one transformer block at the third level (its ``mid`` config)."""
TINY_WIDTH = dict(model_channels=32, num_heads=2, context_dim=64)
"""Where ``tiny-sd15-cn`` (configs/tiny-sd15-cn.yaml) is narrower than SD1.5; the test extension
``extensions/tiny_controlnet_config`` points ControlNet's guesser at its config."""
TINY_SDXL_WIDTH = dict(model_channels=32, num_head_channels=16, context_dim=320, adm_in_channels=1792)
"""Where ``tiny-sdxl-cn`` (configs/tiny-sdxl-cn.yaml) is narrower than SDXL; the test extension points the guesser's
``mid`` config at it."""


def _import_controlnet(controlnet_path):
    """sd-webui-controlnet's own model classes (``scripts/cldm.py``, ``scripts/adapter.py``), built outside webui: its
    ``scripts`` folder as the package ``scripts`` (generative-models has one too), and a bare ``modules.devices`` (read
    only when a model moves between devices)."""
    import types

    sys.path.insert(0, str(controlnet_path))
    sys.modules["scripts"] = types.ModuleType("scripts")
    sys.modules["scripts"].__path__ = [str(Path(controlnet_path) / "scripts")]
    if "modules" not in sys.modules:
        modules = sys.modules["modules"] = types.ModuleType("modules")
        modules.devices = sys.modules["modules.devices"] = types.ModuleType("modules.devices")
    cldm = importlib.import_module("scripts.cldm")
    adapter = importlib.import_module("scripts.adapter")
    return cldm.ControlNet, adapter.Adapter


def build_controlnet_models(out_dir, controlnet_path, webui_path=None, full_size: bool = False) -> dict[str, Path]:
    """Random ControlNet models of ControlNet's own classes, saved as its guesser reads them: an SD1.5 ControlNet
    (hint_channels 3) and, at tiny width, a T2I-Adapter (its guesser takes the widths from the file). Tiny
    (``tiny-controlnet-sd15``, ``tiny-t2i-adapter-sd15``, for ``tiny-sd15-cn``; ``tiny-controlnet-sdxl``, the guesser's
    ``mid`` SDXL ControlNet, for ``tiny-sdxl-cn``) or, with ``full_size``, SD1.5's and SDXL's
    (``controlnet-sd15-random``, ``controlnet-sdxl-random``, float16, for the GPU benchmark). The zero convolutions
    are re-randomised: at zero a ControlNet adds nothing."""
    _prepare_imports(webui_path)
    import torch
    from safetensors.torch import save_file

    ControlNet, Adapter = _import_controlnet(controlnet_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(21)
    if full_size:
        models = {"controlnet-sd15-random": ControlNet(**CONTROLNET_SD15),
                  "controlnet-sdxl-random": ControlNet(**CONTROLNET_SDXL)}
    else:
        models = {"tiny-controlnet-sd15": ControlNet(**{**CONTROLNET_SD15, **TINY_WIDTH}),
                  "tiny-controlnet-sdxl": ControlNet(**{**CONTROLNET_SDXL_MID, **TINY_SDXL_WIDTH})}
        channels = TINY_WIDTH["model_channels"]
        models["tiny-t2i-adapter-sd15"] = Adapter(cin=3 * 64, channels=[channels, channels * 2, channels * 4, channels * 4],
                                                  nums_rb=2, ksize=1, sk=True, use_conv=False)
    paths = {}
    for name, model in models.items():
        _rerandomise_zero_layers(model)
        _randomise_norms(model)
        state_dict = {k: (v.half() if full_size and v.is_floating_point() else v).detach().contiguous()
                      for k, v in model.state_dict().items()}
        paths[name] = out_dir / f"{name}.safetensors"
        save_file(state_dict, str(paths[name]))
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", help="folder for the checkpoints (e.g. <data-dir>/models/Stable-diffusion)")
    ap.add_argument("--webui", default=None, help="webui checkout (default: $SD_WEBUI_PATH)")
    ap.add_argument("--config", default=None, help="build one checkpoint from this config instead of the default set")
    ap.add_argument("--controlnet-checkpoints", action="store_true",
                    help="build the ControlNet tests' checkpoints (CONTROLNET_CHECKPOINTS) instead of the default set")
    ap.add_argument("--name", default=None, help="checkpoint name for --config")
    ap.add_argument("--seed", type=int, default=0, help="seed for --config")
    ap.add_argument("--half", action="store_true", help="save --config's checkpoint as float16 (full-size models)")
    ap.add_argument("--lora-dir", default=None, help="also write the default tiny LoRAs here (e.g. <data-dir>/models/Lora)")
    ap.add_argument("--controlnet-dir", default=None,
                    help="also write random ControlNet models here (e.g. <data-dir>/models/ControlNet)")
    ap.add_argument("--controlnet", default=os.environ.get("SD_WEBUI_CONTROLNET"),
                    help="sd-webui-controlnet checkout whose model classes build them (default: $SD_WEBUI_CONTROLNET)")
    ap.add_argument("--full-size", action="store_true", help="--controlnet-dir: SD1.5's full-size ControlNet instead")
    args = ap.parse_args(argv)
    if args.config:
        name = args.name or Path(args.config).stem
        paths = {name: build_checkpoint(args.config, Path(args.out_dir) / f"{name}.safetensors", args.seed, args.webui,
                                        half=args.half)}
    else:
        paths = build_default_checkpoints(args.out_dir, args.webui,
                                          CONTROLNET_CHECKPOINTS if args.controlnet_checkpoints else DEFAULT_CHECKPOINTS)
    if args.lora_dir:
        paths.update(build_default_loras(args.lora_dir, args.webui))
    if args.controlnet_dir:
        paths.update(build_controlnet_models(args.controlnet_dir, args.controlnet, args.webui, full_size=args.full_size))
    for name, p in paths.items():
        print(f"{name}: {p} ({p.stat().st_size / 1e6:.1f} MB) {_last_check.get(p, '')}")


if __name__ == "__main__":
    main()
