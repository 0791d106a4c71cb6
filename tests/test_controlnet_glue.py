"""ControlNet's glue (``controlnet/glue.py``) without webui: recognising ControlNet's forward on the UNet and its
version, refusing what cannot be recorded, and recording what a ControlNet-shaped forward adds to the UNet's blocks
(``tests/controlnet_double/scripts/hook.py``, which uses the blocks as sd-webui-controlnet v1.1.455 does) into the
compiled residual pass: equal to that forward run eagerly, one graph for every control."""
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sd_webui_onediff.bench import architectures as arch
from sd_webui_onediff.compile import CompiledUNet
from sd_webui_onediff.compile.foreign_hooks import find_foreign_hooks
from sd_webui_onediff.compile.residuals import block_shapes
from sd_webui_onediff.controlnet import glue

DOUBLE = Path(__file__).resolve().parent / "controlnet_double" / "scripts" / "hook.py"


def load_double(path: Path = DOUBLE):
    spec = importlib.util.spec_from_file_location(f"controlnet_double_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def unet():
    return arch.sd_unet(arch.SD15_TINY, seed=4)


@pytest.fixture(scope="module")
def inputs():
    (x, t), kwargs = arch.sd_inputs(arch.SD15_TINY, tokens=8)
    return x, t, kwargs["context"]


def controls(unet, x, seed):
    generator = torch.Generator().manual_seed(seed)
    shapes = block_shapes(unet, x.shape)
    controlnet = [torch.randn(s, generator=generator) * 0.3 for s in (*shapes.inputs, shapes.middle)]
    t2i = {i: torch.randn(shapes.inputs[i], generator=generator) * 0.3 for i in range(1, len(shapes.inputs), 2)}
    return controlnet, t2i


def hooked(unet, **controls_):
    hook = load_double().UnetHook()
    ldm_module = sys.modules[type(unet).__module__]
    hook.hook(unet, timestep_embedding=ldm_module.timestep_embedding, **controls_)
    return hook


@torch.no_grad()
def test_the_recorded_pass_equals_controlnets_forward_with_one_graph_for_every_control(unet, inputs):
    x, t, context = inputs
    plain = unet(x, t, context=context[:, 1:])
    hook = hooked(unet)
    try:
        found = glue.find_hook(unet)
        assert found is not None and found.version == "v1.1.455" and found.unsupported_reason() is None
        compiled = CompiledUNet(glue.compiled_target(unet))
        wrapper = glue.bound_module(unet, compiled)
        assert isinstance(wrapper, glue.ControlNetUNet)
        cases = [("no control", {}), ("ControlNet", {"controlnet": controls(unet, x, 1)[0]}),
                 ("T2I-Adapter", {"t2i": controls(unet, x, 2)[1]}), ("both", dict(zip(("controlnet", "t2i"), controls(unet, x, 3))))]
        for what, given in cases:
            hook.restore()
            hook = hooked(unet, **given)
            found = glue.find_hook(unet)
            wrapper.hook = found
            eager = unet(x, t, context=context)
            out = wrapper(x, t, context=context)
            assert compiled.failure is None, compiled.failure
            assert ((out - eager).norm() / eager.norm()).item() < 1e-4, what
            if given:
                assert (eager - plain).abs().mean() > 1e-2 * plain.abs().mean(), f"{what} changed nothing"
            else:
                assert ((eager - plain).norm() / plain.norm()).item() < 1e-6
        assert compiled.stats.graphs_compiled == 1
    finally:
        hook.restore()
    assert find_foreign_hooks(list(unet.named_modules())) == [], "ControlNet's restore leaves the UNet's own forward"
    assert glue.find_hook(unet) is None and glue.compiled_target(unet) is unet


@pytest.mark.parametrize("family", ["sd15-narrow", "sdxl"])
@torch.no_grad()
def test_the_recording_is_exact_on_sd15s_topology_and_sdxl(family):
    """Eagerly, the recorded arguments through the residual pass give exactly ControlNet's forward's result (each
    block gets one control, so no sum is reassociated), ``y`` included."""
    if family == "sdxl":
        if not arch.sgm_available():
            pytest.skip("sgm's UNetModel is not importable (set SD_WEBUI_PATH)")
        unet = arch.sdxl_unet(arch.SDXL_TINY, seed=6)
        (x, t), kwargs = arch.sdxl_inputs(arch.SDXL_TINY, tokens=8)
    else:
        unet = arch.sd_unet(arch.SD15_NARROW, seed=6)
        (x, t), kwargs = arch.sd_inputs(arch.SD15_NARROW, tokens=8)
    controlnet, t2i = controls(unet, x, 7)
    for given in ({"controlnet": controlnet}, {"t2i": t2i}):
        hook = hooked(unet, **given)
        try:
            wrapper = glue.bound_module(unet, CompiledUNet(glue.compiled_target(unet)))
            recorded = wrapper.record(x, t, kwargs["context"], kwargs.get("y"))
            assert torch.equal(glue.compiled_target(unet)(*recorded), unet(x, t, **kwargs)), sorted(given)
        finally:
            hook.restore()


@torch.no_grad()
def test_a_forward_that_reworks_the_output_runs_eagerly_with_the_reason(unet, inputs):
    x, t, context = inputs
    hook = hooked(unet, rework_output=True)
    try:
        compiled = CompiledUNet(glue.compiled_target(unet))
        wrapper = glue.bound_module(unet, compiled)
        out = wrapper(x, t, context=context)
        assert torch.equal(out, unet(x, t, context=context))
        assert "changed the UNet's output" in compiled.failure
        assert compiled.stats.graphs_compiled == 0
    finally:
        hook.restore()


class Plugable(torch.nn.Module):
    """As ControlNet's ``PlugableControlModel``: calls the model it wraps."""

    def __init__(self, control_model):
        super().__init__()
        self.control_model = control_model

    def forward(self, *args, **kwargs):
        return self.control_model(*args, **kwargs)


class Controls(torch.nn.Module):
    """A control model: one residual per slot, from the input and the hint."""

    def __init__(self, shapes):
        super().__init__()
        self.sizes = [tuple(s[-2:]) for s in (*shapes.inputs, shapes.middle)]
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(4, s[1], 1) for s in (*shapes.inputs, shapes.middle))

    def forward(self, x, hint, timesteps, context, y=None):
        return [conv(F.adaptive_avg_pool2d(x + hint, size)) for conv, size in zip(self.convs, self.sizes)]


@torch.no_grad()
def test_controlnet_models_run_compiled_for_the_recording_and_are_put_back(unet, inputs):
    x, t, context = inputs
    torch.manual_seed(0)
    plugable = Plugable(Controls(block_shapes(unet, x.shape)))
    params = [types.SimpleNamespace(control_model=plugable, control_model_type=types.SimpleNamespace(name=kind),
                                    preprocessor={"name": "none"}, hint=torch.randn_like(x), weight=weight)
              for kind, weight in (("ControlNet", 1.0), ("ControlNet", 0.5))]
    hook = hooked(unet, control_params=params)
    try:
        compiled_models = []

        def compiler(model):
            compiled_models.append(CompiledUNet(model))
            return compiled_models[-1]

        compiled = CompiledUNet(glue.compiled_target(unet))
        wrapper = glue.bound_module(unet, compiled, compiler)
        eager = unet(x, t, context=context)
        for _ in range(2):
            out = wrapper(x, t, context=context)
            assert ((out - eager).norm() / eager.norm()).item() < 1e-4
        assert [m.eager for m in compiled_models] == [plugable.control_model], "one compiled model per model"
        assert compiled_models[0].stats.graphs_compiled == 1 and compiled_models[0].failure is None
        assert "forward" not in vars(plugable), "the control model's own forward is back"
        assert compiled.failure is None
    finally:
        hook.restore()


def unit(kind: str, preprocessor: str = "none"):
    return types.SimpleNamespace(control_model_type=types.SimpleNamespace(name=kind), preprocessor={"name": preprocessor})


@pytest.mark.parametrize("units, lowvram, reason", [
    ([unit("ControlNet"), unit("T2I_Adapter", "canny")], False, None),
    ([unit("ControlNet"), unit("AttentionInjection", "reference_only")], False, "AttentionInjection unit"),
    ([unit("IPAdapter")], False, "IPAdapter unit"),
    ([unit("Controlllite")], False, "Controlllite unit"),
    ([unit("SparseCtrl")], False, "SparseCtrl unit"),
    ([unit("ControlNet", "inpaint_only+lama")], False, "inpaint_only+lama preprocessor"),
    ([unit("ControlNet", "tile_colorfix")], False, "tile_colorfix preprocessor"),
    ([unit("ControlNet")], True, "low VRAM"),
])
def test_what_cannot_be_recorded_is_named(units, lowvram, reason):
    hook = glue.ControlNetHook(None, types.SimpleNamespace(control_params=units, lowvram=lowvram), "v1.1.455")
    found = hook.unsupported_reason()
    assert found is None if reason is None else reason in found, found


def test_another_version_is_recognised_and_refused(tmp_path, unet):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "hook.py").write_text(DOUBLE.read_text())
    (tmp_path / "scripts" / "controlnet_version.py").write_text("version_flag = 'v1.1.440'\n")
    hook = load_double(tmp_path / "scripts" / "hook.py").UnetHook()
    hook.hook(unet, timestep_embedding=None)
    try:
        found = glue.find_hook(unet)
        assert found.version == "v1.1.440"
        assert "v1.1.440" in found.unsupported_reason() and glue.SUPPORTED_VERSION in found.unsupported_reason()
    finally:
        hook.restore()


def test_other_instance_forwards_are_not_controlnet(unet):
    assert glue.find_hook(unet) is None
    unet.forward = types.MethodType(lambda self, *a, **k: None, unet)
    try:
        assert glue.find_hook(unet) is None
    finally:
        del unet.forward
