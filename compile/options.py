"""The one options object of the compile engine.

Every option names its effect on image quality, GPU memory and compile time, so that a change of default can be judged
from this file alone.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    cuda_graphs: bool = True
    """Replay the whole UNet call as one CUDA graph (CUDA devices only; ignored on the CPU).

    Quality: none (same kernels). Speed: removes the per-kernel launch cost, which dominates SD1.5 at 512x512 (H100:
    7.4 ms per call with, 25.2 ms without; SDXL 35.4 vs 37.9 ms). Memory: each distinct input shape keeps its own
    recorded graph; activations live in one shared CUDA-graph pool, so the peak stays near one eager call's. Compile
    time: one extra warm-up and recording per shape (0.05-0.2 s)."""

    regional: bool = True
    """Compile each distinct repeated block (transformer block, residual block) once and reuse it wherever it recurs
    (``compile/regions.py``; needs torch >= 2.8, older ones compile the whole UNet as one graph).

    Quality: none (same operations). Compile time: Inductor handles about a tenth of the operations for SDXL and a
    third for SD1.5 (H100, empty caches: SDXL 55.5 s instead of 84.1 s, SD1.5 40.1 s instead of 48.0 s); on torch 2.11
    Dynamo's tracing, which a compile from warm caches is mostly made of, takes about a fifth longer. Speed: no fusion
    across block boundaries, which costs nothing measurable (SD1.5 7.4 vs 7.7 ms, SDXL 36.40 vs 36.49 ms). Memory:
    none."""

    channels_last: bool = True
    """Store convolution weights in channels-last order, in place (the eager module shares them, no copy is kept).

    Quality: none beyond the float rounding of other convolution algorithms. Speed: tensor-core convolutions need NHWC;
    without it Inductor transposes weights on every call (H100: SD1.5 8.6 ms per call without, 7.4 ms with; SDXL 36.5
    vs 35.4 ms). Memory: none. Compile time: none."""

    attention: str = "sdpa"
    """How cross-attention is traced: ``"sdpa"`` swaps, during compiled calls only, the forward of every ldm/sgm
    ``CrossAttention`` for ``torch.nn.functional.scaled_dot_product_attention`` (flash or cuDNN kernels, and always
    traceable whatever webui's "Cross attention optimization" is; webui's split-attention variants query free GPU memory
    and cannot be traced). ``"module"`` traces the module's own forward as it is (fails with a clear error if that
    forward cannot be captured in one graph).

    Quality: the same function as webui's sdp attention, equal up to float rounding. Memory: flash attention never
    materialises the attention matrix. Compile time: none."""

    attention_kernel: str = "auto"
    """Which SDPA kernel the compiled graph calls: ``"auto"`` (PyTorch's choice: flash attention on recent GPUs),
    ``"cudnn"`` (cuDNN's fused attention first, where it supports the shape) or ``"flash"``. Chosen when the graph is
    compiled; the graph then always calls that kernel.

    Quality: equal up to float rounding. Speed and memory: see README's "Options" table. Compile time: none."""

    upcast_attention: bool = False
    """Compute attention in float32 (webui's "Upcast cross attention layer to float32"). Needed by some SD2.x fp16
    checkpoints that otherwise produce NaN. Quality: removes that overflow. Speed: attention runs at fp32 rate."""

    max_autotune: bool = False
    """Let Inductor benchmark several matrix-multiply and convolution kernels per shape and keep the fastest.

    Quality: none. Speed: at most a few percent: on an H100, cuBLAS, or a Triton kernel within 2 % of it, won every
    shape measured. Compile time: minutes (SD1.5 had not finished after 260 s, against 40 s without)."""

    max_graphs_per_unet: int = 64
    """How many compiled graphs one UNet class may hold (one per input shape, prompt length and batch size; Dynamo
    counts them per traced function, so all models of that class share the limit).

    Past it, a new shape is reported as a compile failure and runs eagerly, instead of Dynamo falling back to eager
    without telling. Memory: each CUDA graph keeps its own small set of static input buffers; activations are shared.
    Compile time: none."""

    quantization: str | None = None
    """Run the large Linears of the transformer blocks with 8-bit weights and activations: ``"int8"``, ``"fp8"`` or None
    (``compile/quantization.py``). The first call of each structure measures every candidate layer's own error on its
    inputs, eagerly, and keeps those within ``DEFAULT_THRESHOLDS``; later calls and rebound models reuse that choice.

    Quality: not equal to eager any more (each quantized layer's output moves by about 1 % in int8, 3 % in fp8).
    Speed: 8-bit GEMMs run at up to twice the fp16 rate on tensor cores; what that gains per call and per image, by
    model and format, is in README (Quantization): fp8 pays on Hopper for SDXL, nothing pays for SD1.5 at 512. Memory:
    the 8-bit copies beside the fp16 weights, which stay the master (LoRA and checkpoint loads write them): one byte per
    weight of each quantized layer, unless the masters wait in host memory (``host_memory.park``). Compile time: one
    eager call to measure, once per structure."""

    def __post_init__(self) -> None:
        if self.attention not in ("sdpa", "module"):
            raise ValueError(f'CompileOptions.attention must be "sdpa" or "module", not {self.attention!r}')
        if self.attention_kernel not in ("auto", "cudnn", "flash"):
            raise ValueError(f'CompileOptions.attention_kernel must be "auto", "cudnn" or "flash", not {self.attention_kernel!r}')
        if self.quantization not in (None, "int8", "fp8"):
            raise ValueError(f'CompileOptions.quantization must be None, "int8" or "fp8", not {self.quantization!r}')
        if self.max_graphs_per_unet < 1:
            raise ValueError("CompileOptions.max_graphs_per_unet must be at least 1")
