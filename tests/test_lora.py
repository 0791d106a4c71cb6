"""LoRA fused into a compiled UNet's parameters, on a tiny real ldm UNet with LoRA files made here (kohya's naming
for ldm layers). In webui, ``fuse`` is the builtin Lora extension's ``network_apply_weights`` (tests/webui/ run that);
here ``bench.loras.KohyaApplier`` has the same contract: back up once, restore, add the wanted deltas."""
import torch
from sd_webui_onediff.bench import architectures as arch
from sd_webui_onediff.bench.loras import KohyaApplier, lora_delta, lora_key, make_lora
from sd_webui_onediff.compile import CompiledUNet
from sd_webui_onediff.compile.host_memory import host_copies
from sd_webui_onediff.lora import FusedLoras, fits_on_gpu


def reference(base_state: dict, wanted, loras) -> torch.nn.Module:
    """A separate eager UNet with the LoRA deltas added to the original weights."""
    unet = arch.sd_unet(arch.SD15_TINY)
    unet.load_state_dict(base_state)
    with torch.no_grad():
        for path, module in unet.named_modules():
            for name, multiplier in wanted:
                if f"{lora_key(path)}.alpha" in loras[name]:
                    module.weight += multiplier * lora_delta(loras[name], lora_key(path), module.weight)
    return unet


@torch.no_grad()
def test_switching_loras_changes_weights_in_place_without_recompiling():
    unet = arch.sd_unet(arch.SD15_TINY, seed=1)
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    # B touches only the self-attention layers: switching A -> B must restore the layers only A touched.
    only_attn1 = {key: value for key, value in make_lora(unet, rank=8, seed=11).items() if "attn1" in key}
    loras = {"A": make_lora(unet, rank=4, seed=10), "B": only_attn1}
    applier = KohyaApplier(unet, loras)
    fused = FusedLoras(applier.layers, fused=applier.fused, fuse=applier.fuse, back_up=applier.back_up)
    compiled = CompiledUNet(unet)
    compiled.before_call = lambda: fused.sync(applier.wanted, touches=applier.touches)
    args, kwargs = arch.sd_inputs(arch.SD15_TINY, tokens=7)
    base_out = compiled(*args, **kwargs)
    pointers = {name: p.data_ptr() for name, p in unet.named_parameters()}

    for wanted in [(("A", 1.0),), (("B", 1.0),), (("B", 0.5),), (("A", 0.8), ("B", 0.3)), ()]:
        applier.wanted = wanted
        out = compiled(*args, **kwargs)
        expected = reference(base_state, wanted, loras)(*args, **kwargs)
        assert ((out - expected).norm() / expected.norm()).item() < 1e-4, wanted
        if wanted:
            assert ((out - base_out).norm() / base_out.norm()).item() > 1e-2, f"{wanted} had no effect"

    assert compiled.stats.graphs_compiled == 1, "LoRA changes must not recompile"
    assert len(fused.seconds) == 5
    assert pointers == {name: p.data_ptr() for name, p in unet.named_parameters()}, "fused in place"
    for name, value in unet.state_dict().items():
        assert torch.equal(value, base_state[name]), f"{name} not restored bit-exactly"
    assert torch.equal(compiled(*args, **kwargs), base_out)


def test_sync_is_a_no_op_while_nothing_changes():
    layer = torch.nn.Linear(4, 4)
    calls = []
    fused = FusedLoras([layer], fused=lambda l: getattr(l, "fused_set", ()), fuse=lambda l: calls.append(l))
    assert fused.sync(()) is None and calls == []
    layer.fused_set = ("old",)  # e.g. a checkpoint reload reset some layers, or webui fused in an eager call
    assert fused.sync(("new",)) is not None and calls == [layer]
    assert fused.sync(("new",)) is None and calls == [layer]


def test_layers_no_wanted_network_touches_are_not_backed_up():
    touched, untouched = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    backed_up, fused_into = [], []
    fused = FusedLoras([touched, untouched], fused=lambda l: getattr(l, "fused_set", ()),
                       fuse=lambda l: (fused_into.append(l), setattr(l, "fused_set", ("A",))),
                       back_up=lambda layers: backed_up.extend(layers))
    fused.sync(("A",), touches=lambda layer: layer is touched)
    assert backed_up == [touched] and fused_into == [touched]
    fused.sync((), touches=lambda layer: False)
    assert fused_into == [touched, touched], "a layer holding a network is restored even when none touches it now"


def test_layers_webui_fused_but_no_network_touches_keep_their_backups_where_they_are():
    """Webui's eager LoRA marks and backs up every layer it patches; a compiled generation after it restores the
    untouched ones from those backups, without moving them (the soak's GPU memory grew by them)."""
    touched, untouched = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    for layer in (touched, untouched):
        layer.fused_set = ("eager A",)
    backed_up, fused_into = [], []
    fused = FusedLoras([touched, untouched], fused=lambda l: getattr(l, "fused_set", ()),
                       fuse=lambda l: (fused_into.append(l), setattr(l, "fused_set", ("B",))),
                       back_up=lambda layers: backed_up.extend(layers))
    fused.sync(("B",), touches=lambda layer: layer is touched)
    assert fused_into == [touched, untouched], "both held another set: both are restored and fused"
    assert backed_up == [touched]


def test_backups_go_to_the_gpu_only_with_room_to_spare():
    gib = 1 << 30
    assert fits_on_gpu(5 * gib, free_bytes=70 * gib, total_bytes=80 * gib)  # H100, SDXL
    assert fits_on_gpu(5 * gib, free_bytes=15 * gib, total_bytes=24 * gib)  # RTX 3090, SDXL: 10 GiB stay free
    assert not fits_on_gpu(5 * gib, free_bytes=9 * gib, total_bytes=12 * gib)
    assert not fits_on_gpu(5 * gib, free_bytes=40 * gib, total_bytes=160 * gib), "a quarter of the card stays free"


def test_host_copies_are_exact_copies_packed_into_few_buffers():
    tensors = [torch.randn(3, 5), torch.randn(7, dtype=torch.float64), torch.randn(2, 3, 3, 3).to(memory_format=torch.channels_last),
               torch.randn(100)]
    copies = host_copies(tensors, pin=torch.cuda.is_available(), buffer_bytes=256)
    assert all(torch.equal(copy, tensor) and copy.dtype == tensor.dtype for copy, tensor in zip(copies, tensors))
    buffers = [copy.untyped_storage().data_ptr() for copy in copies]
    assert buffers[0] == buffers[1] != buffers[2], "packed up to 256 bytes (64-byte aligned) per buffer"
    assert buffers[3] not in buffers[:3], "a tensor larger than a buffer gets its own"
    assert all(copy.untyped_storage().nbytes() <= 256 for copy in copies[:3])
    tensors[0].add_(1)
    assert not torch.equal(copies[0], tensors[0]), "copies, not views of the originals"


@torch.no_grad()
def test_a_bias_added_to_a_bias_less_layer_reaches_the_compiled_graph():
    """Webui's "full" networks with ``diff_b`` give a layer without bias a new bias Parameter; the compiled graph must
    use it (its guards recompile for it) and drop it again when the network goes."""
    unet = arch.sd_unet(arch.SD15_TINY, seed=1)
    compiled = CompiledUNet(unet)
    args, kwargs = arch.sd_inputs(arch.SD15_TINY, tokens=7)
    before = compiled(*args, **kwargs)
    to_q = next(m for name, m in unet.named_modules() if name.endswith("attn1.to_q"))
    assert to_q.bias is None
    to_q.bias = torch.nn.Parameter(torch.randn(to_q.out_features))
    with_bias = compiled(*args, **kwargs)
    expected = unet(*args, **kwargs)
    assert ((with_bias - expected).norm() / expected.norm()).item() < 1e-4
    assert ((with_bias - before).norm() / before.norm()).item() > 1e-3, "the added bias vanished from the graph"
    to_q.bias = None
    assert torch.allclose(compiled(*args, **kwargs), before, rtol=0, atol=1e-6)


@torch.no_grad()
def test_weights_loaded_in_place_under_an_unchanged_set_are_fused_again():
    """A refiner of the same architecture loaded in place between two steps: webui's Lora resets every layer's fused
    set in ``_load_from_state_dict`` (done here by a load pre-hook), the wanted set stays the same, and the LoRA must
    be fused into the new weights."""
    unet = arch.sd_unet(arch.SD15_TINY, seed=1)
    refiner_state = arch.sd_unet(arch.SD15_TINY, seed=2).state_dict()
    loras = {"A": make_lora(unet, rank=4, seed=10)}
    applier = KohyaApplier(unet, loras)

    def reset_on_load(layer):
        def reset(*_):
            layer.fused_set = ()
            layer.__dict__.pop("original_weight", None)
        return reset

    for layer in applier.layers:
        layer._register_load_state_dict_pre_hook(reset_on_load(layer))
    fused = FusedLoras(applier.layers, fused=applier.fused, fuse=applier.fuse, back_up=applier.back_up)
    args, kwargs = arch.sd_inputs(arch.SD15_TINY, tokens=7)
    applier.wanted = (("A", 1.0),)
    assert fused.sync(applier.wanted, touches=applier.touches) is not None
    assert fused.sync(applier.wanted, touches=applier.touches) is None, "nothing changed: no work"

    unet.load_state_dict(refiner_state)
    assert fused.sync(applier.wanted, touches=applier.touches) is not None, "the reload went unnoticed"
    expected = reference(refiner_state, applier.wanted, loras)(*args, **kwargs)
    out = unet(*args, **kwargs)
    assert ((out - expected).norm() / expected.norm()).item() < 1e-4
    without = reference(refiner_state, (), loras)(*args, **kwargs)
    assert ((out - without).norm() / without.norm()).item() > 1e-2, "the LoRA had no effect"
