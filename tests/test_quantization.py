"""The quantization core (``compile/quantization.py``) and quantized compiled UNets, on real architectures at tiny sizes,
on the CPU (int8; fp8 needs a GPU of compute capability 8.9).

Tolerance, relative L2 error of the UNet's output: quantized compiled vs eager float32 below 0.05 (each int8 layer's
own output moves by about 1 %; observed 0.8 % over the tiny SD1.5) and above 1e-3 (the unquantized compiled UNet is
within 1e-4 of eager: ``tests/test_engine.py``). The same 8-bit layers run eagerly are no sharper a reference: rounding
to 8 bits is discontinuous, and inputs moved by 1e-6 move the 8-bit UNet's output by 4e-3 (the fp32 one's by 1e-6).
"""
import pytest
import torch
from sd_webui_onediff.bench import architectures as arch
from sd_webui_onediff.compile import CompiledUNet, CompileOptions, structure_key
from sd_webui_onediff.compile import host_memory as hm
from sd_webui_onediff.compile import quantization as q
from sd_webui_onediff.compile.attention import SdpaAttention
from sd_webui_onediff.compile.layers import plain_layers
from sd_webui_onediff.compile.registry import CompiledUNets

INT8 = CompileOptions(quantization="int8")
NOT_CANDIDATES = ("time_embed", "label_emb", "emb_layers")  # one row per image: too few for an 8-bit GEMM to pay


def relative_error(a, b) -> float:
    return q.relative_error(arch.output_tensor(a), arch.output_tensor(b))


UNETS = {
    "sd15": lambda seed: (arch.sd_unet(arch.SD15_TINY, seed=seed), arch.sd_inputs(arch.SD15_TINY)),
    "sdxl": lambda seed: (arch.sdxl_unet(arch.SDXL_TINY, seed=seed), arch.sdxl_inputs(arch.SDXL_TINY)),
}


@pytest.mark.parametrize("family", list(UNETS))
def test_candidates_are_the_transformer_blocks_linears(family):
    unet, _ = UNETS[family](1)
    candidates = q.candidate_layers(unet)
    assert candidates, "the tiny architectures have transformer blocks"
    assert all(type(layer) is torch.nn.Linear for layer in candidates.values())
    assert not [name for name in candidates if any(part in name for part in NOT_CANDIDATES)]
    assert any(name.endswith("attn1.to_q") for name in candidates) and any(".ff." in name for name in candidates)


def three_layers_alone(unet) -> tuple[str, ...]:
    """A self-attention's q and k (no pack without v) and a feed-forward layer."""
    candidates = tuple(q.candidate_layers(unet))
    return (*candidates[:2], next(name for name in candidates if ".ff." in name))


@torch.no_grad()
def test_apply_writes_stale_copies_in_place_and_dequantize_drops_them():
    unet, _ = UNETS["sd15"](1)
    key = structure_key(unet)
    names = three_layers_alone(unet)
    plan = q.Quantization("int8", names)
    assert q.apply(unet, plan) == 3 and not any(q.PACKED in module.__dict__ for module in unet.modules())
    layer = unet.get_submodule(names[0])
    held, scale = layer._buffers[q.QUANTIZED_WEIGHT], layer._buffers[q.WEIGHT_SCALE]
    assert held.dtype == torch.int8 and held.shape == layer.weight.shape
    assert torch.allclose(held.float() * scale[:, None], layer.weight, atol=scale.max().item())
    assert structure_key(unet) == key, "8-bit copies must not change the structure key"
    assert q.apply(unet, plan) == 0, "nothing changed: nothing is written"

    layer.weight.mul_(2)  # a LoRA fused, a checkpoint loaded in place: the weight changes in its own memory
    before = held.clone()
    assert q.apply(unet, plan) == 1
    assert layer._buffers[q.QUANTIZED_WEIGHT] is held and layer._buffers[q.WEIGHT_SCALE] is scale
    assert held.data_ptr() == layer._buffers[q.QUANTIZED_WEIGHT].data_ptr()
    assert torch.equal(held, before) and torch.allclose(scale, 2 * q.quantize_weight(layer.weight / 2, "int8")[1])

    layer.weight.add_(torch.randn_like(layer.weight))
    assert q.apply(unet, plan) == 1 and not torch.equal(held, before), "new values, same buffer"

    assert q.apply(unet, q.Quantization("int8", names[1:])) == 0 and not q.is_quantized(layer)
    assert q.dequantize(unet) == 2
    assert not any(q.is_quantized(module) for module in unet.modules())
    assert structure_key(unet) == key


@torch.no_grad()
def test_static_fp8_input_scales_are_rewritten_when_they_change():
    """``Quantization.input_amax`` (fp8 with static input scales, ``bench/quant_bench.py --fp8-static``): a copy written
    for another input maximum, or for per-row scales, counts as stale like one of a changed weight."""
    unet, _ = UNETS["sd15"](1)
    key = structure_key(unet)
    names = three_layers_alone(unet)
    assert q.apply(unet, q.Quantization("fp8", names, (1.0, 2.0, 3.0))) == 3
    scale = unet.get_submodule(names[2])._buffers[q.INPUT_SCALE]
    assert q.apply(unet, q.Quantization("fp8", names, (1.0, 2.0, 3.0))) == 0
    assert q.apply(unet, q.Quantization("fp8", names, (1.0, 2.0, 4.0))) == 1
    assert unet.get_submodule(names[2])._buffers[q.INPUT_SCALE] is scale, "rewritten in place"
    assert structure_key(unet) == key
    assert q.apply(unet, q.Quantization("fp8", names)) == 3
    assert not any(q.INPUT_SCALE in unet.get_submodule(name)._buffers for name in names)


@torch.no_grad()
def test_projections_reading_one_input_are_packed_into_one_gemm(monkeypatch):
    """In the attention modules whose forward the engine owns (``sdpa_forward``), a self-attention's q, k and v, and a
    cross-attention's k and v, quantized together: one 8-bit tensor on the attention module, the members' buffers
    views into it, one GEMM for them in ``projections``. In int8 (scales per input row and per output channel, as
    alone) the pack computes what the layers alone compute; a member's changed weight rewrites the pack in place; a
    plan without one member unpacks the others."""
    unet, _ = UNETS["sd15"](1)
    key = structure_key(unet)
    candidates = tuple(q.candidate_layers(unet))
    owned = SdpaAttention(unet, upcast=False).modules
    assert q.apply(unet, q.Quantization("int8", candidates)) == len(candidates)
    assert not any(q.PACKED in module.__dict__ for module in unet.modules()), "only where the engine owns attention"
    packed_layers = q.apply(unet, q.Quantization("int8", candidates), owned)
    packs = {name: module.__dict__[q.PACKED] for name, module in unet.named_modules() if q.PACKED in module.__dict__}
    assert packed_layers == sum(map(len, packs.values())) < len(candidates), "packing writes its members alone"
    assert len(packs) == 2 * sum(1 for name in candidates if name.endswith("attn1.to_q"))
    for name, members in packs.items():  # a cross-attention's q reads x, its k and v the text, of another width in SD
        one_width = unet.get_submodule(name).to_q.in_features == unet.get_submodule(name).to_k.in_features
        assert members == ("to_q", "to_k", "to_v") if name.endswith("attn1") or one_width else ("to_k", "to_v")
    assert {packs[name] for name in packs if name.endswith("attn2")} == {("to_k", "to_v"), ("to_q", "to_k", "to_v")}
    assert structure_key(unet) == key, "packs must not change the structure key"

    attention_name = next(name for name in packs if name.endswith("attn1"))
    attention = unet.get_submodule(attention_name)
    members = [attention.to_q, attention.to_k, attention.to_v]
    pack = attention._buffers[q.PACKED_BUFFERS[0]]
    views = [layer._buffers[q.QUANTIZED_WEIGHT] for layer in members]
    assert [view.data_ptr() for view in views] == [pack.data_ptr() + i * views[0].numel() for i in range(3)]
    calls = []
    gemm = q.quantized_matmul
    monkeypatch.setattr(q, "quantized_matmul", lambda *a, **k: calls.append(a[1].shape) or gemm(*a, **k))
    x = torch.randn(2, 64, attention.to_q.in_features)
    packed = q.projections(attention, x)
    assert calls == [pack.shape], "one GEMM for q, k and v"
    alone = [q.quantized_linear(layer, x) for layer in members]
    exact = [torch.nn.functional.linear(x, layer.weight) for layer in members]
    assert all(torch.allclose(p, a, rtol=1e-5, atol=1e-6) for p, a in zip(packed, alone))
    assert all(1e-4 < relative_error(p, e) < 0.05 for p, e in zip(packed, exact)), "8 bits, not the fp32 weights"
    for cross in (unet.get_submodule(name) for name in packs if name.endswith("attn2")):
        calls.clear()
        query = torch.randn(2, 64, cross.to_q.in_features)
        context = torch.randn(2, 77, cross.to_k.in_features)
        with plain_layers():  # as in a compiled call: a Linear alone runs its 8-bit copy
            crossed = q.projections(cross, query, context)
        assert len(calls) == 2, "q alone, k and v in one GEMM"
        inputs = (query, context, context)
        alone = [q.quantized_linear(layer, t) for layer, t in zip((cross.to_q, cross.to_k, cross.to_v), inputs)]
        assert all(torch.allclose(p, a, rtol=1e-5, atol=1e-6) for p, a in zip(crossed, alone))
    monkeypatch.undo()

    members[1].weight.mul_(2)  # a LoRA on k alone: the whole pack is written, in place
    assert q.apply(unet, q.Quantization("int8", candidates), owned) == 3
    assert attention._buffers[q.PACKED_BUFFERS[0]].data_ptr() == pack.data_ptr()
    assert torch.allclose(q.projections(attention, x)[1], 2 * packed[1], rtol=1e-5, atol=1e-5)

    without_v = tuple(name for name in candidates if name != f"{attention_name}.to_v")
    assert q.apply(unet, q.Quantization("int8", without_v), owned) == 2, "q and k written alone"
    assert q.PACKED not in attention.__dict__ and not q.is_quantized(members[2])
    assert all(q.is_quantized(layer) and layer._buffers[q.QUANTIZED_WEIGHT]._base is None for layer in members[:2])
    assert q.dequantize(unet) == len(candidates) - 1
    assert not any(q.PACKED in module.__dict__ or module._buffers.keys() & q.BUFFERS for module in unet.modules())
    assert structure_key(unet) == key


@torch.no_grad()
def test_an_fp8_pack_shares_the_members_largest_scales():
    """fp8 takes one scale per tensor: a pack's weight scale is its largest member's, its input scale is from the
    largest input maximum of its members (the same input: equal in a real call), and every member reads the pack's."""
    unet, _ = UNETS["sd15"](1)
    candidates = tuple(q.candidate_layers(unet))
    attention_name = candidates[0].rpartition(".")[0]
    maxima = tuple(3.0 if name == f"{attention_name}.to_v" else 1.0 for name in candidates)
    q.apply(unet, q.Quantization("fp8", candidates, maxima), SdpaAttention(unet, upcast=False).modules)
    attention = unet.get_submodule(attention_name)
    members = [attention.to_q, attention.to_k, attention.to_v]
    weight_scale, input_scale = (attention._buffers[name] for name in q.PACKED_BUFFERS[1:])
    assert input_scale.item() == pytest.approx(3.0 * q.INPUT_MARGIN / 448.0)
    assert weight_scale.item() == pytest.approx(max(q.quantize_weight(layer.weight, "fp8", True)[1].item()
                                                    for layer in members))
    assert all(layer._buffers[q.WEIGHT_SCALE] is weight_scale and layer._buffers[q.INPUT_SCALE] is input_scale
               for layer in members)
    x = torch.randn(2, 64, attention.to_q.in_features)
    for packed, layer in zip(q.projections(attention, x), members):
        assert torch.allclose(packed, q.quantized_linear(layer, x), rtol=1e-5, atol=1e-6)
        assert 1e-4 < relative_error(packed, torch.nn.functional.linear(x, layer.weight)) < 0.1


@torch.no_grad()
def test_measured_errors_choose_the_layers():
    unet, (args, kwargs) = UNETS["sd15"](1)
    candidates = q.candidate_layers(unet)
    errors = q.measure_errors(candidates, "int8", lambda: unet(*args, **kwargs))
    assert errors.keys() == candidates.keys()
    assert all(0 < error < 0.1 for error in errors.values()), errors
    assert not any(q.is_quantized(layer) for layer in candidates.values()), "measuring quantizes nothing"
    threshold = sorted(errors.values())[len(errors) // 2]
    chosen = q.choose_layers(errors, threshold)
    assert chosen and len(chosen) < len(errors) and all(errors[name] <= threshold for name in chosen)
    plan = q.plan(unet, "int8", lambda: unet(*args, **kwargs))
    assert plan.format == "int8" and set(plan.layers) == set(q.choose_layers(errors, q.DEFAULT_THRESHOLDS["int8"]))
    assert plan.layers, "random tiny weights quantize well"


def test_formats(monkeypatch):
    assert q.auto_format(torch.device("cpu"), sdxl=True) == "int8"
    assert q.auto_format(torch.device("cpu"), sdxl=False) is None
    for capability, format in [((8, 0), "int8"), ((8, 6), "int8"), ((8, 9), "fp8"), ((9, 0), "fp8"), ((12, 0), "fp8")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, capability=capability: capability)
        assert q.auto_format(torch.device("cuda", 0), sdxl=True) == format, capability
        assert q.auto_format(torch.device("cuda", 0), sdxl=False) is None, "SD1.5: measured no faster"
    assert q.unsupported_reason("int8", torch.device("cpu")) is None
    assert "compute capability 8.9" in q.unsupported_reason("fp8", torch.device("cpu"))
    with pytest.raises(ValueError, match="quantization"):
        CompileOptions(quantization="int4")


@pytest.fixture(scope="module")
def quantized_sd15():
    """A registry with one tiny SD1.5 compiled in int8 (its first call chose the layers)."""
    registry = CompiledUNets()
    unet, (args, kwargs) = UNETS["sd15"](1)
    lookup = registry.get(unet, INT8)
    with torch.no_grad():
        out = lookup.compiled(*args, **kwargs)
    return registry, unet, lookup.compiled, out


@torch.no_grad()
def test_quantized_compiled_unet_is_close_to_eager_and_not_equal(quantized_sd15):
    _, unet, compiled, out = quantized_sd15
    args, kwargs = UNETS["sd15"](1)[1]
    plan = compiled.backend.quantization
    assert compiled.failure is None and compiled.stats.graphs_compiled == 1
    assert plan.layers and all(q.is_quantized(unet.get_submodule(name)) for name in plan.layers)
    packs = q.projection_packs(unet, plan.layers, SdpaAttention(unet, upcast=False).modules)
    assert packs and {name for name, module in unet.named_modules() if q.PACKED in module.__dict__} == set(packs)
    eager = unet(*args, **kwargs)  # webui's own forwards: the fp16 (here fp32) weights, never the 8-bit copies
    assert 1e-3 < relative_error(out, eager) < 0.05


@torch.no_grad()
def test_the_graph_reads_no_full_precision_weight_of_a_quantized_layer(quantized_sd15):
    """Such a weight may move (to host memory, to save GPU memory) without a recompile: the graph neither takes it nor
    guards it. The weight of a layer kept in full precision is guarded: changing its layout makes the next call compile
    again, which the engine refuses after a generation's first call (it runs eagerly)."""
    registry, unet, _, out = quantized_sd15
    args, kwargs = UNETS["sd15"](1)[1]
    lookup = registry.get(unet, INT8)
    compiled, plan = lookup.compiled, lookup.compiled.backend.quantization
    # The first block's (the graphs of the blocks after it, compiled once for all, take their tensors as inputs), and
    # not the witness layer (plan.layers[0]), whose change would requantize.
    quantized = unet.get_submodule(plan.layers[1])
    kept = next(module for module in unet.modules() if isinstance(module, torch.nn.Linear) and not q.is_quantized(module))

    def relaid(weight):  # the same values in another memory layout: a tensor Dynamo's guards tell apart
        return weight.t().contiguous().t()

    graphs = compiled.stats.graphs_compiled
    original = quantized.weight.data
    quantized.weight.data = relaid(original)
    try:
        assert torch.equal(compiled(*args, **kwargs), out)
        assert compiled.failure is None and compiled.stats.graphs_compiled == graphs
    finally:
        quantized.weight.data = original
    original = kept.weight.data
    kept.weight.data = relaid(original)
    try:
        compiled(*args, **kwargs)
        assert compiled.failure is not None and compiled.stats.graphs_compiled == graphs
    finally:
        kept.weight.data = original


@torch.no_grad()
def test_full_precision_weights_wait_in_host_memory_until_an_eager_use(quantized_sd15):
    """``park_weights`` (compile/host_memory.py): compiled calls park the quantized layers' weights, with the same
    output and no recompile; the next generation finds the same entry and moves nothing; webui's eager call after a
    generation, or an eager fallback in one, brings them back."""
    registry, unet, _, out = quantized_sd15
    args, kwargs = UNETS["sd15"](1)[1]
    reference = unet(*args, **kwargs)
    lookup = registry.get(unet, INT8)
    compiled, graphs = lookup.compiled, lookup.compiled.stats.graphs_compiled
    layers = [unet.get_submodule(name) for name in compiled.backend.quantization.layers]
    compiled.park_weights = True
    try:
        assert torch.equal(compiled(*args, **kwargs), out)
        assert all(hm.is_parked(layer) for layer in layers) and compiled.stats.graphs_compiled == graphs
        host = [layer.weight.data_ptr() for layer in layers]
        compiled.end_generation()

        again = registry.get(unet, INT8)
        assert again.how == "reused" and not unet._forward_pre_hooks
        assert torch.equal(again.compiled(*args, **kwargs), out)
        assert [layer.weight.data_ptr() for layer in layers] == host, "nothing moved"
        compiled.end_generation()
        assert torch.equal(unet(*args, **kwargs), reference) and not hm.parked_layers(unet)

        registry.get(unet, INT8).compiled(*args, **kwargs)
        assert all(hm.is_parked(layer) for layer in layers)
        compiled.run_eagerly("a reason")
        assert not hm.parked_layers(unet) and torch.equal(compiled(*args, **kwargs), reference)
        assert compiled.stats.graphs_compiled == graphs
        # Brought back, each weight has memory of its own, also where host and device are one (here): views into one
        # host buffer would be inputs that alias, which a later unquantized graph refuses to trace.
        assert len({layer.weight.untyped_storage().data_ptr() for layer in layers}) == len(layers)
    finally:
        compiled.park_weights = False
        hm.unpark(hm.parked_layers(unet))
        hm.unguard(unet)


@torch.no_grad()
def test_without_room_in_host_memory_the_weights_stay_on_the_device(quantized_sd15, monkeypatch):
    """Page-locked host memory can run out (WSL caps it): the generation goes on compiled, its weights where they were,
    and the infotext no longer claims them in CPU memory (``park_weights`` off)."""
    registry, unet, _, out = quantized_sd15
    args, kwargs = UNETS["sd15"](1)[1]
    compiled = registry.get(unet, INT8).compiled

    def no_room(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")

    monkeypatch.setattr(hm, "host_copies", no_room)
    compiled.park_weights = True
    try:
        assert torch.equal(compiled(*args, **kwargs), out)
        assert compiled.failure is None and not compiled.park_weights and not hm.parked_layers(unet)
    finally:
        compiled.park_weights = False


@torch.no_grad()
def test_quantized_entries_reuse_the_plan_and_keep_weights_in_step(quantized_sd15):
    registry, unet, compiled, out = quantized_sd15
    args, kwargs = UNETS["sd15"](1)[1]
    stats, plan = compiled.stats, compiled.backend.quantization
    again = registry.get(unet, INT8)
    assert again.how == "reused" and again.compiled.backend.quantization is plan
    assert torch.equal(again.compiled(*args, **kwargs), out)

    # a LoRA-like change of one quantized layer, in place: rewritten on request, no recompile
    layer = unet.get_submodule(plan.layers[-1])
    address = layer._buffers[q.QUANTIZED_WEIGHT].data_ptr()
    original = layer.weight.clone()
    layer.weight.mul_(1.5)
    assert again.compiled.requantize() == 1
    assert layer._buffers[q.QUANTIZED_WEIGHT].data_ptr() == address
    changed = again.compiled(*args, **kwargs)
    assert relative_error(changed, out) > 1e-3
    layer.weight.copy_(original)
    again.compiled.requantize()
    assert torch.equal(again.compiled(*args, **kwargs), out), "restored weights give the same output back"

    # another checkpoint loaded in place between two calls: the witness layer shows it
    other, _ = UNETS["sd15"](2)
    unet.load_state_dict(other.state_dict())
    loaded = again.compiled(*args, **kwargs)
    assert 1e-3 < relative_error(loaded, other(*args, **kwargs)) < 0.05

    # another model object of the same structure: the plan applied to it, the graph reused
    rebound = registry.get(other, INT8)
    assert rebound.how == "rebound" and all(q.is_quantized(other.get_submodule(name)) for name in plan.layers)
    assert torch.allclose(rebound.compiled(*args, **kwargs), loaded, rtol=1e-4, atol=1e-5)
    assert stats.graphs_compiled == 1, "quantized generations of one structure compile once"

    # unquantized: another entry, and the module loses its 8-bit copies
    plain = registry.get(other, CompileOptions())
    assert plain.how == "new" and not any(q.is_quantized(module) for module in other.modules())
    unet.load_state_dict(UNETS["sd15"](1)[0].state_dict())


@torch.no_grad()
def test_fp8_input_scales_are_measured_again_on_changed_weights_without_a_recompile():
    """fp8 runs on static input scales from an eager call: the plan's, and after the 8-bit copies were rewritten for
    changed weights (another checkpoint, a LoRA), the next call's. The CPU's ``_scaled_mm`` runs the fp8 path (the
    script offers fp8 on GPUs of compute capability 8.9 only)."""
    unet, (args, kwargs) = UNETS["sd15"](1)
    compiled = CompiledUNets().get(unet, CompileOptions(quantization="fp8")).compiled
    out = compiled(*args, **kwargs)
    plan = compiled.backend.quantization
    assert compiled.failure is None and plan.format == "fp8" and plan.layers
    layers = {name: unet.get_submodule(name) for name in plan.layers}
    assert plan.input_amax == tuple(q.input_maxima(layers, lambda: unet(*args, **kwargs)).values())
    assert 1e-3 < relative_error(out, unet(*args, **kwargs)) < 0.1

    unet.load_state_dict(UNETS["sd15"](2)[0].state_dict())  # another checkpoint, in place
    maxima = tuple(q.input_maxima(layers, lambda: unet(*args, **kwargs)).values())
    assert maxima != plan.input_amax
    loaded = compiled(*args, **kwargs)
    assert compiled.backend.quantization.input_amax == maxima, "measured again on the new weights"
    largest = {}  # per input scale: the members of a pack share theirs, from the largest of their maxima
    for layer, value in zip(layers.values(), maxima):
        scale = layer._buffers[q.INPUT_SCALE]
        largest[scale] = max(largest.get(scale, 0.0), value)
    assert len(largest) < len(layers), "packs share input scales"
    assert all(scale.item() == pytest.approx(value * q.INPUT_MARGIN / 448.0) for scale, value in largest.items())
    assert 1e-3 < relative_error(loaded, unet(*args, **kwargs)) < 0.1
    assert compiled.stats.graphs_compiled == 1 and compiled.failure is None
    compiled(*args, **kwargs)
    assert compiled.backend.quantization.input_amax == maxima and not compiled._input_scales_stale


@torch.no_grad()
def test_quantized_sdxl_is_close_to_eager_and_not_equal():
    unet, (args, kwargs) = UNETS["sdxl"](3)
    lookup = CompiledUNets().get(unet, INT8)
    out = lookup.compiled(*args, **kwargs)
    plan = lookup.compiled.backend.quantization
    assert lookup.compiled.failure is None and plan.layers
    assert 1e-3 < relative_error(out, unet(*args, **kwargs)) < 0.05


@torch.no_grad()
def test_blocks_quantized_differently_do_not_share_a_trace(monkeypatch):
    """Regional compilation traces a block class once and reuses that trace where its guards hold: a transformer block
    with quantized layers and one without must each run their own. Inductor is left out (the traced graph runs as it
    is), so the compiled call and the same layers run eagerly compute the same operations and agree exactly (observed
    0.0), where a shared trace (every block quantized, or none) would miss by the whole quantization error (6e-3)."""
    import sd_webui_onediff.compile.engine as engine

    monkeypatch.setattr(engine, "compile_fx", lambda graph, inputs, **kw: graph.forward)
    unet, (args, kwargs) = UNETS["sd15"](1)
    candidates = tuple(q.candidate_layers(unet))
    first_block = candidates[0].rpartition(".transformer_blocks.")[0] + "."
    compiled = CompiledUNet(unet, INT8)
    compiled.backend.quantization = q.Quantization("int8", tuple(n for n in candidates if n.startswith(first_block)))
    compiled.requantize()
    out = compiled(*args, **kwargs)
    assert compiled.failure is None and 0 < len(compiled.backend.quantization.layers) < len(candidates)
    with plain_layers(), SdpaAttention(unet, upcast=False).installed():
        assert relative_error(out, unet(*args, **kwargs)) < 1e-5


@torch.no_grad()
def test_controlnets_residual_pass_quantizes_the_unets_layers():
    """With ControlNet the compiled module is the UNet's residual pass (``compile/residuals.py``), which shares its
    modules under the same names: its plan names the UNet's layers. Its 7-token prompt gives cross-attention's key and
    value projections 14 rows, too few for ``torch._int_mm``: they stay unquantized."""
    from sd_webui_onediff.compile.residuals import block_shapes, residual_pass, zero_residuals

    unet = arch.sd_unet(arch.SD15_TINY, seed=1)
    (x, t), kwargs = arch.sd_inputs(arch.SD15_TINY, tokens=7)
    residuals = zero_residuals(block_shapes(unet, x.shape), x.dtype, x.device)
    lookup = CompiledUNets().get(residual_pass(unet), INT8)
    out = lookup.compiled(x, t, kwargs["context"], None, residuals)
    layers = lookup.compiled.backend.quantization.layers
    assert lookup.compiled.failure is None and layers
    assert all(q.is_quantized(unet.get_submodule(name)) for name in layers)
    assert not [name for name in layers if name.endswith(("attn2.to_k", "attn2.to_v"))]
    assert 1e-3 < relative_error(out, unet(x, t, **kwargs)) < 0.05


@torch.no_grad()
def test_a_compiler_cache_saves_and_loads_the_quantized_graphs(tmp_path, monkeypatch):
    """What ``Saved cache name`` writes holds the quantized graphs: after ``torch._dynamo.reset()`` and with an empty
    Inductor cache dir, loading it makes the next compile of the same quantized UNet hit the cache for every graph."""
    from torch._dynamo.utils import counters

    from sd_webui_onediff.compile import cache_artifacts

    cpu = torch.device("cpu")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "first"))
    torch._dynamo.reset()
    unet, (args, kwargs) = UNETS["sd15"](3)
    first = CompiledUNets().get(unet, INT8).compiled
    out = first(*args, **kwargs)
    assert first.failure is None and first.backend.quantization.layers
    cache_artifacts.save(tmp_path / "saved", "quantized", cpu)

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "second"))
    torch._dynamo.reset()
    counters.clear()
    q.dequantize(unet)
    assert cache_artifacts.load(tmp_path / "saved", "quantized", cpu)
    second = CompiledUNets().get(unet, INT8).compiled
    again = second(*args, **kwargs)
    assert second.failure is None and second.stats.graphs_compiled == 1
    assert counters["inductor"]["fxgraph_cache_hit"] > 0 and counters["inductor"]["fxgraph_cache_miss"] == 0, dict(
        counters["inductor"])
    assert torch.equal(again, out), "the same plan and weights from the cache must give the same output"
