"""The compile engine on real UNet architectures at tiny sizes, on the CPU.

Tolerance: compiled vs eager relative L2 error ||compiled - eager|| / ||eager|| below 1e-4 in float32 (Inductor
reorders float additions and fuses kernels; observed ~1e-6). Each compile takes 30-60 s on 2 CPU cores, so every model
is compiled once per module and the tests share it.
"""
import threading

import pytest
import torch
import torch._dynamo
from sd_webui_onediff.bench import architectures as arch
from sd_webui_onediff.compile import CompiledUNet, CompileOptions
from sd_webui_onediff.compile.attention import SdpaAttention
from sd_webui_onediff.compile.engine import relay_convolutions

TOLERANCE = 1e-4


def relative_error(a, b) -> float:
    a, b = arch.output_tensor(a), arch.output_tensor(b)
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def sd15():
    unet = arch.sd_unet(arch.SD15_TINY, seed=1)
    return unet, CompiledUNet(unet)


@pytest.fixture(scope="module")
def sdxl():
    unet = arch.sdxl_unet(arch.SDXL_TINY, seed=3)
    return unet, CompiledUNet(unet)


INPUTS = {"sd15": lambda: arch.sd_inputs(arch.SD15_TINY, tokens=7), "sdxl": lambda: arch.sdxl_inputs(arch.SDXL_TINY, tokens=7)}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@torch.no_grad()
def test_compiled_equals_eager(family, request):
    unet, compiled = request.getfixturevalue(family)
    args, kwargs = INPUTS[family]()
    out = compiled(*args, **kwargs)
    assert compiled.failure is None
    assert compiled.stats.graphs_compiled == 1
    assert relative_error(out, unet(*args, **kwargs)) < TOLERANCE
    assert arch.output_tensor(out).std() > 0.01, "a degenerate output would make the comparison meaningless"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_no_graph_breaks(family):
    if family == "sd15":
        unet, (args, kwargs) = arch.sd_unet(arch.SD15_TINY), arch.sd_inputs(arch.SD15_TINY, tokens=7)
    else:
        unet, (args, kwargs) = arch.sdxl_unet(arch.SDXL_TINY), arch.sdxl_inputs(arch.SDXL_TINY, tokens=7)
    attention = SdpaAttention(unet, upcast=False)
    if family == "sd15" or arch.sgm_available():
        assert len(attention) > 0, "ldm/sgm attention modules must be found"
    with torch.no_grad(), attention.installed():
        explanation = torch._dynamo.explain(unet)(*args, **kwargs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_wrapper_shares_the_eager_parameters(sd15):
    unet, compiled = sd15
    eager = dict(unet.named_parameters())
    wrapped = dict(compiled.named_parameters())
    assert wrapped.keys() == eager.keys()
    assert all(wrapped[name].data_ptr() == eager[name].data_ptr() for name in eager)
    assert compiled.state_dict().keys() == unet.state_dict().keys()
    assert compiled.in_channels == unet.in_channels


@torch.no_grad()
def test_weights_copied_in_place_change_the_output_without_recompiling(sd15):
    unet, compiled = sd15
    args, kwargs = arch.sd_inputs(arch.SD15_TINY, tokens=7, seed=5)
    before = compiled(*args, **kwargs)
    graphs = compiled.stats.graphs_compiled
    other = arch.sd_unet(arch.SD15_TINY, seed=2)
    compiled.load_state_dict(other.state_dict())  # as webui loads a checkpoint into diffusion_model
    after = compiled(*args, **kwargs)
    assert compiled.stats.graphs_compiled == graphs
    assert relative_error(after, other(*args, **kwargs)) < TOLERANCE
    assert relative_error(after, before) > 0.1


@torch.no_grad()
def test_running_eagerly_says_why_once():
    """Here for a forward pre-hook, which the engine never traces (``compile/foreign_hooks.py``)."""
    unet = arch.sd_unet(arch.SD15_TINY, seed=4)
    unet.middle_block.register_forward_pre_hook(lambda module, args: None)
    ended = []
    compiled = CompiledUNet(unet, CompileOptions(), on_compile_end=lambda: ended.append(compiled.failure))
    args, kwargs = arch.sd_inputs(arch.SD15_TINY, tokens=7)
    for _ in range(2):
        assert torch.equal(compiled(*args, **kwargs), unet(*args, **kwargs))
    assert compiled.failure.startswith("a forward pre-hook on middle_block")
    assert ended == [compiled.failure]


def test_options_are_checked():
    with pytest.raises(ValueError, match="attention"):
        CompileOptions(attention="flash")


@torch.no_grad()
def test_class_level_layer_patches_are_not_traced(sd15):
    """webui's builtin Lora extension patches ``torch.nn.Linear.forward`` and friends with bookkeeping that cannot be
    captured; compiled calls use the layers' own definitions instead (``compile/layers.py``)."""
    unet, compiled = sd15
    args, kwargs = arch.sd_inputs(arch.SD15_TINY, tokens=7)
    compiled(*args, **kwargs)
    graphs = compiled.stats.graphs_compiled
    unpatched = torch.nn.Linear.forward

    def lora_like_forward(self, input):
        torch._dynamo.graph_break()
        return unpatched(self, input)

    torch.nn.Linear.forward = lora_like_forward
    compiled.expected_class_forwards = frozenset({__name__})  # the module of webui's Lora, as the adapter names it
    try:
        out = compiled(*args, **kwargs)
        assert torch.nn.Linear.forward is lora_like_forward, "the class patch must be back after the call"
    finally:
        torch.nn.Linear.forward = unpatched
    assert compiled.failure is None
    assert compiled.stats.graphs_compiled == graphs
    assert relative_error(out, unet(*args, **kwargs)) < TOLERANCE


@torch.no_grad()
def test_past_the_graph_limit_a_new_shape_runs_eagerly_and_says_why():
    """Dynamo's own behaviour past its recompile limit is to run eagerly without telling; ours reports it."""
    unet = arch.sd_unet(arch.SD15_TINY, seed=6)
    compiled = CompiledUNet(unet, CompileOptions(max_graphs_per_unet=1))
    for latent in (8, 24):
        args, kwargs = arch.sd_inputs(arch.SD15_TINY, tokens=7, latent=latent)
        assert relative_error(compiled(*args, **kwargs), unet(*args, **kwargs)) < TOLERANCE
    assert "most compiled graphs" in compiled.failure


@pytest.fixture
def traced_graphs(monkeypatch):
    """The graphs Dynamo hands to Inductor, which is left out: each graph then runs as traced."""
    import sd_webui_onediff.compile.engine as engine

    graphs = []
    monkeypatch.setattr(engine, "compile_fx", lambda graph, inputs, **kw: graphs.append(graph) or graph.forward)
    return graphs


def region_calls(graph) -> tuple[int, int]:
    """(calls of compiled regions, distinct regions called) in a traced graph."""
    calls = [node for node in graph.graph.nodes if node.target is torch.ops.higher_order.invoke_subgraph]
    return len(calls), len({node.args[1] for node in calls})


def skip_without_regions():
    from sd_webui_onediff.compile import regions

    if not regions.available():
        pytest.skip(f"torch {torch.__version__} has no nested_compile_region: the UNet compiles as one plain graph")


@torch.no_grad()
def test_repeated_blocks_are_compiled_once(traced_graphs):
    """``regional``: a block that recurs reaches Inductor once, as a subgraph the main graph calls wherever it recurs
    (newer torches inline a block used once); outside the compiled call the block classes are as they were."""
    from ldm.modules.diffusionmodules.openaimodel import ResBlock

    unet = arch.sd_unet(arch.SD15_TINY, seed=7)
    compiled = CompiledUNet(unet)
    forward = ResBlock.forward
    args, kwargs = arch.sd_inputs(arch.SD15_TINY, tokens=7)
    assert relative_error(compiled(*args, **kwargs), unet(*args, **kwargs)) < TOLERANCE
    assert ResBlock.forward is forward
    skip_without_regions()
    calls, distinct = region_calls(traced_graphs[0])
    assert 0 < distinct < calls, "blocks of the same shape share one compiled region"


FULL_SIZE = {
    "sd15": (lambda: arch.sd_unet_structure(arch.SD15_FULL), lambda: arch.sd_inputs(arch.SD15_FULL, latent=64)),
    "sdxl": (lambda: arch.sdxl_unet_structure(arch.SDXL_FULL), lambda: arch.sdxl_inputs(arch.SDXL_FULL, latent=128)),
}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@torch.no_grad()
def test_full_size_unets_trace_every_block_as_a_region(family, traced_graphs):
    """At full size a block class recurs with many input shapes (SD1.5's ResBlock with 14): each must become its own
    region, where torch >= 2.13 stops at 8 per region unless told otherwise. Traced on the meta device (shapes only),
    so Inductor, which the tiny tests run, is left out here: it is the full-size trace that differs."""
    skip_without_regions()
    build, inputs = FULL_SIZE[family]
    with torch.device("meta"):
        compiled = CompiledUNet(build())
    args, kwargs = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), inputs())
    out = compiled(*args, **kwargs)
    assert compiled.failure is None
    assert arch.output_tensor(out).shape == args[0].shape
    calls, distinct = region_calls(traced_graphs[0])
    assert 0 < distinct < calls


@torch.no_grad()
def test_compile_failures_and_runtime_errors_are_told_apart(monkeypatch):
    """An error while compiling reads "compile failed"; one raised by a graph that compiled (CUDA out of memory in its
    first replay or its CUDA-graph recording) reads "runtime error". Either way that call and the rest of the
    generation run eagerly, and the next generation tries the compiled graph again."""
    import sd_webui_onediff.compile.engine as engine

    def failing_compile(graph, inputs, **kw):
        raise RuntimeError("injected Inductor failure")

    def first_run_fails(graph, inputs, **kw):
        runs = []

        def run(*args):
            runs.append(1)
            if len(runs) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            return graph.forward(*args)
        return run

    unet = arch.sd_unet(arch.SD15_TINY, seed=8)
    args, kwargs = arch.sd_inputs(arch.SD15_TINY, tokens=7)
    expected = unet(*args, **kwargs)
    for backend, kind in ((failing_compile, "compile failed: RuntimeError: injected Inductor failure"),
                          (first_run_fails, "runtime error in the compiled UNet (OutOfMemoryError: CUDA out of memory")):
        torch._dynamo.reset()
        monkeypatch.setattr(engine, "compile_fx", backend)
        ended, released = [], []
        compiled = CompiledUNet(unet, CompileOptions(), on_compile_end=lambda: ended.append(compiled.failure))
        compiled.on_out_of_memory = lambda: released.append(compiled.failure)
        for _ in range(2):
            assert torch.equal(compiled(*args, **kwargs), expected)
        assert compiled.failure.startswith(kind), compiled.failure
        assert ended == [compiled.failure], "reported once, when it happened"
        out_of_memory = backend is first_run_fails
        assert released == ([compiled.failure] if out_of_memory else []), "memory is released once, after an OOM only"
    assert "out of GPU memory" in compiled.failure and "compile failed" not in compiled.failure
    compiled.start_generation()
    assert relative_error(compiled(*args, **kwargs), expected) < TOLERANCE
    assert compiled.failure is None and compiled.stats.graphs_compiled == 1, "the next generation runs compiled"


@torch.no_grad()
def test_convolutions_are_relaid_through_host_memory_when_the_gpu_has_no_room(monkeypatch):
    unet = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Conv2d(8, 8, 3))
    weights = [(m.weight.data_ptr(), m.weight.clone()) for m in unet]
    contiguous = torch.Tensor.contiguous
    refused = []

    def refuse_once(tensor, memory_format=torch.contiguous_format):
        if not refused:
            refused.append(tensor.data_ptr())
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return contiguous(tensor, memory_format=memory_format)

    monkeypatch.setattr(torch.Tensor, "contiguous", refuse_once)
    relay_convolutions(unet, torch.channels_last)
    assert refused == [weights[0][0]], "the first layer's copy was refused"
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in unet)
    assert all(m.weight.data_ptr() == pointer and torch.equal(m.weight, value) for m, (pointer, value) in zip(unet, weights))


@torch.no_grad()
def test_channels_last_is_undone_after_the_generation(traced_graphs):
    """Convolution weights are re-laid for compiled calls within their own storage, and laid back for eager webui after
    the generation; the next generation re-lays them without compiling again."""
    unet = arch.sd_unet(arch.SD15_TINY, seed=9)
    convolutions = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    before = [(m.weight.data_ptr(), m.weight.clone()) for m in convolutions]
    args, kwargs = arch.sd_inputs(arch.SD15_TINY, tokens=7)
    expected = unet(*args, **kwargs)
    compiled = CompiledUNet(unet)
    for generation in range(2):
        compiled.start_generation()
        assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convolutions)
        assert not all(m.weight.is_contiguous() for m in convolutions), "3x3 kernels change layout"
        assert relative_error(compiled(*args, **kwargs), expected) < TOLERANCE
        compiled.restore_eager_layout()
        assert all(m.weight.is_contiguous() for m in convolutions), "eager webui's layout is back"
        assert all(m.weight.data_ptr() == pointer and torch.equal(m.weight, value)
                   for m, (pointer, value) in zip(convolutions, before)), "same storage, same values"
        assert torch.equal(unet(*args, **kwargs), expected), "eager calls compute exactly as before the script"
    assert compiled.stats.graphs_compiled == 1 and compiled.failure is None


def test_a_reason_quotes_one_short_line_of_the_error():
    """CUDA's out-of-memory message is a single line of allocator statistics: the infotext gets its start."""
    from sd_webui_onediff.compile.engine import error_summary

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 60.00 MiB. " + "GPU 0 has statistics. " * 40)
    assert error_summary(oom).startswith("OutOfMemoryError: CUDA out of memory. Tried to allocate 60.00 MiB.")
    assert len(error_summary(oom)) < 250 and error_summary(oom).endswith(" ...")
    assert error_summary(RuntimeError("one\ntwo")) == "RuntimeError: one" and error_summary(KeyError()) == "KeyError"


def test_every_thread_records_cuda_graphs_in_one_set_of_trees():
    """Webui answers each request in a worker thread of a pool, and Inductor keeps CUDA-graph trees (recordings and
    their memory pool) per thread: the compiled UNet's calls use the trees of the thread that imported the engine."""
    import sd_webui_onediff.compile.engine as engine
    from torch._inductor import cudagraph_trees as trees

    def trees_of_a_new_thread(shared: bool):
        seen = []

        def worker():
            if shared:
                engine.one_set_of_cudagraph_trees()
            seen.append(trees.get_obj(trees.local, "tree_manager_containers"))

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        return seen[0]

    imported_in = trees.get_obj(trees.local, "tree_manager_containers")
    assert trees_of_a_new_thread(shared=False) is not imported_in, "torch shares them across threads: nothing to do"
    assert trees_of_a_new_thread(shared=True) is imported_in
