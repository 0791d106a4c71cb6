"""Compiled graphs are shared by structure: a new model object of a known structure is served without recompiling,
and always with its own weights."""
import gc
import weakref

import torch
from sd_webui_onediff.bench import architectures as arch
from sd_webui_onediff.compile import CompileOptions
from sd_webui_onediff.compile.registry import CompiledUNets
from torch.multiprocessing.reductions import StorageWeakRef

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

    assert_switches_keep_nothing_old(registry, stats)

    # a forced recompile makes a new backend
    lookup = registry.get(second, OPTIONS, recompile=True)
    assert lookup.how == "new" and lookup.compiled.stats is not stats

    # other structures: past the capacity every compiled graph is dropped
    inpainting = arch.sd_unet(arch.SD15_TINY, in_channels=9)
    assert registry.get(inpainting, OPTIONS).how == "new" and len(registry) == 2
    assert registry.get(arch.sd_unet(arch.SD2_TINY), OPTIONS).how == "new" and len(registry) == 1
    assert registry.get(second, OPTIONS).how == "new"


def assert_switches_keep_nothing_old(registry, stats):
    """Switches of the same architecture, alternately a new model object and the same one with its weights
    reallocated (webui moves a model to the CPU and back): no recompile, and nothing keeps an old model or old weights
    alive. On a GPU, CUDA-graph trees also record again for new weight addresses: ``bench/fault_bench.py switches``."""
    args, kwargs = arch.sd_inputs(arch.SD15_TINY, tokens=7)
    unet, old_models, old_weights = arch.sd_unet(arch.SD15_TINY, seed=3), [], []
    for seed in range(4, 10):
        old_weights += [StorageWeakRef(p.untyped_storage()) for p in unet.parameters()]
        if seed % 2 == 0:
            old_models.append(weakref.ref(unet))
            unet = arch.sd_unet(arch.SD15_TINY, seed=seed)
        else:
            unet.double().float()  # every parameter gets new storage, in place
        out = registry.get(unet, OPTIONS).compiled(*args, **kwargs)
        assert relative_error(out, unet(*args, **kwargs)) < 1e-4
        gc.collect()
        assert [ref for ref in old_models if ref() is not None] == [], "an old model object is still alive"
        assert not [ref for ref in old_weights if not ref.expired()], "old weights are still alive"
    assert stats.graphs_compiled == 1


@torch.no_grad()
def test_a_model_webui_unloaded_is_let_go():
    """Webui unloads a model by moving it to the meta device: the registry must not keep that module (and what other
    code left on its layers, e.g. LoRA backups in GPU memory) alive until the structure comes back, and the graphs
    must stay."""
    registry = CompiledUNets()
    args, kwargs = arch.sd_inputs(arch.SD15_TINY, tokens=7)
    sd15 = arch.sd_unet(arch.SD15_TINY, seed=1)
    lookup = registry.get(sd15, OPTIONS)
    lookup.compiled(*args, **kwargs)
    layer = next(m for m in sd15.modules() if isinstance(m, torch.nn.Linear))
    layer.network_weights_backup = layer.weight.clone()  # as webui's Lora leaves it: a plain attribute
    backup = StorageWeakRef(layer.network_weights_backup.untyped_storage())
    stats = lookup.compiled.stats
    del lookup, layer

    sd15.to("meta")  # webui's send_model_to_trash
    dropped = weakref.ref(sd15)
    del sd15
    registry.get(arch.sd_unet(arch.SD2_TINY), OPTIONS)  # the next generation, another architecture
    gc.collect()
    assert dropped() is None, "the registry keeps a model webui unloaded alive"
    assert backup.expired(), "what was left on the unloaded model's layers is still alive"

    again = arch.sd_unet(arch.SD15_TINY, seed=2)
    lookup = registry.get(again, OPTIONS)
    assert lookup.how == "rebound" and lookup.compiled.stats is stats
    lookup.compiled(*args, **kwargs)
    assert stats.graphs_compiled == 1, "the unloaded model's structure must keep its graphs"


@torch.no_grad()
def test_after_running_out_of_memory_every_graph_is_dropped_and_wrappers_compile_again():
    """A compiled call that ran out of GPU memory releases every graph (and with them the CUDA-graph pools) before
    its eager call; wrappers still in use in the generation (a ControlNet model's) compile again on their next call,
    rather than refusing it as a recompile for inputs they ran compiled before."""
    registry = CompiledUNets()
    args, kwargs = arch.sd_inputs(arch.SD15_TINY, tokens=7)
    unet, other = arch.sd_unet(arch.SD15_TINY, seed=1), arch.sd_unet(arch.SD15_TINY, in_channels=9, seed=2)
    in_use = registry.get(other, OPTIONS).compiled
    inputs = (torch.cat([args[0], args[0], args[0][:, :1]], dim=1), *args[1:])
    in_use(*inputs, **kwargs)
    compiled = registry.get(unet, OPTIONS).compiled
    assert compiled.on_out_of_memory == registry.release_memory
    compiled(*args, **kwargs)
    assert len(registry) == 2

    compiled.on_out_of_memory()
    assert len(registry) == 0
    out = in_use(*inputs, **kwargs)
    assert in_use.failure is None and in_use.stats.graphs_compiled == 2, "compiled again, not refused"
    assert relative_error(out, other(*inputs, **kwargs)) < 1e-4
    assert registry.get(unet, OPTIONS).how == "new"
