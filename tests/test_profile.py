"""bench/profile.py's grouping of GPU kernels into steps and groups, on CPU (the profile itself needs CUDA)."""

from __future__ import annotations

from bench.profile import ELEMENTWISE, group_kernels, kernel_group, profile_markdown


def test_kernel_names_fall_in_their_groups():
    step = "step 2"
    assert kernel_group("_attn_fwd", step) == "attention"
    assert kernel_group("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", step) == "attention"
    assert kernel_group("int8_gemm_bias_kernel", step) == "GEMM"
    assert kernel_group("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", step) == "GEMM"
    assert kernel_group("int8_quantize_kernel", step) == "quantize"
    assert kernel_group("quant_per_block_int8_kernel", step) == "quantize"  # SageAttention's Q/K quantisation
    assert kernel_group("Memcpy HtoD (Pinned -> Device)", step) == "copies/offload"
    assert kernel_group("void at::native::vectorized_elementwise_kernel<4, at::native::AddFunctor<float>>", step) == ELEMENTWISE
    # Kernels of the text-encoder and VAE phases count there whatever they are.
    assert kernel_group("int8_gemm_bias_kernel", "phase text encoding") == "text encoder"
    assert kernel_group("cudnn::conv2d_fprop", "phase VAE decode") == "VAE"


def test_kernels_are_counted_in_the_range_they_start_in():
    marks = [("phase text encoding", 0, 100), ("step 1", 100, 1000), ("step 2", 1000, 2000), ("phase VAE decode", 2000, 3000)]
    kernels = [("int8_gemm_bias_kernel", 50, 10), ("_attn_fwd", 150, 500), ("_attn_fwd", 1100, 400),
               ("int8_gemm_bias_kernel", 1600, 300), ("add_kernel", 1950, 200),  # starts in step 2, ends after
               ("conv", 2100, 800), ("late", 5000, 1)]
    windows = group_kernels(marks, kernels)
    assert windows["phase text encoding"] == {"text encoder": 10e-6}
    assert windows["step 1"] == {"attention": 500e-6}
    assert windows["step 2"] == {"attention": 400e-6, "GEMM": 300e-6, ELEMENTWISE: 200e-6}
    assert windows["phase VAE decode"] == {"VAE": 800e-6}
    assert windows["unmarked"] == {ELEMENTWISE: 1e-6}


def test_markdown_names_command_gpu_and_date_and_every_step():
    meta = {"gpu": "NVIDIA H200", "date_utc": "2026-11-30T10:00:00+00:00", "command": "python -m bench.profile",
            "torch": "2.11", "cuda": "13.0", "triton": "3.6", "sageattention": "1.0.6", "lightx2v_commit": "f8aee98b",
            "checkpoint": "synthetic"}
    profile = {"config": "ours", "preset": "480x832x81", "rung": "fast", "shape": "480x832x81",
               "windows": {"step 1": {"attention": 2.0}, "step 2": {"attention": 1.0, "GEMM": 0.5},
                           "phase VAE decode": {"VAE": 0.8}},
               "steps": ["step 1", "step 2"], "mean_step_2_4_s": {"attention": 1.0, "GEMM": 0.5},
               "mean_step_2_4_share": {"attention": 0.6667, "GEMM": 0.3333}, "kernel_s_per_step": 1.5,
               "top_kernels": [{"kernel": "_attn_fwd", "group": "attention", "s_all_steps": 3.0}]}
    text = profile_markdown(meta, [profile])
    assert "NVIDIA H200" in text and "2026-11-30T10:00:00" in text and "`python -m bench.profile`" in text
    assert "| attention | 2.000 | 1.000 | 1.000 | 66.7% |" in text
    assert "phase VAE decode: 0.800 s" in text
