"""Modules that take the place of an eager module without owning anything: the compiled UNet, its residual pass, the
ControlNet wrapper.

They share the eager module's registries instead of holding it as a child: ``parameters()``, ``state_dict()`` and
``load_state_dict()`` then see the same tensors under the same names, so webui loading a checkpoint into
``diffusion_model`` while a stand-in is there still fills the eager module's buffers, and code that walks the modules
(ControlNet, webui's Lora) finds the same ones.
"""
from __future__ import annotations

import torch


def share_registries(module: torch.nn.Module, eager: torch.nn.Module) -> None:
    module._parameters = eager._parameters
    module._buffers = eager._buffers
    module._modules = eager._modules
    module._non_persistent_buffers_set = eager._non_persistent_buffers_set


class SharedModule(torch.nn.Module):
    """Shares ``eager``'s registries, and reads any attribute it does not have itself from ``eager`` (webui reads
    ``dtype``, ``in_channels``, ``input_blocks``, ... from ``diffusion_model``)."""

    def __init__(self, eager: torch.nn.Module):
        super().__init__()
        share_registries(self, eager)
        object.__setattr__(self, "eager", eager)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "eager":
                raise
            return getattr(self.eager, name)
