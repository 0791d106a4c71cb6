"""``bench/kernel_profile.py``: the categories ``bench/quant_bench.py --profile`` sorts kernels into, from realistic
CUDA kernel names (cuBLAS, cuBLASLt, CUTLASS, cuDNN, PyTorch, Inductor) and the CPU operators of a smoke run."""
import pytest
from sd_webui_onediff.bench import kernel_profile as kp

KERNELS = [
    # cuBLAS / cuBLASLt fp16 and bf16 GEMMs
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas", kp.GEMM_16BIT),
    ("nvjet_sm90_hsh_128x256_64x4_2x1_v_bz_coopA_bias_TNN", kp.GEMM_16BIT),
    ("nvjet_tst_64x8_64x16_4x1_v_bz_TNT", kp.GEMM_16BIT),
    ("ampere_fp16_s16816gemm_fp16_128x128_ldg8_f2f_stages_32x5_tn", kp.GEMM_16BIT),
    ("ampere_bf16_s16816gemm_bf16_256x128_ldg8_f2f_stages_64x3_nn", kp.GEMM_16BIT),
    ("void cutlass::Kernel2<cutlass_80_tensorop_f16_s16816gemm_relu_f16_256x128_32x3_nn_align8>(cutlass_80_tensorop_f16_s16816gemm_relu_f16_256x128_32x3_nn_align8::Params)", kp.GEMM_16BIT),
    # 8-bit GEMMs: int8 (cuBLAS IMMA), fp8 (cuBLASLt, CUTLASS, PyTorch's row-wise scaled_mm), Inductor's fused int8 template
    ("sm80_xmma_gemm_i8i8_i8i32_f32_tn_n_tilesize256x128x64_stage4_warpsize4x2x1_tensor16x8x32", kp.GEMM_8BIT),
    ("ampere_int8_i8816gemm_int8_256x128_ldg16_stages_64x3_tn", kp.GEMM_8BIT),
    ("volta_int8_i8816gemm_int8_128x128_ldg16_relu_mods_nt", kp.GEMM_8BIT),
    ("sm90_xmma_gemm_e4m3e4m3_e4m3f32_f32_tn_n_tilesize128x128x128_warpgroupsize1x1x1_cublas", kp.GEMM_8BIT),
    ("cutlass3x_sm90_tensorop_gemm_e4m3_e4m3_f32_bf16_bf16_128x128x128_1x1x1_0_tnn_align16_warpspecialized_cooperative", kp.GEMM_8BIT),
    ("nvjet_sm90_qqtst_128x128_128x6_1x2_h_bz_ovscale_TNT", kp.GEMM_8BIT),
    ("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cute::tuple<int, int, int>, cutlass::gemm::collective::CollectiveMma<cutlass::gemm::MainloopSm90TmaGmmaWarpSpecialized<4>, cutlass::float_e4m3_t, cutlass::half_t>>>(...)", kp.GEMM_8BIT),
    ("void at::cuda::detail::f8f8bf16_rowwise_impl<cute::tuple<cute::C<128>>>(...)", kp.GEMM_8BIT),
    ("triton_tem_fused__int_mm_mul_3", kp.GEMM_8BIT),
    ("aten::_int_mm", kp.GEMM_8BIT),
    ("aten::_scaled_mm", kp.GEMM_8BIT),
    # GEMMs whose precision the name does not say, fp32
    ("nvjet_sm90_sss_128x64_64x8_1x2_h_bz_NNT", kp.GEMM_OTHER),
    ("triton_tem_fused_addmm_7", kp.GEMM_OTHER),
    ("aten::addmm", kp.GEMM_OTHER),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, float, float, float, false, false>(...)", kp.GEMM_OTHER),
    # attention
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false, false, cutlass::half_t>, false, false>(Flash_fwd_params)", kp.ATTENTION),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_0", kp.ATTENTION),
    ("fmha_cutlassF_f16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::half_t>::Params)", kp.ATTENTION),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", kp.ATTENTION),
    # convolutions (cuDNN implicit GEMMs before GEMMs)
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x192x64_warpgroupsize1x1x1_g1", kp.CONVOLUTION),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__half, __half, float, false, true, (cudnnKernelDataType_t)0>(...)", kp.CONVOLUTION),
    ("cudnn_infer_ampere_scudnn_winograd_128x128_ldg1_ldg4_relu_tile148t_nt_v1", kp.CONVOLUTION),
    ("aten::mkldnn_convolution", kp.CONVOLUTION),
    # Inductor's Triton kernels: fused pointwise (the 8-bit graphs' quantize and rescale), reductions, persistent
    ("triton_poi_fused_gelu_mul_split_view_52", kp.TRITON),
    ("triton_red_fused_native_group_norm_3", kp.TRITON),
    ("triton_per_fused__to_copy_abs_amax_clamp_div_round_4", kp.TRITON),
    ("triton_poi_fused__to_copy_mul_8", kp.TRITON),
    # copies and fills
    ("Memcpy DtoD (Device -> Device)", kp.COPY),
    ("Memset (Device)", kp.COPY),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}>(...)", kp.COPY),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<c10::Half>, std::array<char*, 1ul> >(int, at::native::FillFunctor<c10::Half>, std::array<char*, 1ul>)", kp.COPY),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2u>, unsigned int, 4, 64, 64>(...)", kp.COPY),
    ("aten::copy_", kp.COPY),
    # the rest
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, at::native::MaxNanFunctor<float> >, unsigned int, float, 4> >(...)", kp.OTHER),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half, float>(int, float, c10::Half const*, c10::Half const*, c10::Half const*, float*, float*, c10::Half*)", kp.OTHER),
    ("## Call CompiledFxGraph fxyz ##", kp.OTHER),
]


@pytest.mark.parametrize("name, category", KERNELS, ids=[name[:60] for name, _ in KERNELS])
def test_kernel_category(name, category):
    assert kp.kernel_category(name) == category


def test_summary_and_tables_per_call():
    kernels = [("nvjet_sm90_hsh_128x256_64x4_2x1_v_bz_coopA_bias_TNN", 3000.0, 20),
               ("sm80_xmma_gemm_i8i8_i8i32_f32_tn_n_tilesize256x128x64", 5000.0, 40),
               ("triton_poi_fused__to_copy_mul_8", 2000.0, 40)]
    summary = kp.summarize(kernels, calls=10, top=2)
    assert summary["ms_per_call"] == pytest.approx(1.0) and summary["kernels_per_call"] == 10
    rows = {row["category"]: row for row in summary["categories"]}
    assert [row["category"] for row in summary["categories"]] == list(kp.CATEGORIES)
    assert rows[kp.GEMM_8BIT] == {"category": kp.GEMM_8BIT, "ms_per_call": pytest.approx(0.5), "share": pytest.approx(0.5),
                                  "kernels_per_call": 4}
    assert rows[kp.TRITON]["ms_per_call"] == pytest.approx(0.2) and rows[kp.ATTENTION]["kernels_per_call"] == 0
    assert [row["category"] for row in summary["top"]] == [kp.GEMM_8BIT, kp.GEMM_16BIT]
    table = kp.profile_table(summary, "sdxl int8")
    assert "| 8-bit GEMM | 0.500 | 50% | 4 |" in table and "attention" not in table  # empty categories left out
    comparison = kp.comparison_table([{"model": "sdxl", "variant": "int8", "compiled_ms": 1.1, "profile": summary},
                                      {"model": "sdxl", "variant": "fp8", "compiled_ms": 1.0}])
    assert comparison.count("\n") == 2 and "| sdxl | int8 | 1.10 | 1.00 | 0.50 | 0.30 | 0.00 |" in comparison
    assert kp.summarize([], calls=3)["ms_per_call"] == 0.0
