"""Structure keys: one compiled graph serves every UNet with the same key.

The key covers what a compiled graph depends on and nothing it reads at run time: the module tree (each submodule's
path, class and the plain hyperparameters its class's constructor sets, such as ``heads`` or ``in_channels``; not
attributes other code leaves on a module later, as ControlNet's ``current_sampling_percent`` on the UNet or webui's Lora
bookkeeping on its layers, which the graph's guards check where it reads them) and every parameter's and buffer's name,
shape, dtype and device. Memory layout is left out on purpose: the engine itself turns convolution weights to
channels-last, and a layout change is caught by the graph's own guards. Weight *values* are not part of it: the graph
reads them from the parameter buffers on every call, so another checkpoint of the same architecture, copied into the
same buffers, reuses the graph. A full-precision weight waiting in host memory (``compile/host_memory.py``) counts
on the device it came from. Nor are the 8-bit copies of quantized layers (``compile/quantization.py``): the
format is part of the registry's key beside the structure (``CompileOptions.quantization``) and each entry chooses its
layers once, so a quantized and an unquantized generation of one model use two entries, and quantizing never changes
an entry's key.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import textwrap

import torch

from .host_memory import parked_from
from .quantization import BUFFERS as QUANTIZATION_BUFFERS

_PLAIN_TYPES = (bool, int, float, str, type(None))


def _plain_value(value):
    if isinstance(value, _PLAIN_TYPES):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(item, _PLAIN_TYPES) for item in value):
        return tuple(value)
    if isinstance(value, torch.dtype):
        return str(value)
    return None


@functools.cache
def constructor_attributes(cls: type) -> frozenset[str] | None:
    """Names the constructors of ``cls`` and its bases assign as ``self.<name> = ...``; None when a constructor's source
    cannot be read (then every plain attribute counts)."""
    names = set()
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if not inspect.isfunction(init):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
        except (OSError, TypeError, SyntaxError):
            return None
        arguments = tree.body[0].args.args
        if not arguments:
            continue
        this = arguments[0].arg
        names.update(
            node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name) and node.value.id == this
        )
    return frozenset(names)


def _module_lines(unet: torch.nn.Module):
    for path, module in unet.named_modules():
        kind = f"{type(module).__module__}.{type(module).__qualname__}"
        own = constructor_attributes(type(module))
        attributes = sorted(
            (name, _plain_value(value))
            for name, value in vars(module).items()
            if not name.startswith("_") and name != "training" and (own is None or name in own)
            and _plain_value(value) is not None
        )
        yield f"module {path} {kind} {attributes}"


def _tensor_lines(unet: torch.nn.Module):
    tensors = list(unet.named_parameters(remove_duplicate=False)) + list(unet.named_buffers(remove_duplicate=False))
    for name, tensor in tensors:
        owner, _, attribute = name.rpartition(".")
        if attribute in QUANTIZATION_BUFFERS:
            continue
        device = tensor.device
        if attribute == "weight" and device.type == "cpu":  # waiting in host memory: where it works counts
            device = parked_from(unet.get_submodule(owner)) or device
        yield f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} {device}"


def structure_key(unet: torch.nn.Module) -> str:
    """A short hex digest; equal for two UNets exactly when one compiled graph can run both."""
    digest = hashlib.sha256()
    for line in (*_module_lines(unet), *_tensor_lines(unet)):
        digest.update(line.encode())
        digest.update(b"\n")
    return f"{type(unet).__name__}-{digest.hexdigest()[:16]}"
