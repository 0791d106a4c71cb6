"""A test double of sd-webui-controlnet's ``UnetHook`` (its ``scripts/hook.py``), for tests without webui: the same
name, closure and file name as ControlNet's installed forward, and the same use of the UNet's blocks -- the prompt's
first token stripped, T2I-Adapter residuals added to input block outputs (resized to them), ControlNet residuals added
to the skip connections and the middle block's output, the upsampled half resized before each concatenation -- with
the controls given as tensors instead of computed by control models. ``rework_output`` stands for the preprocessors
that change the UNet's output after it."""
import types

import torch
import torch.nn.functional as F


def added(base, control):
    if isinstance(control, float):
        return base if control == 0.0 else base + control
    if control.shape[-2:] != base.shape[-2:]:
        control = F.interpolate(control, size=base.shape[-2:], mode="nearest")
    return base + control


class UnetHook:
    def __init__(self):
        self.control_params = []
        self.lowvram = False
        self.model = None

    def hook(self, model, t2i=None, controlnet=None, timestep_embedding=None, rework_output=False, control_params=()):
        """``t2i``: {input block index: tensor}; ``controlnet``: 13 tensors (12 skips, then the middle) or None;
        ``control_params``: units whose ``control_model(x=, hint=, timesteps=, context=)`` gives ``controlnet``."""
        outer = self
        self.model = model
        self.control_params = list(control_params)

        def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
            context = context[:, 1:]  # ControlNet's cond/uncond mark
            skip_controls = list(controlnet) if controlnet is not None else [0.0] * (len(self.input_blocks) + 1)
            for param in outer.control_params:
                control = param.control_model(x=x, hint=param.hint, timesteps=timesteps, context=context)
                skip_controls = [c * param.weight + total for c, total in zip(control, skip_controls)]
            emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, repeat_only=False))
            if y is not None:
                emb = emb + self.label_emb(y)
            h, hs = x, []
            for i, module in enumerate(self.input_blocks):
                self.current_h_shape = tuple(h.shape)
                h = added(module(h, emb, context), (t2i or {}).get(i, 0.0))
                hs.append(h)
            h = added(self.middle_block(h, emb, context), skip_controls.pop())
            for module in self.output_blocks:
                skip = added(hs.pop(), skip_controls.pop())
                if h.shape[-2:] != skip.shape[-2:]:
                    h = F.interpolate(h, skip.shape[-2:], mode="nearest")
                h = module(torch.cat([h, skip], dim=1), emb, context)
            h = self.out(h.type(x.dtype))
            return h * 0.5 if rework_output else h

        def forward_webui(*args, **kwargs):
            assert not outer.lowvram
            return forward(*args, **kwargs)

        model._original_forward = model.forward
        model.forward = types.MethodType(forward_webui, model)

    def restore(self):
        self.model.forward = self.model._original_forward
        del self.model._original_forward
