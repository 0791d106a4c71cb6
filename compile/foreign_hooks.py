"""Other code on the UNet: what extensions installed on it or on its submodules, found before every compiled call.

The compiled graph must compute what eager webui computes. What is found here runs eagerly, with a reason naming it:

- instance ``forward`` attributes (webui's Hypertile on ``attn1``, IP-Adapter and Regional Prompter on ``attn2``,
  ControlNet on the UNet itself, Self-attention guidance on a middle-block ``attn1``);
- forward hooks and pre-hooks, on a module (``register_forward_hook``) or global
  (``torch.nn.modules.module.register_module_forward_hook``).

They are not traced because tracing them is not kept honest by Dynamo's guards: a choice made with a
``random.Random`` (Hypertile picks its tile counts so) is traced as a constant with no guard, and every later call
would repeat the first choice; a hook that keeps a tensor for later (an attention map for the next step) would keep
CUDA-graph memory that the next replay overwrites; and the engine's attention substitution would bypass a wrapper that
calls the module's earlier forward.

So does a class-level ``forward`` replacement on a class whose forward the engine itself swaps during compiled calls
(attention, and the layers in ``layers.PLAIN_FORWARDS``): the swap would skip it. Unless it is one the swap stands for
(webui's attention optimizations, its Lora's layer forwards), named by the caller.

Other class-level replacements and patched functions the UNet calls (a module-level ``cat``) are traced like the UNet's
own code: eager runs the same functions, and Dynamo guards what they read. ``foreign_frame`` names such code when
tracing it fails; a value they read that changes within a generation is caught by the engine
(``engine.value_recompile``).
"""
from __future__ import annotations

import dataclasses
import sys
import sysconfig
import traceback
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.modules.module as torch_module

_GLOBAL_HOOKS = (
    ("a global forward pre-hook", "_global_forward_pre_hooks"),
    ("a global forward hook", "_global_forward_hooks"),
)
_MODULE_HOOKS = (
    ("a forward pre-hook", "_forward_pre_hooks"),
    ("a forward hook", "_forward_hooks"),
)
_NOT_FOREIGN_DIRS = tuple(
    str(Path(path).resolve())
    for path in (
        Path(__file__).parent,  # the engine (its attention and layer substitutions)
        *{sysconfig.get_paths()[name] for name in ("stdlib", "purelib", "platlib")},  # Python, torch, einops, ...
    )
)
"""Code that is never another extension's hook; the UNet's own source tree is added per UNet."""


def function_code(function: Callable):
    """The code object that runs when ``function`` is called: through bound methods, ``functools.partial`` and
    callable objects. ``functools.wraps`` copies the wrapped function's name, not its code, so the code is the truth."""
    for _ in range(8):
        if hasattr(function, "__code__"):
            return function.__code__
        function = getattr(function, "__func__", None) or getattr(function, "func", None) or type(function).__call__
    return None  # a builtin


def short_path(filename: str) -> str:
    """From the folder after webui's ``extensions``/``extensions-builtin`` (which names the extension) when there is
    one, else the file and its folder."""
    parts = Path(filename).parts
    for index, part in enumerate(parts[:-1]):
        if part.startswith("extensions"):
            return "/".join(parts[index + 1:])
    return "/".join(parts[-2:])


def code_name(code) -> str:
    return f"{getattr(code, 'co_qualname', code.co_name)} in {short_path(code.co_filename)}"


@dataclasses.dataclass(frozen=True)
class ForeignHook:
    kind: str
    """``"an instance forward"``, ``"a forward hook"``, ..."""
    path: str
    """The module's name in the UNet (a class-level forward: the class's), ``""`` for the UNet itself or a global hook."""
    function: Callable

    def __str__(self) -> str:
        code = function_code(self.function)
        where = "" if self.kind.startswith("a global") else f" on {self.path or 'the UNet'}"
        return f"{self.kind}{where} ({code_name(code) if code else type(self.function).__qualname__})"


def find_foreign_hooks(named_modules: list[tuple[str, torch.nn.Module]]) -> list[ForeignHook]:
    """Everything listed in the module docstring, in module order, global hooks first; ``named_modules`` is the UNet's
    ``named_modules()``. Called while none of the engine's own substitutions is installed, before every compiled call:
    a first pass only tests (SDXL's 1,930 modules in well under a millisecond), the hooks are listed only when one is
    there."""
    if not any(getattr(torch_module, name) for _, name in _GLOBAL_HOOKS) and not any(
        ("forward" in module.__dict__ and not is_own_bound_forward(module, module.__dict__["forward"]))
        or module._forward_hooks or module._forward_pre_hooks for _, module in named_modules
    ):
        return []
    found = [ForeignHook(kind, "", hook) for kind, name in _GLOBAL_HOOKS for hook in getattr(torch_module, name).values()]
    for path, module in named_modules:
        forward = vars(module).get("forward")
        if forward is not None and not is_own_bound_forward(module, forward):
            found.append(ForeignHook("an instance forward", path, forward))
        for kind, name in _MODULE_HOOKS:
            found.extend(ForeignHook(kind, path, hook) for hook in getattr(module, name).values())
    return found


def is_own_bound_forward(module: torch.nn.Module, forward: Callable) -> bool:
    """An instance ``forward`` that is the module's own class forward bound to it: what ControlNet's ``restore`` leaves
    on the UNet (it sets back the bound method it saved), which runs exactly what the class runs."""
    return getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward


def is_own_forward(cls: type, forward: Callable) -> bool:
    """Whether ``forward`` is the one a class of ``cls``'s hierarchy defines in its own body."""
    return any(
        getattr(forward, "__module__", None) == klass.__module__
        and getattr(forward, "__qualname__", None) == f"{klass.__qualname__}.forward"
        for klass in cls.__mro__
    )


def find_class_forwards(classes: Iterable[type], expected_modules: frozenset[str]) -> list[ForeignHook]:
    """The class-level forwards of ``classes`` (those the engine swaps) that are neither the class's own nor defined in
    one of ``expected_modules``."""
    return [
        ForeignHook("a class-level forward", f"{cls.__module__}.{cls.__qualname__}", cls.forward)
        for cls in classes
        if not is_own_forward(cls, cls.forward) and getattr(cls.forward, "__module__", None) not in expected_modules
    ]


def foreign_hooks_reason(hooks: list[ForeignHook]) -> str:
    more = f" and {len(hooks) - 1} more" if len(hooks) > 1 else ""
    return (
        f"{hooks[0]}{more}: another extension's code on the UNet, which runs as installed only eagerly "
        "(turn that extension off for this generation to compile)"
    )


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__


def foreign_frame(error: BaseException, unet_class: type) -> str | None:
    """Where tracing failed, when that was in code outside the UNet's own (``"stepped_cat in freeu/unet.py:42"``), or
    None. The innermost frame of the first error along the chain of causes that has a stack (Dynamo's ``real_stack`` of
    the code it traced, then the traceback), libraries left out: the patch that failed, not a library it called. A
    failure of the compiler itself, after tracing, is in no traced code."""
    if isinstance(error, torch._dynamo.exc.BackendCompilerFailed):
        return None
    package = sys.modules[unet_class.__module__.split(".")[0]]  # webui's ldm and sgm are namespace packages
    unet_dirs = tuple(str(Path(path).resolve()) for path in package.__path__)
    for cause in _chain(error):
        frames = [*(getattr(cause, "real_stack", None) or ()), *traceback.extract_tb(cause.__traceback__)]
        frames = [(frame, str(Path(frame.filename).resolve())) for frame in frames if not frame.filename.startswith("<")]
        user = [(frame, filename) for frame, filename in frames if not filename.startswith(_NOT_FOREIGN_DIRS)]
        if user:
            frame, filename = user[-1]
            return None if filename.startswith(unet_dirs) else f"{frame.name} in {short_path(frame.filename)}:{frame.lineno}"
    return None
