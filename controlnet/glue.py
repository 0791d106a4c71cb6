"""sd-webui-controlnet's ControlNet and T2I-Adapter units through the compiled residual pass.

ControlNet v1.1.455 installs its own forward on the UNet as an instance ``forward`` (``UnetHook.hook`` in its
``scripts/hook.py``), which the compiled UNet cannot trace: it reads the prompt's cond/uncond marks back to Python,
asks each unit whether it is within its start/end, and so on. So that forward runs here as installed, eagerly and
unchanged, but against a stand-in of the UNet (``StandIn``) whose blocks compute nothing: each returns zeros of its real
output's shape and records what it is given. What ControlNet's forward adds to a block's output then reaches the next
block (a T2I-Adapter's residual), the output blocks' concatenation (a ControlNet's, on the skip connection) or what
follows the middle block, where the stand-in reads it back exactly (``0 + r == r``). The recorded input, prompt
context, ``y`` and residuals then go through the compiled ``ResidualPass`` (``compile/residuals.py``): one graph for
every ControlNet request, whatever its units, weights, hints or start/end.

Read against hook.py of v1.1.455: its forward uses the UNet's blocks only by calling them in order, adding its
controls to their outputs (resized to the output's size, channel-padded for inpainting models, then ``base + control``)
and concatenating (resizing the upsampled half where sizes differ, as ``cat_resized`` does). Everything else it does
happens before the blocks (unmarking the prompt, weights, start/end, soft and cfg injection, region masks, replacing
the input of inpainting models, the T2I style adapter's and ReVision's changes to the context and ``y``) or inside what
it adds, and so runs unchanged. What cannot be recorded so runs eagerly, as installed, with the reason
(``unsupported_reason``): units that change attention (reference, IP-Adapter, LLLite, SparseCtrl; their hooks on the
attention modules make the generation eager anyway), preprocessors that rework the UNet's output (``colorfix``,
``inpaint_only``), the style-align batch option, ControlNet's low-VRAM mode, and any other ControlNet version.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Callable

import torch

from ..compile.engine import CompiledUNet
from ..compile import sharing
from ..compile.patching import patched
from ..compile.residuals import BlockShapes, Residuals, UnknownLayer, block_shapes, residual_pass

SUPPORTED_VERSION = "v1.1.455"
HOOKED_FORWARD = "UnetHook.hook.<locals>.forward_webui"
"""The qualified name of the function ControlNet's ``UnetHook.hook`` binds to the UNet as its ``forward``."""
COMPILED_CONTROL_MODEL_TYPES = frozenset({"ControlNet"})
"""Units whose control model (ControlNet's ``PlugableControlModel`` around its ``cldm.ControlNet``) is compiled too,
where a ``control_model_compiler`` is given: a ControlNet runs about half a UNet per step."""
RECORDED_UNIT_TYPES = frozenset({
    "ControlNet", "ControlLoRA", "ControlNetUnion", "InstantID", "T2I_Adapter", "T2I_StyleAdapter", "ReVision",
})
"""``ControlModelType`` names whose effect on the UNet is residuals, the input, the context or ``y``."""
OUTPUT_REWORKING_PREPROCESSORS = ("colorfix", "inpaint_only")
"""Preprocessor names ControlNet's forward tests to rework the UNet's output after it."""


@functools.cache
def controlnet_version(scripts_dir: str) -> str | None:
    """``version_flag`` of ControlNet's ``scripts/controlnet_version.py``, or None."""
    try:
        text = (Path(scripts_dir) / "controlnet_version.py").read_text(encoding="utf8")
    except OSError:
        return None
    found = re.search(r"""^version_flag\s*=\s*['"]([^'"]+)['"]""", text, re.MULTILINE)
    return found.group(1) if found else None


@dataclasses.dataclass
class ControlNetHook:
    """ControlNet's forward installed on one UNet."""

    forward: Callable
    """The installed function: ``forward(unet, x, timesteps, context=..., y=...)``."""
    unet_hook: object
    """Its ``UnetHook`` (``control_params``, ``lowvram``, ...), read, never changed."""
    version: str | None

    def unsupported_reason(self) -> str | None:
        if self.version != SUPPORTED_VERSION:
            return (f"sd-webui-controlnet {self.version or 'of an unknown version'} is on the UNet; only "
                    f"{SUPPORTED_VERSION} runs compiled, others eagerly")
        hook = self.unet_hook
        if getattr(hook, "lowvram", False):
            return "ControlNet's low VRAM mode moves its models during each step"
        if getattr(getattr(hook, "attention_auto_machine", None), "name", None) == "StyleAlign":
            return "ControlNet's style-align batch option changes the UNet's attention"
        for param in getattr(hook, "control_params", None) or ():
            kind = getattr(param.control_model_type, "name", str(param.control_model_type))
            if kind not in RECORDED_UNIT_TYPES:
                return f"a ControlNet {kind} unit changes the UNet's attention"
            name = (getattr(param, "preprocessor", None) or {}).get("name", "")
            if any(part in name for part in OUTPUT_REWORKING_PREPROCESSORS):
                return f"ControlNet's {name} preprocessor reworks the UNet's output"
        return None


def find_hook(unet: torch.nn.Module) -> ControlNetHook | None:
    """ControlNet's forward when it is the UNet's instance ``forward`` (of any version), else None."""
    function = getattr(vars(unet).get("forward"), "__func__", None)
    code = getattr(function, "__code__", None)
    if code is None or function.__qualname__ != HOOKED_FORWARD or Path(code.co_filename).name != "hook.py":
        return None
    cells = dict(zip(code.co_freevars, function.__closure__ or ()))
    if "outer" not in cells:
        return None
    return ControlNetHook(function, cells["outer"].cell_contents, controlnet_version(str(Path(code.co_filename).parent)))


class Unrecordable(Exception):
    """ControlNet's forward did something with the stand-in that is not adding to a block's output."""


class StandIn:
    """The UNet as ControlNet's forward sees it during a recording: the UNet's attributes, except that its blocks only
    record (``time_embed`` and ``label_emb`` return 0, ``out`` a sentinel). Attributes ControlNet's forward sets
    (``is_in_high_res_fix``, ``current_h_shape``) go to the UNet, as they do in eager webui."""

    def __init__(self, unet: torch.nn.Module, shapes: BlockShapes, zeros: dict, x: torch.Tensor):
        state = {
            "_unet": unet, "model_channels": unet.model_channels,
            "input_blocks": [functools.partial(self._input_block, index) for index in range(len(shapes.inputs))],
            "output_blocks": [functools.partial(self._output_block, index) for index in range(len(shapes.outputs))],
            "_shapes": shapes, "_zeros": zeros, "_zero": x.new_zeros(()), "_sentinel": x.new_empty(0),
            "x": None, "context": None, "y": None, "inputs": [None] * len(shapes.inputs),
            "skips": [None] * len(shapes.inputs), "middle": None,
        }
        vars(self).update(state)

    def __getattr__(self, name):
        return getattr(vars(self)["_unet"], name)

    def __setattr__(self, name, value):
        setattr(self._unet, name, value)

    def _set(self, name, value):
        vars(self)[name] = value

    def time_embed(self, _embedding):
        return self._zero

    def label_emb(self, y):
        self._set("y", y)
        return self._zero

    def _input_block(self, index, h, _emb, context):
        if index == 0:
            self._set("x", h)
            self._set("context", context)
        else:
            self.inputs[index - 1] = h
        return self._zeros["inputs"][index]

    def middle_block(self, h, _emb, _context):
        self.inputs[-1] = h
        return self._zeros["middle"]

    def _output_block(self, index, h, _emb, _context):
        skip = len(self.skips) - 1 - index
        channels = self._shapes.inputs[skip][1]
        if index == 0:
            self._set("middle", h[:, :h.shape[1] - channels])
        self.skips[skip] = h[:, h.shape[1] - channels:]
        return self._zeros["outputs"][index]

    def out(self, _h):
        return self._sentinel

    def residuals(self, dtype: torch.dtype) -> Residuals:
        """As tensors of one dtype and layout, so that every request gives the compiled pass the same signature."""
        if any(value is None for value in (self.x, self.middle, *self.inputs, *self.skips)):
            raise Unrecordable("ControlNet's forward did not call every block of the UNet")

        def normal(tensor):
            return tensor.to(dtype).contiguous()

        return Residuals(tuple(map(normal, self.inputs)), tuple(map(normal, self.skips)), normal(self.middle))


class ControlNetUNet(sharing.SharedModule):
    """Stands as the model's ``diffusion_model`` while ControlNet's forward is on the UNet: records what ControlNet's
    forward makes of each call (``StandIn``) and runs the compiled residual pass with it; runs the UNet as installed
    (ControlNet's forward, eagerly) when ``compiled`` has a reason to be eager. Shares the UNet's modules, parameters
    and buffers, and reads any other attribute from it (``sharing.SharedModule``)."""

    def __init__(self, unet: torch.nn.Module, hook: ControlNetHook, compiled: CompiledUNet,
                 control_model_compiler: Callable[[torch.nn.Module], CompiledUNet] | None = None):
        super().__init__(unet)
        object.__setattr__(self, "compiled", compiled)
        self.hook = hook
        self.control_model_compiler = control_model_compiler
        """Gives the compiled form of a ControlNet model (``cldm.ControlNet``), once per model and generation."""
        self._compiled_control_models = {}  # id(cldm.ControlNet) -> (it, its CompiledUNet)
        self._zeros_for = (None, None)  # (shapes, dtype, device) -> the stand-in's zero outputs, of the last signature

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        compiled = self.compiled
        if compiled.failure is None:
            reason = self.hook.unsupported_reason() or self._unet_hooks_reason(kwargs)
            if reason is None:
                try:
                    return compiled(*self.record(x, timesteps, context, y))
                except (Unrecordable, UnknownLayer) as error:
                    reason = f"ControlNet's forward could not be recorded ({type(error).__name__}: {error})"
            compiled.run_eagerly(reason)  # it updates the infotext
        return self.eager(x, timesteps, context=context, y=y, **kwargs)

    def _unet_hooks_reason(self, kwargs) -> str | None:
        if kwargs:
            return f"the UNet was called with {sorted(kwargs)}, which ControlNet's recorded pass does not take"
        if self.eager._forward_hooks or self.eager._forward_pre_hooks:
            return "a forward hook on the UNet itself, which runs only eagerly"
        return None

    def record(self, x, timesteps, context, y) -> tuple:
        """ControlNet's forward on the stand-in: the compiled pass's arguments."""
        shapes = block_shapes(self.eager, x.shape)
        key = (shapes, x.dtype, x.device)
        if self._zeros_for[0] != key:
            # The input blocks' zeros are the residuals of the slots nothing is added to, so real tensors; the others
            # only reach ControlNet's additions and concatenations, which copy them: views of one zero.
            zero = x.new_zeros(())
            self._zeros_for = (key, {"inputs": [x.new_zeros(s) for s in shapes.inputs], "middle": zero.expand(shapes.middle),
                                     "outputs": [zero.expand(s) for s in shapes.outputs]})
        stand_in = StandIn(self.eager, shapes, self._zeros_for[1], x)
        with patched(self._compiled_control_model_calls()):
            result = self.hook.forward(stand_in, x, timesteps, context=context, y=y)
        if result is not stand_in._sentinel:
            raise Unrecordable("ControlNet's forward changed the UNet's output after it")
        return stand_in.x, timesteps, stand_in.context.contiguous(), stand_in.y, stand_in.residuals(x.dtype)


    def _compiled_control_model_calls(self) -> list[tuple]:
        """For the duration of a recording, each compiled ControlNet unit's ``PlugableControlModel`` gets an instance
        ``forward`` calling the compiled ``cldm.ControlNet`` it wraps (``patched`` removes it again)."""
        if self.control_model_compiler is None:
            return []
        patches = []
        for param in getattr(self.hook.unet_hook, "control_params", None) or ():
            plugable = param.control_model
            model = getattr(plugable, "control_model", None)
            if (getattr(param.control_model_type, "name", None) not in COMPILED_CONTROL_MODEL_TYPES
                    or getattr(plugable, "is_control_lora", False) or not isinstance(model, torch.nn.Module)
                    or "forward" in vars(plugable)):
                continue
            if id(model) not in self._compiled_control_models:
                self._compiled_control_models[id(model)] = (model, self.control_model_compiler(model))
            compiled = self._compiled_control_models[id(model)][1]
            patches.append((plugable, "forward", compiled.__call__))  # a Module would become a submodule
        return patches


def compiled_target(unet: torch.nn.Module) -> torch.nn.Module:
    """What to compile for ``unet``: its residual pass while ControlNet's forward is on it, else the UNet."""
    return residual_pass(unet) if find_hook(unet) is not None else unet


def bound_module(unet: torch.nn.Module, compiled: CompiledUNet,
                 control_model_compiler: Callable[[torch.nn.Module], CompiledUNet] | None = None) -> torch.nn.Module:
    """What stands as the model's ``diffusion_model`` for ``compiled`` (made from ``compiled_target(unet)``)."""
    hook = find_hook(unet)
    return ControlNetUNet(unet, hook, compiled, control_model_compiler) if hook is not None else compiled
