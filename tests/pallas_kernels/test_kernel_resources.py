"""Every Pallas kernel fits the GPU at every preset shape, checked without a GPU: the kernels are lowered for CUDA
from this host and their Triton IR compiled for the target by the triton package (pallas_kernels.resources), which
reports the shared memory Triton allocates (it reproduced the H200's "requested 301056" for the old fused scan).
The SSD kernels size their chunk and pipeline depth from an analytic bound; it is checked to bound Triton's figure.
Attention and the quantized matmuls: tests/pallas_kernels/test_device_lowering.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

import nemojax
from pallas_kernels import resources, ssd_chunked
from pallas_kernels import ssd_scan as ssd_module
from pallas_kernels.ssd_update import ssd_update

# find_spec, not importorskip: importing triton would load its LLVM into this process (resources compiles in a child)
pytestmark = [pytest.mark.skipif(not resources.triton_available(),
                                 reason="the device-free compile needs the triton package (pip install -e '.[test]')"),
              pytest.mark.xdist_group("triton")]  # one worker compiles them all: the IR cache below is per process

S = jax.ShapeDtypeStruct
SM90 = resources.device_limits(compute_capability=(9, 0))


def _mixers() -> list[tuple[int, int, int, int]]:
    """The distinct (H, P, G, N) Mamba mixers of the published presets (H only sets the grid)."""
    shapes = {}
    for name in nemojax.presets.names():
        m = nemojax.presets.get(name).mamba
        if not name.endswith("-tiny") and m is not None:
            shapes.setdefault((m.head_dim, m.state_size), (m.num_heads, m.head_dim, m.n_groups, m.state_size))
    return sorted(shapes.values())


MIXERS = _mixers()
_compiled: dict[tuple[str, tuple[int, int]], resources.KernelResources] = {}


def _resources(fn, *args, cc=(9, 0)) -> list[resources.KernelResources]:
    """Each distinct kernel of `fn` compiled once (the backward's runs 2 and 3 share one)."""
    out = []
    for kernel in resources.triton_kernels(fn, *args):
        key = (kernel.ir, cc)
        if key not in _compiled:
            _compiled[key] = resources.compile_triton_kernel(kernel, cc, ptxas=False)
        out.append(_compiled[key])
    return out


def _scan_args(b, L, H, P, G, N, x_dtype=jnp.float32, bc_dtype=jnp.bfloat16):
    return (S((b, L, H, P), x_dtype), S((b, L, H), jnp.float32), S((H,), jnp.float32), S((b, L, G, N), bc_dtype),
            S((b, L, G, N), bc_dtype))


def _grad_of(scan):
    return jax.grad(lambda *a: jnp.sum(scan(*a)[0]) + jnp.sum(scan(*a)[1]), argnums=(0, 1, 2, 3, 4))


def test_presets_have_the_expected_mixers():
    assert {(P, N) for _, P, _, N in MIXERS} == {(64, 128), (64, 256), (80, 128)}


@pytest.mark.parametrize("mixer", MIXERS, ids=lambda m: "H{}P{}G{}N{}".format(*m))
def test_fused_scan_forward_and_backward_fit_sm90(mixer):
    """A bf16 model's scan (x f32, B/C bf16, chunk 128) and its backward (the same kernel on reversed and
    transposed inputs): every kernel within the H200's 227 KiB, and within the bound that sized it."""
    H, P, G, N = mixer
    scan = functools.partial(ssd_module.ssd_scan, chunk_size=128, backend="gpu")
    kernels = _resources(_grad_of(scan), *_scan_args(1, 256, H, P, G, N))
    assert {k.name for k in kernels} == {"ssd_scan"}
    for k in kernels:
        assert k.shared_bytes <= SM90.max_shared_bytes_per_block, k
    # the bound at each of the scan's configurations: forward / run 1 (x f32 [.., P], B/C [.., N]) and runs 2, 3
    # (x bf16 [.., N], B/C bf16 [.., P])
    Pb, Nb = max(16, 1 << (P - 1).bit_length()), N
    budget = SM90.max_shared_bytes_per_block
    forward = ssd_module.fused_launch(128, Pb, Nb, 2, 4, budget)
    transposed = ssd_module.fused_launch(128, Nb, Pb, 2, 2, budget)
    bounds = {ssd_module.fused_shared_bytes_bound(forward[0], Pb, Nb, 2, 4, forward[1]),
              ssd_module.fused_shared_bytes_bound(transposed[0], Nb, Pb, 2, 2, transposed[1])}
    assert max(k.shared_bytes for k in kernels) <= max(bounds) <= budget


@pytest.mark.parametrize("mixer", MIXERS, ids=lambda m: "H{}P{}G{}N{}".format(*m))
def test_chunked_scan_fits_sm90(mixer):
    """The three-kernel algorithm at chunk 128: each kernel within 227 KiB and within `shared_bytes_bound`."""
    H, P, G, N = mixer
    scan = functools.partial(ssd_module.ssd_scan, chunk_size=128, backend="gpu", algorithm="chunked")
    kernels = _resources(scan, *_scan_args(1, 256, H, P, G, N))
    assert [k.name for k in kernels] == ["ssd_chunk_states", "ssd_state_passing", "ssd_chunk_scan"]
    Pb = max(16, 1 << (P - 1).bit_length())
    Q = ssd_chunked.gpu_chunk(128, Pb, N, 2, SM90.max_shared_bytes_per_block)
    for k in kernels:
        assert k.shared_bytes <= ssd_chunked.shared_bytes_bound(Q, Pb, N, 2) <= SM90.max_shared_bytes_per_block, k


@pytest.mark.parametrize("cc", [(8, 0), (8, 9)], ids=["sm80", "sm89"])
def test_scan_shrinks_to_smaller_devices(cc, monkeypatch):
    """On an A100 (163 KiB) and an L4 / RTX 40xx (99 KiB) the largest mixer (N 256) and a float32 model's scan
    pick a shorter chunk or a shallower pipeline and fit, compiled for that device."""
    limits = resources.device_limits(compute_capability=cc)
    monkeypatch.setattr(resources, "device_limits", lambda *a, **k: limits)
    scan = functools.partial(ssd_module.ssd_scan, chunk_size=128, backend="gpu")
    for bc_dtype in (jnp.bfloat16, jnp.float32):
        for k in _resources(scan, *_scan_args(1, 256, 256, 64, 8, 256, bc_dtype=bc_dtype), cc=cc):
            assert k.shared_bytes <= limits.max_shared_bytes_per_block, (k, bc_dtype)


@pytest.mark.parametrize("mixer", MIXERS, ids=lambda m: "H{}P{}G{}N{}".format(*m))
def test_decode_update_fits_sm90(mixer):
    H, P, G, N = mixer
    b = 64
    args = (S((b, H, P, N), jnp.float32), S((b, H, P), jnp.bfloat16), S((b, H), jnp.float32), S((H,), jnp.float32),
            S((b, G, N), jnp.bfloat16), S((b, G, N), jnp.bfloat16), S((H,), jnp.float32))
    [k] = _resources(functools.partial(ssd_update, backend="gpu"), *args)
    assert k.shared_bytes <= SM90.max_shared_bytes_per_block


def test_decode_attention_fits_sm90():
    """The split-K decode kernel at the presets' attention (GQA 32 / 8 heads, head_dim 128) over a 4096 cache."""
    from pallas_kernels.decode_attention import decode_attention

    b, Hq, Hkv, d, L = 8, 32, 8, 128, 4096
    args = (S((b, Hq, d), jnp.bfloat16), S((b, Hkv, d), jnp.bfloat16), S((b, Hkv, d), jnp.bfloat16),
            S((b, Hkv, L, d), jnp.bfloat16), S((b, Hkv, L, d), jnp.bfloat16), S((b,), jnp.int32))
    kernels = _resources(functools.partial(decode_attention, scale=d ** -0.5), *args)
    assert kernels and all(k.shared_bytes <= SM90.max_shared_bytes_per_block for k in kernels), kernels
