"""The stand-ins' state and FreeU's stand-in, in an importable module as FreeU keeps its code (``lib_free_u``): webui
loads script files under names that are not in ``sys.modules``, where Dynamo cannot find their globals."""
from modules import shared

ACTIVE = {"kind": ""}


def stepped_cat(tensors, *args, original, **kwargs):
    if ACTIVE["kind"] != "freeu" or len(tensors) != 2:
        return original(tensors, *args, **kwargs)
    backbone, skip = tensors
    # FreeU scales by a factor that depends on the step; the next GroupNorm would undo a scale, not a negation or a
    # shift that depends on the step.
    return original((-backbone.roll(shared.state.sampling_step + 1, dims=-1), skip), *args, **kwargs)
