"""Other extensions' code on the UNet (``compile/foreign_hooks.py``), on the real tiny SD1.5 UNet, on the CPU: each
stand-in reproduces how an extension hooks, and changes the output, so that equality with eager means something.

Tolerance for compiled vs eager: as in ``test_engine.py``. Calls that must run eagerly are compared exactly.
"""
import functools
import random

import pytest
import torch
from sd_webui_onediff.bench import architectures as arch
from sd_webui_onediff.compile import CompiledUNet
from sd_webui_onediff.compile.attention import SdpaAttention
from sd_webui_onediff.compile.foreign_hooks import find_foreign_hooks
from sd_webui_onediff.compile.patching import patched

TOLERANCE = 1e-4
ATTN1 = "input_blocks.1.1.transformer_blocks.0.attn1"
ATTN2 = "input_blocks.1.1.transformer_blocks.0.attn2"


def relative_error(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def unet():
    return arch.sd_unet(arch.SD15_TINY, seed=11)


@pytest.fixture
def inputs():
    return arch.sd_inputs(arch.SD15_TINY, tokens=7)


@pytest.fixture
def traced_graphs(monkeypatch):
    """Inductor left out: each graph Dynamo hands over runs as traced (compiling takes a minute on the CPU)."""
    import sd_webui_onediff.compile.engine as engine

    graphs = []
    monkeypatch.setattr(engine, "compile_fx", lambda graph, inputs, **kw: graphs.append(graph) or graph.forward)
    return graphs


def ip_adapter_like(module):
    """An instance forward on ``attn2`` that adds attention to extra tokens, as IP-Adapter and Regional Prompter do."""
    original = module.forward

    def forward(x, context=None, **kwargs):
        return original(x, context=context, **kwargs) + original(x, context=-context, **kwargs)

    module.forward = forward
    return forward


def hypertile_like(module, rng: random.Random):
    """An instance forward on ``attn1`` that splits the tokens into a randomly chosen number of tiles, as webui's
    Hypertile does (``functools.wraps`` makes it look like the forward it wraps)."""
    original = module.forward

    @functools.wraps(original)
    def wrapper(x, *args, **kwargs):
        tiles = rng.choice([1, 2, 4])
        batch, tokens, channels = x.shape
        out = original(x.reshape(batch * tiles, tokens // tiles, channels), *args, **kwargs)
        return out.reshape(batch, tokens, channels)

    module.forward = wrapper
    return wrapper


def test_patched_restores_exactly_what_was_there():
    class Layer:
        def forward(self):
            return "class"

    layer, foreign = Layer(), lambda: "foreign"
    with patched([(layer, "forward", lambda: "ours"), (Layer, "forward", lambda self: "ours")]):
        assert layer.forward() == "ours"
    assert "forward" not in vars(layer) and layer.forward() == "class"
    layer.forward = foreign
    with pytest.raises(RuntimeError), patched([(layer, "forward", lambda: "ours")]):
        raise RuntimeError
    assert layer.forward is foreign


def test_attention_substitution_leaves_instance_forwards_of_other_extensions(unet):
    """It used to overwrite them, then pop them: webui's Hypertile wrappers were gone for good."""
    attn1 = unet.get_submodule(ATTN1)
    wrapper = hypertile_like(attn1, random.Random(0))
    attention = SdpaAttention(unet, upcast=False)
    with attention.installed():
        assert attn1.forward is not wrapper
    assert attn1.forward is wrapper
    assert "forward" not in vars(unet.get_submodule(ATTN2)), "ours must be gone from modules that had none"


def test_every_kind_of_hook_is_found_and_named(unet):
    assert find_foreign_hooks(list(unet.named_modules())) == []
    ip_adapter_like(unet.get_submodule(ATTN2))
    hypertile_like(unet.get_submodule(ATTN1), random.Random(0))
    unet.middle_block.register_forward_hook(lambda module, args, out: None)
    unet.output_blocks[0].register_forward_pre_hook(functools.partial(lambda tag, module, args: None, "tag"))
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        found = [str(hook) for hook in find_foreign_hooks(list(unet.named_modules()))]
    finally:
        handle.remove()
    assert found == [
        "a global forward hook (test_every_kind_of_hook_is_found_and_named.<locals>.<lambda> in "
        "tests/test_foreign_hooks.py)",
        f"an instance forward on {ATTN1} (hypertile_like.<locals>.wrapper in tests/test_foreign_hooks.py)",
        f"an instance forward on {ATTN2} (ip_adapter_like.<locals>.forward in tests/test_foreign_hooks.py)",
        "a forward hook on middle_block (test_every_kind_of_hook_is_found_and_named.<locals>.<lambda> in "
        "tests/test_foreign_hooks.py)",
        "a forward pre-hook on output_blocks.0 (test_every_kind_of_hook_is_found_and_named.<locals>.<lambda> in "
        "tests/test_foreign_hooks.py)",
    ]


@pytest.mark.parametrize("install", ["ip_adapter", "hypertile", "forward_hook"])
@torch.no_grad()
def test_a_hooked_unet_runs_eagerly_with_the_hook_named_and_kept(unet, inputs, install, traced_graphs):
    args, kwargs = inputs
    clean = unet(*args, **kwargs)
    rng = random.Random()
    if install == "ip_adapter":
        hook, where = ip_adapter_like(unet.get_submodule(ATTN2)), f"an instance forward on {ATTN2}"
    elif install == "hypertile":
        hook, where = hypertile_like(unet.get_submodule(ATTN1), rng), f"an instance forward on {ATTN1}"
    else:
        hook, where = lambda module, args, out: out * 1.5, "a forward hook on middle_block"
        unet.middle_block.register_forward_hook(hook)
    rng.seed(0)
    eager = [unet(*args, **kwargs) for _ in range(3)]
    compiled = CompiledUNet(unet)  # re-lays the convolutions, and lays them back when it runs eagerly
    rng.seed(0)
    for expected in eager:
        assert torch.equal(compiled(*args, **kwargs), expected)
    assert relative_error(eager[0], clean) > 0.01, "the hook must change the output, else equality proves nothing"
    assert compiled.failure.startswith(where), compiled.failure
    assert traced_graphs == [], "nothing is traced"
    kept = unet.get_submodule(ATTN2 if install == "ip_adapter" else ATTN1).forward if install != "forward_hook" else \
        next(iter(unet.middle_block._forward_hooks.values()))
    assert kept is hook


class SteppedTorch:
    """``torch`` as ldm's UNet module sees it (``th``), with ``cat`` scaled by a step counter: webui's FreeU patches
    ``th.cat`` so."""

    def __init__(self):
        self.step = 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def cat(self, tensors, *args, **kwargs):
        first, *rest = tensors
        return torch.cat([first * (1 + 0.2 * self.step), *rest], *args, **kwargs)


@torch.no_grad()
def test_a_value_that_changes_every_step_runs_eagerly_and_names_it(unet, inputs, traced_graphs, monkeypatch):
    """Within a generation, such a recompile is refused before Dynamo traces anything; the first call of a generation
    may compile again (a setting changed since the last one)."""
    from ldm.modules.diffusionmodules import openaimodel

    args, kwargs = inputs
    clean = unet(*args, **kwargs)
    stepped = SteppedTorch()
    monkeypatch.setattr(openaimodel, "th", stepped)
    compiled = CompiledUNet(unet)
    for generation in range(2):
        compiled.start_generation()
        for step in range(3):
            stepped.step = 2 * generation + step
            out = compiled(*args, **kwargs)
            assert relative_error(out, unet(*args, **kwargs)) < TOLERANCE
        assert len(traced_graphs) == generation + 1, "traced once per generation, for its first step"
        assert "reads changed between calls" in compiled.failure, compiled.failure
        assert f"(G['th'].step == {2 * generation}, read by cat in tests/test_foreign_hooks.py:" in compiled.failure
        assert "most compiled graphs" not in compiled.failure
    assert relative_error(out, clean) > 0.01


@pytest.mark.parametrize("failing", ["graph_break", "raise"])
@torch.no_grad()
def test_a_compile_failure_in_other_code_names_it(unet, inputs, failing, traced_graphs, monkeypatch):
    """Code another extension put in the UNet's path at class level is traced; where tracing fails in it, whatever the
    exception, the reason names it."""
    from ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential

    original = TimestepEmbedSequential.forward

    def patched_block_forward(self, x, *args, **kwargs):
        if failing == "graph_break":
            torch._dynamo.graph_break()
        elif torch.compiler.is_compiling():
            raise KeyError("tracing")
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(TimestepEmbedSequential, "forward", patched_block_forward)
    args, kwargs = inputs
    compiled = CompiledUNet(unet)
    assert torch.equal(compiled(*args, **kwargs), unet(*args, **kwargs))
    assert compiled.failure.startswith("compile failed in patched_block_forward in tests/test_foreign_hooks.py:"), \
        compiled.failure


@torch.no_grad()
def test_a_class_level_forward_the_engine_would_swap_out_runs_eagerly(unet, inputs, traced_graphs, monkeypatch):
    """The engine swaps the attention and layer forwards during compiled calls; another extension's class-level forward
    there would be skipped, unless it is one the swap stands for (webui's attention optimizations, its Lora)."""
    from ldm.modules.attention import CrossAttention

    original = CrossAttention.forward

    def scaled_attention(self, x, context=None, mask=None, **kwargs):
        return 2 * original(self, x, context, mask, **kwargs)

    monkeypatch.setattr(CrossAttention, "forward", scaled_attention)
    args, kwargs = inputs
    compiled = CompiledUNet(unet)
    assert torch.equal(compiled(*args, **kwargs), unet(*args, **kwargs))
    assert compiled.failure.startswith(
        "a class-level forward on ldm.modules.attention.CrossAttention (test_a_class_level_forward_the_engine_would_swap_"
        "out_runs_eagerly.<locals>.scaled_attention in tests/test_foreign_hooks.py)"
    ), compiled.failure

    compiled = CompiledUNet(unet)
    compiled.expected_class_forwards = frozenset({__name__})
    compiled(*args, **kwargs)
    assert compiled.failure is None and len(traced_graphs) == 1
