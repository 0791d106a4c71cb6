"""Full-precision weights of quantized layers waiting in host memory (``compile/host_memory.py``), on a tiny real SD1.5
UNet on the CPU. There host and device memory are one, so these tests check what parking does to the layers, their
8-bit copies, the structure key and the eager UNet; what it saves in GPU memory is measured on a GPU
(``bench/quant_bench.py``)."""
import pytest
import torch
from sd_webui_onediff.bench import architectures as arch
from sd_webui_onediff.compile import host_memory as hm
from sd_webui_onediff.compile import quantization as q
from sd_webui_onediff.compile import structure_key


@pytest.fixture
def quantized():
    """A tiny SD1.5 UNet with its transformer blocks' Linears quantized in int8, its inputs, and its eager output."""
    unet = arch.sd_unet(arch.SD15_TINY, seed=1)
    args, kwargs = arch.sd_inputs(arch.SD15_TINY)
    plan = q.Quantization("int8", tuple(q.candidate_layers(unet)))
    q.apply(unet, plan)
    with torch.no_grad():
        expected = unet(*args, **kwargs)
    return unet, [unet.get_submodule(name) for name in plan.layers], (args, kwargs), expected


def test_parked_weights_keep_their_values_and_8bit_copies_and_come_back(quantized):
    unet, layers, _, _ = quantized
    key, values = structure_key(unet), [layer.weight.detach().clone() for layer in layers]
    weight_before = [layer.weight.data_ptr() for layer in layers]
    assert hm.park(layers) == sum(v.numel() * v.element_size() for v in values)
    assert all(hm.is_parked(layer) and not q.is_stale(layer) for layer in layers), "8-bit copies stay current"
    assert [layer.weight.data_ptr() for layer in layers] != weight_before, "the weights live in other memory"
    assert all(torch.equal(layer.weight, value) for layer, value in zip(layers, values))
    assert structure_key(unet) == key and hm.park(layers) == 0, "parking twice moves nothing"
    host = [layer.weight.data_ptr() for layer in layers]

    hm.unpark(layers)
    assert not hm.parked_layers(unet) and not any(q.is_stale(layer) for layer in layers)
    assert all(torch.equal(layer.weight, value) for layer, value in zip(layers, values))
    with torch.no_grad():
        layers[0].weight.mul_(2)  # a LoRA fused while the weights were back
    hm.park(layers)
    assert [layer.weight.data_ptr() for layer in layers] == host, "each weight back in its host copy"
    assert torch.equal(layers[0].weight, 2 * values[0]), "the changed one's host copy rewritten in place"
    assert all(torch.equal(layer.weight, value) for layer, value in zip(layers[1:], values[1:]))
    assert q.is_stale(layers[0]) and q.apply(unet, q.Quantization("int8", tuple(q.candidate_layers(unet)))) == 1


@torch.no_grad()
def test_the_eager_unet_brings_parked_weights_back_before_it_runs(quantized):
    unet, layers, (args, kwargs), expected = quantized
    hm.park(layers)
    hm.guard(unet)
    assert len(unet._forward_pre_hooks) == 1
    assert torch.equal(unet(*args, **kwargs), expected)
    assert not hm.parked_layers(unet) and not unet._forward_pre_hooks, "the hook removes itself"
    hm.guard(unet)
    assert not unet._forward_pre_hooks, "nothing parked: nothing to guard"


@torch.no_grad()
def test_weights_loaded_or_moved_while_parked(quantized):
    """Webui loads a checkpoint into the model in place (into the host copies) and moves it with ``.to()``."""
    unet, layers, (args, kwargs), _ = quantized
    other = arch.sd_unet(arch.SD15_TINY, seed=2)
    hm.park(layers)
    unet.load_state_dict(other.state_dict(), strict=False)
    assert all(hm.is_parked(layer) and q.is_stale(layer) for layer in layers), "the 8-bit copies are rewritten"
    hm.unpark(layers)
    assert torch.equal(unet(*args, **kwargs), other(*args, **kwargs))

    hm.park(layers)
    unet.to(torch.float64)  # new tensors for every weight, parked or not
    hm.unpark(layers)
    assert not hm.parked_layers(unet) and all(layer.weight.dtype == torch.float64 for layer in layers)
    assert hm.HOST_COPY not in layers[0].__dict__, "a copy of the old tensor is not reused"


def test_a_dropped_model_lets_go_of_its_host_copies(quantized):
    """Webui drops a model by moving it to the meta device; reference cycles may keep it alive for a while."""
    unet, layers, _, _ = quantized
    hm.park(layers)
    unet.to("meta")
    assert all(hm.HOST_COPY in layer.__dict__ for layer in layers)
    hm.release_dropped()
    assert not any(hm.HOST_COPY in layer.__dict__ or hm.PARKED in layer.__dict__ for layer in layers)
