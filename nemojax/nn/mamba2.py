"""The Mamba-2 mixer of NemotronH (docs/numerics.md 1-5; Mamba-2: arXiv 2405.21060).

    in_proj_{z,x,B,C,dt} -> causal depthwise conv (with bias) of x, B and C each -> silu
    -> SSD with dt = clip(softplus(dt + dt_bias), time_step_limit), A = -exp(A_log) -> + D * x
    -> grouped gated RMSNorm(y, z) -> out_proj

The checkpoint's fused `in_proj` (output rows [z | x | B | C | dt]) and `conv1d` (channels [x | B | C]) are held
as one projection and one conv per part, so that each part shards over the `tensor` mesh axis by its own heads
(z, x, dt) or groups (B, C) and the conv, the scan, the per-group norm and out_proj's input stay shard-local:
cutting a fused [z | x | B | C | dt] output into parts crosses shard boundaries and costs collectives in every
layer, forward and backward. `nemojax.interop` splits and fuses the checkpoint tensors.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemojax.config import ModelConfig
from nemojax.nn.linear import dense, dtypes, logical_param
from nemojax.nn.live import keep
from nemojax.nn.norms import GatedRMSNorm
from nemojax.nn.segments import document_starts
from nemojax.nn.ssd import ssd, ssd_states
from nemojax.nn.state import Extend, MambaState, take_rows
from pallas_kernels import dispatch
from pallas_kernels.ssd_scan import ssd_scan
from pallas_kernels.ssd_update import ssd_update

f32 = jnp.float32


def conv_window(window: jax.Array, kernel: jax.Array, bias: jax.Array | None,
                segment_ids: jax.Array | None = None) -> jax.Array:
    """Depthwise conv over a window that already holds the K-1 inputs before the first output.

    window: [b, K-1+T, C], kernel: [K, C], bias: [C] -> [b, T, C] float32, with
    out[t] = bias + sum_k kernel[k] * window[t + k], so tap K-1 multiplies the current token.
    segment_ids: [b, T] (packed documents): a tap reads only inputs of token t's own segment; the K-1 history
    entries belong to no segment.
    """
    K = kernel.shape[0]
    T = window.shape[1] - (K - 1)
    w = window.astype(f32)
    if segment_ids is None:
        taps = [w[:, k:k + T] for k in range(K)]
    else:
        seg = jnp.pad(segment_ids, [(0, 0), (K - 1, 0)], constant_values=-1)
        taps = [jnp.where((seg[:, k:k + T] == segment_ids)[..., None], w[:, k:k + T], 0.0) for k in range(K)]
    out = sum(tap * kernel[k].astype(f32) for k, tap in enumerate(taps))
    return out if bias is None else out + bias.astype(f32)


def causal_conv1d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """Depthwise causal conv over time. x: [b, L, C], kernel: [K, C], bias: [C] -> [b, L, C] float32.

    Zeros before the sequence: torch Conv1d(groups=C, padding=K-1), first L outputs.
    """
    return conv_window(jnp.pad(x, [(0, 0), (kernel.shape[0] - 1, 0), (0, 0)]), kernel, bias)


def _dt_bias_init(config: ModelConfig):
    """dt_bias = softplus^-1(dt), dt log-uniform in [time_step_min, time_step_max], floored (docs/numerics.md 1)."""
    m = config.mamba

    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
        u = jax.random.uniform(key, shape, f32)
        dt = jnp.exp(u * (math.log(m.time_step_max) - math.log(m.time_step_min)) + math.log(m.time_step_min))
        dt = jnp.maximum(dt, m.time_step_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def _a_log_init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    del key
    return jnp.log(jnp.arange(1, shape[0] + 1, dtype=f32)).astype(dtype)


def scan(config, x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
         initial_state: jax.Array | None = None, reset: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The SSD over T > 1 tokens: `config.runtime.ssd_impl` picks the algorithm and, for the chunked one,
    `scan_impl` the XLA code or the Pallas kernel (shapes as in nemojax.nn.ssd; `reset` [b, T] marks the first
    token of each packed document)."""
    chunk, rt = config.mamba.chunk_size, config.runtime
    if rt.ssd_impl == "chunked" and dispatch.resolve("ssd_scan", rt.scan_impl) == "pallas":
        return ssd_scan(x, dt, A, B, C, chunk_size=chunk, initial_state=initial_state, reset=reset,
                        interpret=dispatch.interpret())
    return ssd(x, dt, A, B, C, chunk_size=chunk, initial_state=initial_state, impl=rt.ssd_impl, reset=reset)


class CausalConv1d(nn.Module):
    """Depthwise causal conv over `width` channels with params `kernel` [K, width] and `bias` [width] (torch:
    [width, 1, K]); `axis` is the logical name of the channel dimension ("ssm_heads" or "ssm_groups").

    window: [b, K-1+T, width] (the K-1 earlier inputs, then the T new ones) -> [b, T, width] float32.
    """

    config: ModelConfig
    width: int
    axis: str = "ssm_heads"

    @nn.compact
    def __call__(self, window: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        m = self.config.mamba
        _, param_dtype = dtypes(self.config)
        kernel = logical_param(self, "kernel", nn.initializers.normal(self.config.initializer_range),
                               ("conv", self.axis), (m.conv_kernel, self.width), param_dtype)
        bias = None
        if m.use_conv_bias:
            bias = logical_param(self, "bias", nn.initializers.zeros_init(), (self.axis,), (self.width,),
                                 param_dtype)
        return conv_window(window, kernel, bias, segment_ids)


# The checkpoint's fused tensors, part by part in their row (channel) order, with each part's logical axis.
IN_PROJ_PARTS = ("z", "x", "B", "C", "dt")
CONV_PARTS = ("x", "B", "C")
PART_AXES = {"z": "ssm_heads", "x": "ssm_heads", "B": "ssm_groups", "C": "ssm_groups", "dt": "ssm_heads"}


def part_widths(config: ModelConfig) -> dict[str, int]:
    """Output width of each in_proj part: z, x: H*P; B, C: G*N; dt: H."""
    m = config.mamba
    return {"z": m.inner_size, "x": m.inner_size, "B": m.n_groups * m.state_size,
            "C": m.n_groups * m.state_size, "dt": m.num_heads}


class Mamba2Mixer(nn.Module):
    """u: [b, T, hidden] (the block's normed input) -> (y [b, T, hidden], state).

    With `state` (and `step`) the T tokens continue from that state and the new `MambaState` comes back; see
    `nemojax.nn.state`. Without it they start from zeros and the state stays None.
    segment_ids: [b, T] (packed documents, uncached only): the conv and the SSM state restart at every document.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, u: jax.Array, state: MambaState | None = None, step: Extend | None = None,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, MambaState | None]:
        cfg, m = self.config, self.config.mamba
        if segment_ids is not None and state is not None:
            raise ValueError("segment_ids (packed documents) apply to the uncached forward; a cached extend "
                             "continues one sequence per row")
        dtype, param_dtype = dtypes(cfg)
        H, P, G, N, K = m.num_heads, m.head_dim, m.n_groups, m.state_size, m.conv_kernel
        I = m.inner_size
        b, T, _ = u.shape

        widths = part_widths(cfg)
        proj = {part: dense(cfg, widths[part], ("embed", PART_AXES[part]), name=f"in_proj_{part}",
                            use_bias=m.proj_bias)(u) for part in IN_PROJ_PARTS}
        z, dt = proj["z"], proj["dt"]
        self.sow("taps", "x", proj["x"])  # activation importance (nemojax.compress.importance)

        # The conv runs in float32 and its output is rounded to the compute dtype, as torch's conv would be.
        # The cache holds the K-1 earlier inputs of all three convs as one [b, K-1, conv_dim] array ([x | B | C]).
        if state is None:
            history = {part: jnp.zeros((b, K - 1, widths[part]), proj[part].dtype) for part in CONV_PARTS}
        else:
            cuts = [widths["x"], widths["x"] + widths["B"]]
            history = dict(zip(CONV_PARTS, jnp.split(state.conv, cuts, axis=-1), strict=True))
        windows, conv = {}, {}
        for part in CONV_PARTS:
            windows[part] = jnp.concatenate([history[part], proj[part].astype(history[part].dtype)], axis=1)
            out = CausalConv1d(cfg, widths[part], PART_AXES[part], name=f"conv1d_{part}")(windows[part], segment_ids)
            conv[part] = jax.nn.silu(out.astype(dtype))  # [b, T, width]
        # a nested submodel's live channels (nemojax.nn.live): after the conv, whose bias would revive dead ones;
        # a dead channel's x is then zero through the scan, so is its gated output
        x, B, C = keep(self, "x", conv["x"]), conv["B"], conv["C"]

        dt_bias = logical_param(self, "dt_bias", _dt_bias_init(cfg), ("ssm_heads",), (H,), param_dtype)
        A_log = logical_param(self, "A_log", _a_log_init, ("ssm_heads",), (H,), param_dtype)
        D = logical_param(self, "D", nn.initializers.ones_init(), ("ssm_heads",), (H,), param_dtype)

        # dt, A and the scan in float32; the clamp is time_step_limit, not time_step_min (docs/numerics.md 3, 4).
        dt = jax.nn.softplus(dt.astype(f32) + dt_bias.astype(f32))
        dt = jnp.clip(dt, *m.time_step_limit)
        A = -jnp.exp(A_log.astype(f32))
        x_bThp = x.reshape(b, T, H, P).astype(f32)
        B, C = B.reshape(b, T, G, N), C.reshape(b, T, G, N)

        if state is None:
            reset = None
            if segment_ids is not None:  # the state restarts at every document's first token
                reset = document_starts(segment_ids)
            y_bThp, _ = scan(cfg, x_bThp, dt, A, B, C, reset=reset)
        elif step.all_steps:
            y_bThp, states = ssd_states(x_bThp, dt, A, B, C, initial_state=state.ssm)
            # conv state after token t: the K-1 inputs ending at t (window rows t+1 .. t+K-1)
            window = jnp.concatenate([windows[part] for part in CONV_PARTS], axis=-1)  # [b, K-1+T, conv_dim]
            convs = jnp.stack([window[:, t + 1:t + K] for t in range(T)], axis=1)
            new_state = MambaState(convs, states)
        else:
            # Uncommitted tokens get dt = 0 and x = 0: decay 1 and no input, so the final state is the state
            # after the committed ones (docs/numerics.md 2). They are padding: their outputs are not continuations.
            valid = step.valid(T)
            dt_c = jnp.where(valid[..., None], dt, 0.0)
            x_c = jnp.where(valid[..., None, None], x_bThp, 0.0)
            if T == 1 and dispatch.resolve("ssd_update", cfg.runtime.mamba_decode_impl) == "pallas":
                # the D skip is added below for every path, so the kernel gets D = 0
                y_bhp, final = ssd_update(state.ssm, x_c[:, 0], dt_c[:, 0], A, B[:, 0], C[:, 0],
                                          jnp.zeros((H,), f32), interpret=dispatch.interpret())
                y_bThp = y_bhp[:, None]
            elif T == 1:
                y_bThp, final = ssd(x_c, dt_c, A, B, C, chunk_size=m.chunk_size, initial_state=state.ssm,
                                    impl="sequential")
            else:
                y_bThp, final = scan(cfg, x_c, dt_c, A, B, C, initial_state=state.ssm)
            window = jnp.concatenate([windows[part] for part in CONV_PARTS], axis=-1)  # [b, K-1+T, conv_dim]
            new_state = MambaState(take_rows(window, step.commit, K - 1), final)
        y_bThp = y_bThp + D.astype(f32)[:, None] * x_bThp

        y = GatedRMSNorm(n_groups=G, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, name="norm")(
            y_bThp.reshape(b, T, I), z)
        y = keep(self, "out_proj_in", y)  # zero already where dead: carries the router multiplier (after the norm)
        out = dense(cfg, cfg.hidden_size, ("ssm_heads", "embed"), name="out_proj", use_bias=m.proj_bias)(y)
        return out, (None if state is None else new_state)
