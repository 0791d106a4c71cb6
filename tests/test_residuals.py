"""The residual pass (``compile/residuals.py``) on real UNet architectures at tiny sizes, on the CPU: the UNet plus
control residuals exactly, the plain UNet with zero residuals, one compiled graph for every residual value."""
import pytest
import torch
from sd_webui_onediff.bench import architectures as arch
from sd_webui_onediff.compile import CompiledUNet
from sd_webui_onediff.compile.residuals import Residuals, block_shapes, residual_pass, zero_residuals

FAMILIES = {
    "sd15": (lambda: arch.sd_unet(arch.SD15_TINY, seed=1), lambda **kw: arch.sd_inputs(arch.SD15_TINY, tokens=7, **kw)),
    "sd15-narrow": (lambda: arch.sd_unet(arch.SD15_NARROW, seed=2),
                    lambda **kw: arch.sd_inputs(arch.SD15_NARROW, tokens=7, **kw)),
    "sdxl": (lambda: arch.sdxl_unet(arch.SDXL_TINY, seed=3), lambda **kw: arch.sdxl_inputs(arch.SDXL_TINY, tokens=7, **kw)),
}


def family(name):
    if name == "sdxl" and not arch.sgm_available():
        pytest.skip("sgm's UNetModel is not importable (set SD_WEBUI_PATH); diffusers' UNet has no residual pass")
    make_unet, make_inputs = FAMILIES[name]
    unet = make_unet()
    (x, t), kwargs = make_inputs()
    return unet, x, t, kwargs["context"], kwargs.get("y")


def random_residuals(shapes, seed: int, *, flowing: bool, skip: bool) -> Residuals:
    generator = torch.Generator().manual_seed(seed)

    def each(wanted):
        return tuple(torch.randn(s, generator=generator) if wanted else torch.zeros(s) for s in shapes.inputs)

    return Residuals(each(flowing), each(skip), torch.randn(shapes.middle, generator=generator))


def reference(unet, x, t, context, y, flowing, skip_only, middle):
    """The UNet's own forward, with residuals put in by hooks: ``flowing`` on each input block's output, ``skip_only``
    on the skip half of each output block's input, ``middle`` on the middle block's output."""
    handles = [block.register_forward_hook(lambda m, a, out, r=r: out + r) for block, r in zip(unet.input_blocks, flowing)]
    handles.append(unet.middle_block.register_forward_hook(lambda m, a, out: out + middle))
    for block, s in zip(unet.output_blocks, reversed(skip_only)):
        def add_to_skip(m, args, s=s):
            h, *rest = args
            head, tail = h[:, :h.shape[1] - s.shape[1]], h[:, h.shape[1] - s.shape[1]:]
            return (torch.cat([head, tail + s], dim=1), *rest)
        handles.append(block.register_forward_pre_hook(add_to_skip))
    try:
        return unet(x, t, context=context, y=y) if y is not None else unet(x, t, context=context)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("name", ["sd15", "sd15-narrow", "sdxl"])
@torch.no_grad()
def test_residual_pass_is_the_unet_plus_residuals(name):
    unet, x, t, context, y = family(name)
    shapes = block_shapes(unet, x.shape)
    passed = residual_pass(unet)
    assert residual_pass(unet) is passed
    plain = unet(x, t, context=context, y=y) if y is not None else unet(x, t, context=context)
    assert torch.equal(passed(x, t, context, y, zero_residuals(shapes, x.dtype, x.device)), plain)
    for what, flowing, skip in (("ControlNet", False, True), ("T2I-Adapter", True, False)):
        residuals = random_residuals(shapes, seed=5, flowing=flowing, skip=skip)
        expected = reference(unet, x, t, context, y, residuals.inputs, residuals.skips, residuals.middle)
        if flowing:  # a T2I-Adapter's residual reaches the skip connection through the block's output
            residuals = residuals._replace(skips=residuals.inputs)
        out = passed(x, t, context, y, residuals)
        assert torch.equal(out, expected), what
        assert (out - plain).abs().mean() > 1e-3 * plain.abs().mean(), f"{what}: the residuals changed nothing"


@pytest.mark.parametrize("name", ["sd15", "sd15-narrow", "sdxl"])
@pytest.mark.parametrize("latent", [16, 18, (24, 16)])
@torch.no_grad()
def test_block_shapes_are_the_real_ones(name, latent):
    unet, *_ = family(name)
    _, make_inputs = FAMILIES[name]
    height, width = latent if isinstance(latent, tuple) else (latent, latent)
    (x, t), kwargs = make_inputs()
    x = torch.randn(x.shape[0], x.shape[1], height, width)
    if name == "sd15-narrow" and height % 8:
        pytest.skip("three downsamplings of an odd size give skip connections that ldm's own concatenation refuses")
    seen = {}
    handles = [module.register_forward_hook(lambda m, a, out, key=key: seen.__setitem__(key, tuple(out.shape)))
               for key, module in [*((("in", i), b) for i, b in enumerate(unet.input_blocks)), (("mid",), unet.middle_block),
                                   *((("out", i), b) for i, b in enumerate(unet.output_blocks))]]
    try:
        unet(x, t, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    shapes = block_shapes(unet, x.shape)
    assert list(shapes.inputs) == [seen[("in", i)] for i in range(len(unet.input_blocks))]
    assert shapes.middle == seen[("mid",)]
    assert list(shapes.outputs) == [seen[("out", i)] for i in range(len(unet.output_blocks))]


@torch.no_grad()
def test_one_compiled_graph_serves_every_residual_value():
    unet, x, t, context, y = family("sd15")
    shapes = block_shapes(unet, x.shape)
    passed = residual_pass(unet)
    compiled = CompiledUNet(passed)
    for seed, (flowing, skip) in enumerate([(False, False), (False, True), (True, False), (True, True)]):
        residuals = random_residuals(shapes, seed, flowing=flowing, skip=skip)
        out = compiled(x, t, context, None, residuals)
        expected = passed(x, t, context, None, residuals)
        assert ((out - expected).norm() / expected.norm()).item() < 1e-4
    assert compiled.failure is None
    assert compiled.stats.graphs_compiled == 1
