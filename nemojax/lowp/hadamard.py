"""Random Hadamard transform for the NVFP4 wgrad GEMM inputs (arXiv 2509.25149; docs/formats.md 5).

R = D . H16 / 4 with H16 the Sylvester Hadamard matrix and D = diag(RHT_SIGNS), the fixed sign vector TE uses for
every layer and step. R is orthonormal (R R^T = I), so (X R)(Y R)^T = X Y^T: transforming both operands of a GEMM
along its contraction axis leaves the product unchanged while spreading outliers over 16 elements before the amax
and block scales are taken. The transform acts on groups of 16 contiguous elements along `axis`, right-multiplied
by R (TE: x.reshape(-1, 16) @ R).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

RHT_SIZE = 16
RHT_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


def hadamard_matrix(n: int = RHT_SIZE) -> np.ndarray:
    """Sylvester Hadamard matrix, float32 [n, n] with entries +-1; n a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"n={n}; allowed: a power of two")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def rht_matrix() -> np.ndarray:
    """R = D . H16 / 4, float32 [16, 16] (orthonormal; exact in f32 since entries are +-1/4)."""
    return (np.asarray(RHT_SIGNS, np.float32)[:, None] * hadamard_matrix(RHT_SIZE)) / np.float32(4.0)


def _apply(x: jax.Array, axis: int, m: np.ndarray) -> jax.Array:
    x = jnp.asarray(x)
    if not isinstance(axis, int) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis={axis!r} is out of range for an array of rank {x.ndim}")
    n = x.shape[axis]
    if n % RHT_SIZE:
        raise ValueError(f"x.shape[{axis}]={n}; allowed: a multiple of {RHT_SIZE} (the RHT acts on groups of 16)")
    xm = jnp.moveaxis(x, axis, -1).astype(jnp.float32)
    g = xm.reshape(*xm.shape[:-1], n // RHT_SIZE, RHT_SIZE)
    # einsum "...gi,ij->...gj": each group of 16 right-multiplied by the 16x16 matrix.
    y = jnp.einsum("...gi,ij->...gj", g, jnp.asarray(m), precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(y.reshape(xm.shape), -1, axis).astype(x.dtype)


def rht(x: jax.Array, axis: int = -1) -> jax.Array:
    """x [...] -> x R on groups of 16 along `axis` (same shape and dtype; f32 math). x.shape[axis] % 16 == 0."""
    return _apply(x, axis, rht_matrix())


def inverse_rht(y: jax.Array, axis: int = -1) -> jax.Array:
    """Inverse of rht: y [...] -> y R^T on groups of 16 along `axis`."""
    return _apply(y, axis, rht_matrix().T)
