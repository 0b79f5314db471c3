"""Kernel choices on a real GPU (pipeline/backends/kernels.py, the compat kernel hooks).

- the attention kernel the selector picks is no further from an fp32 reference than LightX2V's
  own kernel (sage_attn2), at the model's shape on random tensors and on the DiT output of one
  step of the full-size synthetic checkpoint (same latents: same prompt and seed, cancelled after
  step 1); the latter is opt-in with WAN_STUDIO_GPU_FULL=1 like the other full-size tests;
- the INT8 GEMM tiles give bit-identical outputs to LightX2V's autotune list;
- SageAttention is offered exactly where kernels.sage_entry_point says, on this GPU.
"""

from __future__ import annotations

import os

import pytest

from tests.gpu.gpuhelpers import CAP_GIB, Recorder, loaded_model, make_service, spec

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("lightx2v")

from pipeline.backends import kernels  # noqa: E402

HEADS, HEAD_DIM = 40, 128


def _sage():
    import lightx2v.common.ops.attn.sage_attn as sage_attn_module
    import sageattention

    from pipeline.backends import lightx2v_compat as compat

    compat.sage_attention_on_sm89_sm120(compat.CompatFixes(), sage_attn_module, sageattention,
                                        torch.cuda.get_device_capability(0))
    return sage_attn_module.sageattn, dir(sageattention)


def test_sageattention_is_offered_where_it_runs_and_runs_there():
    pytest.importorskip("sageattention")
    sage_fn, exports = _sage()
    offered = kernels.available_attention(torch.cuda.get_device_capability(0), sage_exports=exports)
    assert (kernels.SAGE in offered) == (sage_fn is not None)
    if sage_fn is not None:
        q = torch.randn(1, 1024, 4, 128, device="cuda", dtype=torch.bfloat16)
        assert sage_fn(q, q, q, tensor_layout="NHD").shape == q.shape


@pytest.mark.parametrize("tokens", [32760])
def test_chosen_attention_is_no_less_accurate_than_sage_at_the_model_shape(tokens, gpu_report):
    pytest.importorskip("sageattention")
    sage_fn, exports = _sage()
    selector = kernels.build_selector(torch, sage_fn, exports)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn((tokens, HEADS, HEAD_DIM), device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    out = selector(q, k, v)
    choice = next(iter(selector.choices.values()))
    trials = {t.backend: t for t in choice.trials}
    assert choice.backend in selector.offered and trials[choice.backend].error is None
    assert trials[choice.backend].rel_l2 <= trials[kernels.SAGE].rel_l2
    # The selector returns what the chosen kernel computes, in LightX2V's [L, H*D] layout.
    assert out.shape == (tokens, HEADS * HEAD_DIM)
    assert torch.equal(out, selector.fns[choice.backend](q, k, v).reshape(tokens, -1))
    gpu_report("attention_choice", gpu=torch.cuda.get_device_name(0), tokens=tokens, chosen=choice.backend,
               trials=choice.summary()["trials"])


def test_int8_gemm_tiles_are_bit_identical_to_lightx2vs_list(gpu_report):
    from lightx2v.common.ops.mm import triton_kernels as tk

    from pipeline.backends import lightx2v_compat as compat

    a = torch.randn((4096, 5120), device="cuda", dtype=torch.bfloat16)
    aq, ascale = tk.int8_quantize_triton(a)
    w = torch.randint(-127, 128, (13824, 5120), device="cuda", dtype=torch.int8)
    wscale = torch.rand((13824,), device="cuda", dtype=torch.float32) / 100
    bias = torch.randn((13824,), device="cuda", dtype=torch.float32)
    skip = compat.CompatFixes(skip=frozenset({"int8_gemm_tiles_for_this_gpu"}))
    compat.int8_gemm_tiles_for_this_gpu(skip, tk, torch.cuda.get_device_properties(0).shared_memory_per_block_optin)
    theirs = tk.int8_gemm_bias_triton(aq, w, bias, ascale, wscale, output_dtype=torch.bfloat16)
    theirs_gelu = tk.int8_gemm_bias_triton(aq, w, bias, ascale, wscale, fuse_gelu=True, output_dtype=torch.bfloat16)
    fixes = compat.CompatFixes()
    compat.int8_gemm_tiles_for_this_gpu(fixes, tk, torch.cuda.get_device_properties(0).shared_memory_per_block_optin)
    assert fixes.has("int8_gemm_tiles_for_this_gpu")
    try:
        ours = tk.int8_gemm_bias_triton(aq, w, bias, ascale, wscale, output_dtype=torch.bfloat16)
        ours_gelu = tk.int8_gemm_bias_triton(aq, w, bias, ascale, wscale, fuse_gelu=True, output_dtype=torch.bfloat16)
        assert torch.equal(ours, theirs) and torch.equal(ours_gelu, theirs_gelu)
        gpu_report("int8_gemm_tiles", best=str(tk.int8_gemm_bias_kernel.best_config), bit_identical=True)
    finally:
        compat.int8_gemm_tiles_for_this_gpu(skip, tk, 0)  # upstream's list for the tests after this one


def _reference_fn(chunk: int = 64):
    """Exact attention: fp32 inputs through SDPA's math backend, a slice of query rows at a time."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v):
        kf, vf = k.float().transpose(0, 1)[None], v.float().transpose(0, 1)[None]
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        with sdpa_kernel([SDPBackend.MATH]):
            for s in range(0, q.shape[0], chunk):
                qf = q[s:s + chunk].float().transpose(0, 1)[None]
                out[s:s + chunk] = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf)[0].transpose(0, 1).to(q.dtype)
        return out

    return run


@pytest.mark.skipif(os.environ.get("WAN_STUDIO_GPU_FULL") != "1",
                    reason="full-size GPU tests: set WAN_STUDIO_GPU_FULL=1 (22 GB disk, 32 GB RAM)")
def test_dit_output_of_one_step_with_the_chosen_attention_is_no_further_from_fp32_than_sage(
        full_ckpt, tmp_path_factory, gpu_report):
    from pipeline.errors import GenerationCancelled

    service = make_service(full_ckpt, tmp_path_factory.mktemp("kernels-dit"))
    try:
        model = loaded_model(service)
        selector = model.attention_selector
        assert selector is not None and kernels.SAGE in selector.offered
        selector.fns["fp32_reference"] = _reference_fn()
        run_spec = spec(height=480, width=832, frames=49)
        outputs = {}
        for name in ("fp32_reference", kernels.SAGE, None):  # None: the selector's own choice
            selector.force, selector.choices = name, {}
            captured = {}
            rec = Recorder(stop_after_step=1)

            def on_step(i, n, rec=rec, captured=captured):
                rec.steps.append((i, n))
                if i == 1 and "noise_pred" not in captured:
                    captured["noise_pred"] = model._runner.model.scheduler.noise_pred.detach().float().cpu()

            hooks = rec.hooks()
            hooks = type(hooks)(on_phase=hooks.on_phase, on_step=on_step, should_stop=hooks.should_stop)
            with pytest.raises(GenerationCancelled):
                model.generate(run_spec, hooks)
            outputs[name or "chosen"] = captured["noise_pred"]
            if name is None:
                chosen = next(iter(selector.choices.values())).backend
        ref = outputs["fp32_reference"]

        def rel(x):
            return (torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref)).item()

        errors = {"sage_attn2": rel(outputs[kernels.SAGE]), f"chosen ({chosen})": rel(outputs["chosen"])}
        gpu_report("dit_step_attention_accuracy", gpu=torch.cuda.get_device_name(0), preset="480x832x49",
                   cap_gib=CAP_GIB, rel_l2=errors)
        assert rel(outputs["chosen"]) <= rel(outputs[kernels.SAGE])
    finally:
        service.cache.release()
