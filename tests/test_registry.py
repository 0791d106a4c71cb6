"""Compiled graphs are shared by structure: a new model object of a known structure is served without recompiling,
and always with its own weights."""
import torch
from sd_webui_onediff.bench import architectures as arch
from sd_webui_onediff.compile import CompileOptions
from sd_webui_onediff.compile.registry import CompiledUNets

OPTIONS = CompileOptions()


def relative_error(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def test_reuse_rebind_recompile_and_capacity():
    registry = CompiledUNets(capacity=2)
    args, kwargs = arch.sd_inputs(arch.SD15_TINY, tokens=7)
    first = arch.sd_unet(arch.SD15_TINY, seed=1)
    lookup = registry.get(first, OPTIONS)
    assert lookup.how == "new"
    lookup.compiled(*args, **kwargs)
    stats = lookup.compiled.stats
    assert stats.graphs_compiled == 1

    assert registry.get(first, OPTIONS).how == "reused"

    # webui loaded another checkpoint of the same architecture as a new object (e.g. with several models cached)
    second = arch.sd_unet(arch.SD15_TINY, seed=2)
    lookup = registry.get(second, OPTIONS)
    assert lookup.how == "rebound" and lookup.compiled.eager is second
    out = lookup.compiled(*args, **kwargs)
    assert stats.graphs_compiled == 1, "a new object of a compiled structure must not recompile"
    assert relative_error(out, second(*args, **kwargs)) < 1e-4
    assert relative_error(out, first(*args, **kwargs)) > 0.1, "must run the new object's weights, not the old"

    # a forced recompile makes a new backend
    lookup = registry.get(second, OPTIONS, recompile=True)
    assert lookup.how == "new" and lookup.compiled.stats is not stats

    # other structures: past the capacity every compiled graph is dropped
    inpainting = arch.sd_unet(arch.SD15_TINY, in_channels=9)
    assert registry.get(inpainting, OPTIONS).how == "new" and len(registry) == 2
    assert registry.get(arch.sd_unet(arch.SD2_TINY), OPTIONS).how == "new" and len(registry) == 1
    assert registry.get(second, OPTIONS).how == "new"
