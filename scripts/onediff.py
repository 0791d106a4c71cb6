"""webui adapter: the ``onediff_diffusion_model`` Script, its setting and its API hook.

Everything here translates webui's objects into calls of the core packages (``compile``, ``script_args``), which import
nothing from webui. Those packages are loaded as ``sd_webui_onediff.*`` (see the root ``__init__.py``): their bare names
(``compile``, ``lora``) would collide with webui's builtin Lora extension in the one global ``sys.modules``.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
import traceback
import weakref
from pathlib import Path

import gradio as gr
import torch
from modules import script_callbacks, scripts, shared
from modules.processing import Processed, StableDiffusionProcessing, process_images


def load_extension_package(name: str = "sd_webui_onediff"):
    root = Path(__file__).resolve().parents[1]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return root


EXTENSION_ROOT = load_extension_package()
from sd_webui_onediff.api_requests import wrap_generation_routes  # noqa: E402
from sd_webui_onediff.script_args import NO_CACHE, SCRIPT_TITLE, ScriptArgs, ScriptArgsError, parse_script_args  # noqa: E402
from sd_webui_onediff.torch_support import torch_version_problem  # noqa: E402

TORCH_PROBLEM = torch_version_problem(torch.__version__)
if TORCH_PROBLEM:
    print(TORCH_PROBLEM, file=sys.stderr)
else:
    from sd_webui_onediff.compile import CompileOptions, cache_artifacts, host_memory, quantization  # noqa: E402
    from sd_webui_onediff.compile.engine import CompiledUNet, error_summary  # noqa: E402
    from sd_webui_onediff.compile.layers import PLAIN_FORWARDS  # noqa: E402
    from sd_webui_onediff.compile.patching import patched  # noqa: E402
    from sd_webui_onediff.compile.registry import CompiledUNets  # noqa: E402
    from sd_webui_onediff.controlnet import glue as controlnet_glue  # noqa: E402
    from sd_webui_onediff.lora import FusedLoras, backup_copies, fits_on_gpu  # noqa: E402

    COMPILED_UNETS = CompiledUNets()
    LOADED_CACHES: set = set()
    """Compiler cache files handed to PyTorch in this process (``cache_artifacts.load``)."""

INFOTEXT_KEY = "OneDiff"
CACHE_DIR_OPTION = "onediff_compiler_caches_path"
LORA_BACKUPS_OPTION = "onediff_lora_backups"
QUANTIZATION_FORMAT_OPTION = "onediff_quantization_format"
QUANTIZATION_FORMATS = ("auto", "int8", "fp8")
AUTO_KEEPS_UNQUANTIZED = "the format 'auto' quantizes SDXL only (8 bits measured no faster on SD1.5)"
QUANTIZED_WEIGHTS_IN_HOST_MEMORY_OPTION = "onediff_quantized_weights_in_host_memory"
LORA_BACKUP_PLACES = {
    "GPU memory if it has room": None,
    "GPU memory": True,
    "CPU memory": False,
}
SWAPPED_FORWARDS = frozenset({
    "modules.sd_hijack_optimizations",  # "Cross attention optimization": the compiled graph runs SDPA instead
    "modules.hypernetworks.hypernetwork",  # webui's attention forward when that setting is "None"
    "networks",  # builtin Lora's layer forwards: its networks are fused into the weights instead
})
"""Where the class-level forwards come from that the compiled UNet replaces on purpose during its calls; another
extension's replacement of those classes' forwards makes the generation eager, with the reason."""
SUPPORTED_UNETS = {
    "ldm.modules.diffusionmodules.openaimodel.UNetModel",  # SD1.x, SD2.x, inpainting
    "sgm.modules.diffusionmodules.openaimodel.UNetModel",  # SDXL base, refiner, SSD-1B
}

def add_setting(key: str, default, label: str, choices: list[str] | None = None, info: str | None = None) -> None:
    """A setting in Settings > OneDiff; with ``choices``, a radio."""
    option = shared.OptionInfo(default, label, *((gr.Radio, {"choices": choices}) if choices else ()),
                               section=("onediff", "OneDiff"))
    shared.opts.add_option(key, option.info(info) if info else option)


add_setting(CACHE_DIR_OPTION, str(EXTENSION_ROOT / "compiler_caches"), "Directory for compiler caches saved by 'Saved cache name'")
add_setting(
    LORA_BACKUPS_OPTION, next(iter(LORA_BACKUP_PLACES)),
    "Where LoRA keeps the original weights while it is fused into the compiled UNet", list(LORA_BACKUP_PLACES),
    "GPU memory: the first LoRA after a checkpoint load takes milliseconds instead of seconds, and uses as much GPU "
    "memory as the weights it changes (SDXL, a LoRA on every transformer layer: 4.1 GiB); "
    "'if it has room' keeps a quarter of the card free",
)
add_setting(
    QUANTIZATION_FORMAT_OPTION, "auto", "Format of 'Model Quantization(int8) Speed Up'", list(QUANTIZATION_FORMATS),
    "auto: SDXL in fp8 from compute capability 8.9 (RTX 40xx, L4, H100, H200: fp8 measured fastest on Hopper), in int8 "
    "on older cards and the CPU; SD1.x and SD2.x unquantized (8 bits measured no faster on SD1.5). Where the chosen "
    "format cannot run, the generation is compiled without quantization and says why",
)
add_setting(
    QUANTIZED_WEIGHTS_IN_HOST_MEMORY_OPTION, False,
    "Quantized UNet: keep the full-precision weights of its 8-bit layers in CPU memory", None,
    "Less GPU memory (SDXL fp8: the UNet in 2.8 GiB instead of 7.0, fp16 4.8) for 4.1 GiB of page-locked CPU memory; "
    "they go back to the GPU when webui runs the UNet without the script, or for a LoRA change (the layers it touches). "
    "Not with ControlNet",
)


def cache_dir() -> Path:
    return Path(getattr(shared.opts, CACHE_DIR_OPTION, "") or EXTENSION_ROOT / "compiler_caches")


def saved_cache_choices() -> list[str]:
    return [NO_CACHE, *(cache_artifacts.list_caches(cache_dir()) if not TORCH_PROBLEM else [])]


def report(p: StableDiffusionProcessing, message: str) -> None:
    """Console and the UI's info box; the infotext field carries the outcome."""
    print(f"OneDiff: {message}")
    p.comment(f"OneDiff: {message}")


def report_after(processed: Processed, message: str) -> None:
    """``report`` once processing is over: the UI's info box shows the Processed's comments, copied from ``p``'s."""
    print(f"OneDiff: {message}")
    processed.comments += f"OneDiff: {message}\n"


def unsupported_reason(unet: torch.nn.Module) -> str | None:
    kind = f"{type(unet).__module__}.{type(unet).__qualname__}"
    if TORCH_PROBLEM:
        return TORCH_PROBLEM
    if kind not in SUPPORTED_UNETS:
        return f"the loaded model's UNet is a {kind}, which OneDiff does not compile (SD1.x, SD2.x and SDXL only)"
    if shared.cmd_opts.lowvram or shared.cmd_opts.medvram or (shared.cmd_opts.medvram_sdxl and shared.sd_model.is_sdxl):
        return "--medvram/--lowvram move UNet blocks between CPU and GPU during a step; start webui without them"
    if shared.loaded_hypernetworks:
        return "hypernetworks patch the attention layers at run time; remove them from the prompt"
    if any(p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for p in unet.parameters()):
        return "'FP8 weight' (Settings > Optimizations) casts weights inside each layer's forward; turn it off"
    if next(unet.parameters()).device.type != shared.device.type:
        return f"the UNet is on {next(unet.parameters()).device}, not on webui's device {shared.device}"
    return None


def compile_options(quantization_format: str | None = None) -> CompileOptions:
    return CompileOptions(upcast_attention=bool(shared.opts.upcast_attn), quantization=quantization_format)


def quantization_format(p: StableDiffusionProcessing, sdxl: bool) -> tuple[str | None, str | None]:
    """The format the checked quantization box runs an SDXL-family (``sdxl``) or other UNet in (None: none), and, where
    it quantizes nothing, the note for the infotext (the generation is compiled unquantized)."""
    setting = getattr(shared.opts, QUANTIZATION_FORMAT_OPTION, "auto")
    format = quantization.auto_format(shared.device, sdxl) if setting == "auto" else setting
    if format is None:
        reason, advice = AUTO_KEEPS_UNQUANTIZED, "Choose int8 or fp8 in Settings > OneDiff to quantize it anyway"
    else:
        reason = quantization.unsupported_reason(format, shared.device)
        if reason is None:
            return format, None
        advice = "Choose another format in Settings > OneDiff, or uncheck 'Model Quantization(int8) Speed Up'"
    report(p, f"not quantized: {reason}; generated with the unquantized compiled UNet. {advice}")
    return None, f"not quantized: {reason}"


def generate(p: StableDiffusionProcessing, args: ScriptArgs) -> Processed:
    global ACTIVE_GENERATION
    unet = shared.sd_model.model.diffusion_model
    reason = unsupported_reason(unet)
    if reason:
        p.extra_generation_params[INFOTEXT_KEY] = "not used"
        report(p, f"generated without compiling: {reason}")
        return process_images(p)

    outcome = []
    if args.compiler_cache != NO_CACHE:
        try:
            if cache_artifacts.load(cache_dir(), args.compiler_cache, next(unet.parameters()).device, LOADED_CACHES):
                outcome.append(f"loaded cache {args.compiler_cache}")
        except cache_artifacts.CacheError as error:
            report(p, f"{error}; compiling without it")
            # API clients get the infotext but not the comments; error.reason names no local path.
            outcome.append(f"cache {args.compiler_cache} {error.reason}")
        except Exception as error:  # noqa: BLE001 -- a cache is an optimization: never lose the generation to it
            print_failure("loading the compiler cache")
            report(p, f"loading compiler cache {args.compiler_cache!r} failed ({error_summary(error)}); compiling without it")
            outcome.append(f"cache {args.compiler_cache} could not be loaded")

    generation = ACTIVE_GENERATION = Generation(p, args, outcome)
    try:
        processed = process_images(p)
    finally:
        ACTIVE_GENERATION = None
        generation.restore()
    for failure in generation.failures():
        report_after(processed, f"ran eagerly: {failure}")
    for failure in generation.control_model_failures():
        report_after(processed, f"the ControlNet model ran eagerly: {failure}")
    if args.saved_cache_name:
        try:
            # The model loaded now: the one loaded when the script started may have been dropped to the meta device.
            device = next(shared.sd_model.model.diffusion_model.parameters()).device
            path = cache_artifacts.save(cache_dir(), args.saved_cache_name, device)
            message = f"saved compiler cache {args.saved_cache_name!r} to {path}"
        except (cache_artifacts.CacheError, OSError) as error:
            message = f"could not save the compiler cache: {error}"
        except Exception as error:  # noqa: BLE001 -- the images are made: never lose them to the save
            print_failure("saving the compiler cache")
            message = f"could not save the compiler cache ({error_summary(error)}); the images are not affected"
        report_after(processed, message)
        add_to_infotexts(processed, f"{INFOTEXT_KEY} cache save", message)
    return processed


def add_to_infotexts(processed: Processed, key: str, value: str) -> None:
    """A field for images whose infotexts were written already: in the API's info (its extra_generation_params and
    infotexts) and in the UI's."""
    from modules.infotext_utils import quote

    processed.extra_generation_params[key] = value
    processed.infotexts = [f"{text}, {key}: {quote(value)}" for text in processed.infotexts]
    processed.info = processed.infotexts[0] if processed.infotexts else processed.info


def print_failure(what: str) -> None:
    """The console's trace of an error the user is told about in the infotext."""
    print(f"OneDiff: {what} failed; the generation goes on (trace below)", file=sys.stderr)
    traceback.print_exc()


ACTIVE_GENERATION: Generation | None = None
"""The scripted generation in progress (webui runs one at a time)."""


class Generation:
    """The compiled UNets of one scripted generation, put into the model that each denoising step samples with.

    Not into the model loaded when the script starts: process_images may load another checkpoint first (the selected
    one after a request that ended on the refiner, or one in ``override_settings``), and the refiner switch loads its
    checkpoint between two steps, into a new model object when its config differs. A wrapper put in before such a load
    stands in a dropped model while the loaded one runs eagerly."""

    def __init__(self, p: StableDiffusionProcessing, args: ScriptArgs, outcome: list[str]):
        self.p = p
        self.args = args
        self.outcome = outcome
        self.bound = []  # (model, its eager UNet, Lookup) in binding order
        self.refused = []  # eager UNets of models that cannot be compiled, with a note for the infotext
        self.errors = []  # why binding failed, for the infotext
        self.compile_counts = {}  # backend -> its number of compiles when this generation first used it
        self.control_models = []  # Lookup of each ControlNet model compiled in this generation
        # sd_model.is_sdxl -> (the UNet's 8-bit format, or the note why the checked box quantized nothing), decided
        # for the model each step samples with: process_images may load another checkpoint first.
        self.quantization_formats = {}

    def bind(self, sd_model) -> None:
        """Errors here must not escape: webui's callback runner would print them and go on eagerly, unexplained."""
        unet = sd_model.model.diffusion_model
        if isinstance(unet, (CompiledUNet, controlnet_glue.ControlNetUNet)) or any(unet is refused for refused, _ in self.refused):
            return
        try:
            self._bind(sd_model, unet)
        except Exception as error:  # noqa: BLE001 -- this model's steps run eagerly, with the reason
            print_failure("binding the compiled UNet")
            sd_model.model.diffusion_model = unet
            self.refused.append((unet, None))
            self.errors.append(f"preparing the compiled UNet failed ({error_summary(error)}); please report it with "
                               "the console's trace")
            self.update_infotext()

    def _bind(self, sd_model, unet) -> None:
        model = sd_model.model
        name = sd_model.sd_checkpoint_info.name_for_extra
        reason = unsupported_reason(unet)
        if reason:
            report(self.p, f"{name} generated without compiling: {reason}")
            self.refused.append((unet, f"not used for {name}"))
            self.update_infotext()
            return
        format = self.format_for(sd_model)
        lookup = self.look_up(controlnet_glue.compiled_target(unet), recompile=self.args.always_recompile and not self.bound,
                              quantization_format=format)
        print(f"OneDiff: {lookup.how} compiled UNet {type(unet).__module__}.{type(unet).__qualname__} for {name}")
        # ControlNet's own forward may compute with the UNet's layers outside the compiled graph.
        lookup.compiled.park_weights = bool(format and controlnet_glue.compiled_target(unet) is unet
                                            and getattr(shared.opts, QUANTIZED_WEIGHTS_IN_HOST_MEMORY_OPTION, False))
        lookup.compiled.before_call = lora_fusing(self.p, unet, lookup.compiled)
        # ControlNet models gain from compiling on CUDA only (CUDA graphs, fused kernels).
        control_models = self.compile_control_model if shared.device.type == "cuda" else None
        model.diffusion_model = controlnet_glue.bound_module(unet, lookup.compiled, control_models)
        self.bound.append((model, unet, lookup))
        self.update_infotext()

    def format_for(self, sd_model) -> str | None:
        """The 8-bit format of ``sd_model``'s UNet (not of ControlNet models) in this generation, None for none."""
        if not self.args.quantization:
            return None
        if sd_model.is_sdxl not in self.quantization_formats:
            self.quantization_formats[sd_model.is_sdxl] = quantization_format(self.p, sd_model.is_sdxl)
        return self.quantization_formats[sd_model.is_sdxl][0]

    def compile_control_model(self, control_model: torch.nn.Module) -> CompiledUNet:
        """A ControlNet model, compiled like a UNet (a structure of its own in the registry), counted in the infotext."""
        lookup = self.look_up(control_model)
        self.control_models.append(lookup)
        return lookup.compiled

    def look_up(self, module: torch.nn.Module, recompile: bool = False, quantization_format: str | None = None):
        """The registry's compiled wrapper for ``module``, its compiles counted in this generation's infotext."""
        lookup = COMPILED_UNETS.get(module, compile_options(quantization_format), recompile=recompile,
                                    on_compile_start=self.on_compile_start, on_compile_end=self.update_infotext)
        self.compile_counts.setdefault(lookup.compiled.backend, len(lookup.compiled.stats.compile_seconds))
        lookup.compiled.expected_class_forwards = SWAPPED_FORWARDS
        return lookup

    def lookups(self) -> list:
        return [*(lookup for _, _, lookup in self.bound), *self.control_models]

    def restore(self) -> None:
        for model, unet, _ in reversed(self.bound):
            model.diffusion_model = unet
        for lookup in self.lookups():
            lookup.compiled.end_generation()

    def failures(self) -> list[str]:
        """Why UNet calls ran eagerly."""
        compiled = [lookup.compiled.failure for _, _, lookup in self.bound if lookup.compiled.failure]
        return list(dict.fromkeys([*self.errors, *compiled]))

    def control_model_failures(self) -> list[str]:
        """Why ControlNet models ran eagerly; the UNet's pass may still have run compiled."""
        return list(dict.fromkeys(lookup.compiled.failure for lookup in self.control_models if lookup.compiled.failure))

    def describe(self) -> str:
        if self.failures():
            return f"eager, {self.failures()[0]}"
        if not self.bound:
            return ", ".join([*self.outcome, "not used"])
        new = [s for backend, count in self.compile_counts.items() for s in backend.stats.compile_seconds[count:]]
        fresh = any(lookup.how == "new" for lookup in self.lookups())
        done = f"compiled in {sum(new):.1f} s" if new else ("compiled" if fresh else "reused")
        control_models = [f"ControlNet model eager, {failure}" for failure in self.control_model_failures()]
        return ", ".join([*self.outcome, done, *self.quantized(), *control_models, *(note for _, note in self.refused if note)])

    def quantized(self) -> list[str]:
        """What ran in 8 bits, e.g. ``int8 140 layers`` per structure, and why a checked box quantized a model not."""
        notes = [note for _, note in self.quantization_formats.values() if note]
        compiled = [lookup.compiled for _, _, lookup in self.bound if lookup.compiled.backend.quantization is not None]
        return list(dict.fromkeys([*notes, *(
            f"{c.backend.quantization.format} {len(c.backend.quantization.layers)} layers"
            + (" (full precision in CPU memory)" if c.park_weights else "") for c in compiled)]))

    def update_infotext(self) -> None:
        # Webui renders extra_generation_params into each image's infotext after that image's sampling.
        self.p.extra_generation_params[INFOTEXT_KEY] = self.describe()

    @staticmethod
    def on_compile_start() -> None:
        shared.state.textinfo = "OneDiff: compiling the UNet for this size, the first image takes longer..."
        print("OneDiff: compiling the UNet (about a minute for SDXL on first use; later runs reuse it)")


def bind_compiled_unet(_params) -> None:
    """Called before the UNet calls of every denoising step, after webui's refiner switch."""
    if ACTIVE_GENERATION is not None:
        ACTIVE_GENERATION.bind(shared.sd_model)


LORA_FUNCTIONAL_REFUSED = (
    "the setting 'Lora: use old method that takes longer when you have multiple Loras active' applies LoRA inside "
    "each layer's forward, which the compiled graph does not run; turn it off in Settings > Compatibility"
)


def lora_fusing(p: StableDiffusionProcessing, unet: torch.nn.Module, compiled):
    """A ``before_call`` for the compiled UNet that keeps webui's active LoRA set fused into the UNet's weights, by
    the builtin Lora extension's own ``network_apply_weights`` (its ``networks`` module, when that extension is on)."""
    networks = sys.modules.get("networks")
    if networks is None or not hasattr(networks, "network_apply_weights"):
        return None
    # Webui names every module, containers too, but only calls network_apply_weights from the layers it patches:
    # on a container (a ResBlock, the UNet itself) it fails reading ``.weight``.
    layers = [module for module in unet.modules()
              if isinstance(module, tuple(PLAIN_FORWARDS)) and getattr(module, "network_layer_name", None)]

    # Webui computes with a weight on the GPU: one waiting in host memory (``park_weights``) comes back first, and
    # then its backup goes to host memory, where the weights are meant to wait.
    def fuse(layer):
        host_memory.unpark([layer])
        networks.network_apply_weights(layer)

    def back_up_weights(layers):
        host_memory.unpark(layers)
        back_up(layers, in_host_memory=compiled.park_weights)

    loras = FusedLoras(layers, fused=lambda layer: getattr(layer, "network_current_names", ()), fuse=fuse,
                       back_up=back_up_weights)

    def before_call():
        # The same tuple network_apply_weights compares against each layer's network_current_names.
        wanted = tuple((n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in networks.loaded_networks)
        if wanted and shared.opts.lora_functional:
            if compiled.failure is None:
                compiled.run_eagerly(LORA_FUNCTIONAL_REFUSED)
            return
        # Built only when the wanted set changed and layers are checked, not on every step.
        touched = functools.cache(lambda: {name for network in networks.loaded_networks for name in network.modules})
        try:
            with restoring_without_waiting(networks):
                seconds = loras.sync(wanted, touches=lambda layer: layer.network_layer_name in touched())
        except Exception as error:  # noqa: BLE001 -- eager calls go through webui's Lora, which fuses each layer itself
            print_failure("fusing the LoRA networks")
            compiled.run_eagerly(f"fusing the LoRA networks into the UNet failed ({error_summary(error)}); webui "
                                 "applied them itself, eagerly; please report it with the console's trace")
            return
        if seconds is not None:
            compiled.requantize()  # the 8-bit copies of the layers the networks changed
            p.extra_generation_params[f"{INFOTEXT_KEY} LoRA fuse"] = f"{seconds * 1e3:.0f} ms"
            done = f"fused {len(wanted)} LoRA network(s) into" if wanted else "removed the LoRA networks from"
            print(f"OneDiff: {done} the UNet in {seconds * 1e3:.0f} ms")

    return before_call


def back_up(layers, in_host_memory: bool = False) -> None:
    """The backups webui's ``network_apply_weights`` makes of a layer's original weight and bias before its first LoRA
    (``network_weights_backup``, ``network_bias_backup``), made here for all layers at once, in GPU memory or in
    page-locked host memory (the setting; host memory ``in_host_memory``, where the weights themselves wait); backups
    webui made of these layers in pageable memory (eager generations) move there too. Webui uses them unchanged.
    ``layers``: those the wanted networks touch (``FusedLoras.sync``)."""
    backups = []  # (layer, attribute, tensor to copy)
    device = layers[0].weight.device
    on_cuda = device.type == "cuda"
    for layer in layers:
        unfused = getattr(layer, "network_current_names", ()) == ()
        for attribute, tensor in (("network_weights_backup", layer.weight), ("network_bias_backup", layer.bias)):
            backup = getattr(layer, attribute, None)
            if backup is None and unfused and tensor is not None:
                backups.append((layer, attribute, tensor))
            elif isinstance(backup, torch.Tensor) and on_cuda and not (backup.is_cuda or backup.is_pinned()):
                backups.append((layer, attribute, backup))
    if not backups:
        return
    tensors = [tensor.detach() for *_, tensor in backups]
    on_gpu = on_cuda and not in_host_memory and LORA_BACKUP_PLACES.get(getattr(shared.opts, LORA_BACKUPS_OPTION, None))
    if on_gpu is None:
        needed = sum(t.numel() * t.element_size() for t in tensors)
        on_gpu = fits_on_gpu(needed, *torch.cuda.mem_get_info(device))
    for (layer, attribute, _), copy in zip(backups, backup_copies(tensors, device, on_device=on_gpu)):
        setattr(layer, attribute, copy)
        LAYERS_WITH_BACKUPS.add(layer)
    place = "GPU memory" if on_gpu else "page-locked CPU memory" if on_cuda else "CPU memory"
    print(f"OneDiff: backed up the original weights of {len(backups)} LoRA-patched tensors in {place}")


LAYERS_WITH_BACKUPS: weakref.WeakSet = weakref.WeakSet()
"""Layers holding backups ``back_up`` made, until webui drops their model (``release_dropped_backups``)."""


def release_dropped_backups(_sd_model=None) -> None:
    """Webui drops a model by moving it to the meta device, but reference cycles keep the object alive until Python's
    cycle collector runs, and with it the backups on its layers: plain attributes, which ``to("meta")`` does not move
    (GPU or page-locked memory, SDXL up to 4.1 GiB). Without this, every checkpoint switch after a LoRA would leave
    them behind until then. Called when webui has loaded a model, after it dropped the last one."""
    for layer in list(LAYERS_WITH_BACKUPS):
        if layer.weight.is_meta:
            layer.network_weights_backup = layer.network_bias_backup = None
            LAYERS_WITH_BACKUPS.discard(layer)
    if not TORCH_PROBLEM:  # the same for quantized layers' full-precision weights held in host memory
        host_memory.release_dropped()


def restoring_without_waiting(networks):
    """Webui restores each backup with a blocking copy; from page-locked memory the copies can queue on the stream
    (``FusedLoras.sync`` waits once at its end)."""
    blocking = networks.restore_weights_backup

    def restore(owner, field, backup):
        if backup is None or not backup.is_pinned():
            return blocking(owner, field, backup)
        getattr(owner, field).copy_(backup, non_blocking=True)

    return patched([(networks, "restore_weights_backup", restore)])


class Script(scripts.Script):
    def title(self):
        return SCRIPT_TITLE

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        from modules.ui_common import create_refresh_button

        quantization = gr.Checkbox(label="Model Quantization(int8) Speed Up", value=False)
        with gr.Row():
            compiler_cache = gr.Dropdown(label="Compiler caches", choices=saved_cache_choices(), value=NO_CACHE)
            create_refresh_button(
                compiler_cache, lambda: None, lambda: {"choices": saved_cache_choices()},
                f"onediff_refresh_caches_{'img2img' if is_img2img else 'txt2img'}",
            )
        saved_cache_name = gr.Textbox(label="Saved cache name", value="", placeholder="save what this run compiles under this name")
        always_recompile = gr.Checkbox(label="always_recompile", value=False, visible=bool(os.environ.get("ONEDIFF_DEBUG")))
        return [quantization, compiler_cache, saved_cache_name, always_recompile]

    def run(self, p, *values):
        try:
            args = parse_script_args(list(values))
        except ScriptArgsError as error:
            raise gr.Error(str(error)) from error
        return generate(p, args)


def on_app_started(_demo, app):
    wrap_generation_routes(app.router.routes)


script_callbacks.on_app_started(on_app_started, name="onediff API request forms")
script_callbacks.on_cfg_denoiser(bind_compiled_unet, name="onediff compiled UNet")
script_callbacks.on_model_loaded(release_dropped_backups, name="onediff LoRA backups of dropped models")
