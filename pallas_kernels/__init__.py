"""Pallas kernels, each beside its pure-JAX reference and reached through a dispatcher (impl="xla"|"pallas"|"auto").

    ssd_scan      the chunked Mamba-2 SSD (prefill / training forward), fused; GPU and TPU layouts
    ssd_update    the single-token state update (decode), fp32 state updated in place
    quant_matmul  FP8 x FP8 and W4A16 NVFP4 GEMMs; W4A4 NVFP4 on native block-scaled MMAs where they exist
    attention     causal GQA flash attention through the Pallas kernels that ship with JAX
    dispatch      which implementation an op runs, and the compiler params that pick the Triton lowering

Depends on JAX alone. The references the kernels are tested against are their own (`*_reference`) and nemojax's
(the sequential and chunked SSD in `nemojax.nn.ssd`, `nemojax.nn.attention.causal_attention`, the fake-quantized
GEMM of `nemojax.quant`).
"""
