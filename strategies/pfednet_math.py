"""pFedNet maths (arXiv 2306.14483): similarity graph, server ADMM, update compression.

Steps and decision IDs (PF-1 .. PF-4) as defined in docs/pfednet.md (#the-algorithm, #decisions).

Kept apart from :mod:`strategies.pfednet` so that every formula can be checked against an
independent solver without Flower in the way. Numpy float64 for the server's small problems
(the personalised columns), torch for the hospital-side compression (it runs on the
hospital's device and may see millions of entries).

- Graph (step 1): symmetric k-NN graph over data sketches and its incidence matrix Q
  (column of edge (i, j) = e_i - e_j).
- Server step (step 4):
  ``min_Z (1/N)<G, Z> + lambda sum_m ||Z q_m||_2 + (1/2 eta)||Z - Z_t||_F^2``
  by ADMM with the splitting W = ZQ, using the deep code's sign convention; the inverse
  ``(I + eta rho QQ^T)^-1`` comes from one eigendecomposition of the Laplacian QQ^T (PF-4).
- Compression (PF-3): the fused-lasso proximal step
  ``y* = argmin gamma ||D(y - w)||_1 + (1/2 eta)||y - (w - eta g)||^2``, which with
  ``v = (w - y)/eta`` is ``v* = argmin 1/2 ||v - g||^2 + gamma ||D v||_1`` (w and eta cancel),
  solved by ADMM with ``(I + rho D^T D)^-1`` from the closed-form eigendecomposition of
  ``D^T D`` (PF-4), then STC ternarisation and DEFLATE.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.common.serde import array_record_to_proto, metric_record_to_proto

from fedclinic.errors import DataError

Metric = Literal["l1", "l2"]
CompressionMode = Literal["none", "stc", "fused-stc"]

# ------------------------------------------------------------------------------------ graph


def pairwise_distances(
    sketches: np.ndarray, metric: Metric, weights: np.ndarray | None = None
) -> np.ndarray:
    """``(N, N)`` distances between sketch rows: weighted L1 (covariance) or Euclidean."""
    sketches = np.asarray(sketches, dtype=np.float64)
    n = len(sketches)
    distances = np.zeros((n, n))
    for i in range(n):
        difference = sketches - sketches[i]
        if metric == "l1":
            absolute = np.abs(difference)
            distances[i] = absolute @ weights if weights is not None else absolute.sum(axis=1)
        else:
            distances[i] = np.sqrt((difference**2).sum(axis=1))
    return distances


def knn_edges(distances: np.ndarray, k: int) -> list[tuple[int, int]]:
    """Edges ``(i, j)``, i < j, of the symmetric k-NN graph: j among i's k nearest or i among j's.

    Ties are broken by the lower index, so the graph is a pure function of the distances.
    Each unordered pair appears once (the deep code's ``KNN.get_q_matrix``).
    """
    n = len(distances)
    k = min(k, n - 1)
    adjacency = np.zeros((n, n), dtype=bool)
    for i in range(n):
        others = sorted((float(distances[i, j]), j) for j in range(n) if j != i)
        for _, j in others[:k]:
            adjacency[i, j] = True
    symmetric = adjacency | adjacency.T
    return [(i, j) for i in range(n) for j in range(i + 1, n) if symmetric[i, j]]


def incidence_matrix(num_nodes: int, edges: Sequence[tuple[int, int]]) -> np.ndarray:
    """``Q`` of shape ``(N, |E|)``: the column of edge (i, j) is ``e_i - e_j``."""
    q = np.zeros((num_nodes, len(edges)))
    for m, (i, j) in enumerate(edges):
        q[i, m], q[j, m] = 1.0, -1.0
    return q


class GraphInverse:
    """PF-4: ``(I + c QQ^T)^-1 = P diag(1 / (1 + c sigma)) P^T`` from one eigendecomposition.

    QQ^T is the graph Laplacian (symmetric, positive semi-definite), decomposed once when
    the graph is built; each server step then needs only a diagonal rescaling.
    """

    def __init__(self, q: np.ndarray) -> None:
        self.q = np.asarray(q, dtype=np.float64)
        sigma, self.p = np.linalg.eigh(self.q @ self.q.T)
        self.sigma = np.clip(sigma, 0.0, None)  # round-off below zero on a PSD matrix

    def inverse(self, c: float) -> np.ndarray:
        return (self.p * (1.0 / (1.0 + c * self.sigma))) @ self.p.T


def group_soft_threshold(v: np.ndarray, threshold: float) -> np.ndarray:
    """Column-wise ``max(0, 1 - t/||v_m||) v_m``: the proximal map of ``t sum_m ||v_m||_2``."""
    norms = np.linalg.norm(v, axis=0)
    scale = np.where(norms > threshold, 1.0 - threshold / np.maximum(norms, 1e-300), 0.0)
    return v * scale


def personal_objective(
    z: np.ndarray, z_t: np.ndarray, g: np.ndarray, q: np.ndarray, lam: float, eta: float
) -> float:
    """The server's coupled proximal objective (step 4), for checks and logs."""
    n = z.shape[1]
    fusion = float(np.linalg.norm(z @ q, axis=0).sum()) if q.shape[1] else 0.0
    return float((g * z).sum() / n + lam * fusion + ((z - z_t) ** 2).sum() / (2 * eta))


def admm_personal_step(
    z_t: np.ndarray,
    g: np.ndarray,
    q: np.ndarray,
    lam: float,
    eta: float,
    rho: float = 1.0,
    iterations: int = 200,
    graph: GraphInverse | None = None,
) -> np.ndarray:
    """Solve ``min_Z (1/N)<G,Z> + lam sum_m ||Z q_m|| + (1/2 eta)||Z - Z_t||^2`` by ADMM.

    ``z_t`` and ``g`` are ``(d2, N)``: one column per hospital. Splitting W = ZQ with the
    deep code's updates (docs/pfednet.md), W and Omega starting at zero:

    - Z <- (Z_t + eta (Omega Q^T - G/N + rho W Q^T)) (I + eta rho QQ^T)^-1
    - W_m <- group soft threshold of u_m = Z q_m - Omega_m / rho at lam / rho
    - Omega <- Omega + rho (W - ZQ)
    """
    z_t = np.asarray(z_t, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    n = z_t.shape[1]
    if q.shape[1] == 0:  # no edges: independent proximal-gradient steps
        return z_t - eta * g / n
    graph = graph or GraphInverse(q)
    inverse = graph.inverse(eta * rho)
    w = np.zeros((z_t.shape[0], q.shape[1]))
    omega = np.zeros_like(w)
    z = z_t
    anchor = z_t - eta * g / n
    for _ in range(iterations):
        z = (anchor + eta * (omega @ q.T + rho * (w @ q.T))) @ inverse
        zq = z @ q
        w = group_soft_threshold(zq - omega / rho, lam / rho)
        omega = omega + rho * (w - zq)
    return z


# ------------------------------------------------------------------------------ compression


def difference_matrix(length: int) -> np.ndarray:
    """``D``: ``D_ii = 1``, ``D_{i,i+1} = -1``; the last row is ``e_L`` (PF-3)."""
    return np.eye(length) - np.eye(length, k=1)


@functools.lru_cache(maxsize=8)
def dtd_eigendecomposition(length: int) -> tuple[np.ndarray, np.ndarray]:
    """PF-4, closed form: ``D^T D = P diag(sigma) P^T`` without a numerical eigensolver.

    ``D^T D`` is tridiagonal with diagonal (1, 2, ..., 2) and off-diagonal -1 (a path
    Laplacian, free at the first end, fixed beyond the last). Its eigenvectors are
    ``cos((i + 1/2) theta_k)`` with ``theta_k = (2k - 1) pi / (2L + 1)`` and eigenvalues
    ``2 - 2 cos(theta_k)``. A generic ``eigh`` takes ~25 s at L = 3000 on a small CPU;
    this takes milliseconds, and is checked against ``eigh`` and ``inv`` in the tests.
    """
    k = np.arange(1, length + 1)
    theta = (2 * k - 1) * np.pi / (2 * length + 1)
    i = np.arange(length)[:, None] + 0.5
    p = np.cos(i * theta[None, :])
    p /= np.linalg.norm(p, axis=0, keepdims=True)
    return 2.0 - 2.0 * np.cos(theta), p


def _d(v: torch.Tensor) -> torch.Tensor:
    """``D v`` along dim 0 without forming D: ``v_i - v_{i+1}``, last entry ``v_L``."""
    return torch.cat([v[:-1] - v[1:], v[-1:]])


def _dt(r: torch.Tensor) -> torch.Tensor:
    """``D^T r``: ``r_0``, then ``r_i - r_{i-1}``."""
    return torch.cat([r[:1], r[1:] - r[:-1]])


def fused_lasso_denoise(
    g: torch.Tensor, gamma: float, rho: float = 1.0, iterations: int = 100
) -> torch.Tensor:
    """``argmin_v 1/2 ||v - g||^2 + gamma ||D v||_1`` for every column of ``g`` ``(L, m)``.

    ADMM with the split r = Dv (scaled dual u): v <- (I + rho D^T D)^-1 (g + rho D^T (r - u)),
    r <- soft(Dv + u, gamma / rho), u <- u + Dv - r, starting from v = g. The inverse is
    applied through the cached closed-form eigendecomposition (PF-4).
    """
    length = g.shape[0]
    sigma, p = dtd_eigendecomposition(length)
    p_t = torch.as_tensor(p, dtype=g.dtype, device=g.device)
    scale = torch.as_tensor(1.0 / (1.0 + rho * sigma), dtype=g.dtype, device=g.device)
    v = g.clone()
    r = _d(v)
    u = torch.zeros_like(r)
    threshold = gamma / rho
    for _ in range(iterations):
        rhs = g + rho * _dt(r - u)
        v = p_t @ (scale[:, None] * (p_t.T @ rhs))
        dv = _d(v)
        shifted = dv + u
        r = torch.sign(shifted) * torch.clamp(shifted.abs() - threshold, min=0.0)
        u = u + dv - r
    return v


def fused_lasso_prox(
    w: np.ndarray, g: np.ndarray, gamma: float, eta: float, rho: float = 1.0, iterations: int = 2000
) -> np.ndarray:
    """The PF-3 proximal step in its original variables:
    ``y* = argmin_y gamma ||D(y - w)||_1 + (1/2 eta)||y - (w - eta g)||^2``.

    Substituting ``y = w - eta v`` gives ``eta (gamma ||Dv||_1 + 1/2 ||v - g||^2)``, so
    ``y* = w - eta v*`` with ``v*`` from :func:`fused_lasso_denoise` at the same gamma.
    """
    v = fused_lasso_denoise(
        torch.as_tensor(np.asarray(g, dtype=np.float64)).reshape(-1, 1), gamma, rho, iterations
    )
    return np.asarray(w, dtype=np.float64) - eta * v[:, 0].numpy()


def ternarize(v: np.ndarray, ratio: float) -> tuple[np.ndarray, float, float]:
    """STC ternarisation (``Compress.get_topK``): codes in {-1, 0, 1} and the two levels.

    Positive entries at or above the ``1 - ratio`` quantile of ``max(v, 0)`` (taken over all
    entries) become their mean; negative entries likewise on ``max(-v, 0)``; the rest 0.
    """
    v = np.asarray(v, dtype=np.float64)
    codes = np.zeros(v.shape, dtype=np.int8)
    levels = [0.0, 0.0]
    for sign, slot in ((1.0, 0), (-1.0, 1)):
        part = np.clip(sign * v, 0.0, None)
        if not part.any():
            continue
        threshold = float(np.quantile(part, 1.0 - ratio))
        chosen = (part > 0) & (part >= threshold)
        codes[chosen] = int(sign)
        levels[slot] = float(v[chosen].mean())
    return codes, levels[0], levels[1]


def compress_update(
    g: np.ndarray,
    mode: CompressionMode,
    gamma: float,
    ratio: float,
    chunk: int = 3000,
    rho: float = 1.0,
    iterations: int = 100,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, float, float]:
    """Codes and levels of a pseudo-gradient ``g`` (1-D) under ``stc`` or ``fused-stc``.

    ``fused-stc`` first replaces each chunk of ``chunk`` entries by its fused-lasso proximal
    point, clipped to the chunk's [min g, max g] (PF-3). ``gamma`` is relative to the
    RMS of ``g`` (PF-3 in docs/pfednet.md: the reference's absolute gamma = 50 zeroes any
    update whose partial sums stay below 50), so the solve runs on ``g / rms`` with rho = 1.
    """
    g = np.asarray(g, dtype=np.float64).reshape(-1)
    if mode == "fused-stc" and g.size:
        g = _fused_chunks(g, gamma, chunk, rho, iterations, torch.device(device))
    return ternarize(g, ratio)


def _fused_chunks(
    g: np.ndarray, gamma: float, chunk: int, rho: float, iterations: int, device: torch.device
) -> np.ndarray:
    rms = float(np.sqrt(np.mean(g**2)))
    if rms == 0.0:
        return g.copy()
    out = np.empty_like(g)
    full = (g.size // chunk) * chunk
    pieces = [(0, full, chunk)] if full else []
    if g.size > full:
        pieces.append((full, g.size, g.size - full))
    for start, stop, length in pieces:
        block = g[start:stop].reshape(-1, length).T  # (length, chunks)
        tensor = torch.as_tensor(block / rms, dtype=torch.float64, device=device)
        v = fused_lasso_denoise(tensor, gamma, rho, iterations).cpu().numpy() * rms
        v = np.clip(v, block.min(axis=0), block.max(axis=0))
        out[start:stop] = v.T.reshape(-1)
    return out


# --------------------------------------------------------------------------- wire encoding


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """Ternary codes as DEFLATE-compressed bit planes (non-zero mask, then signs of non-zeros)."""
    nonzero = codes != 0
    planes = np.concatenate([np.packbits(nonzero), np.packbits(codes[nonzero] < 0)])
    return np.frombuffer(zlib.compress(planes.tobytes(), 9), dtype=np.uint8).copy()


def unpack_codes(packed: np.ndarray, length: int) -> np.ndarray:
    raw = np.frombuffer(zlib.decompress(np.asarray(packed, dtype=np.uint8).tobytes()), np.uint8)
    mask_bytes = (length + 7) // 8
    nonzero = np.unpackbits(raw[:mask_bytes], count=length).astype(bool)
    count = int(nonzero.sum())
    negative = np.unpackbits(raw[mask_bytes:], count=count).astype(bool)
    codes = np.zeros(length, dtype=np.int8)
    codes[nonzero] = np.where(negative, -1, 1)
    return codes


def encode_update(
    g: np.ndarray, prefix: str, mode: CompressionMode, **compression: float
) -> dict[str, np.ndarray]:
    """Arrays that carry the flat update ``g``: float32 as is, or packed ternary codes."""
    g = np.asarray(g, dtype=np.float64).reshape(-1)
    if mode == "none":
        return {f"{prefix}delta": g.astype(np.float32)}
    codes, positive, negative = compress_update(g, mode, **compression)  # type: ignore[arg-type]
    return {
        f"{prefix}codes": pack_codes(codes),
        f"{prefix}levels": np.array([positive, negative], dtype=np.float32),
        f"{prefix}length": np.array([g.size], dtype=np.int64),
    }


def decode_update(arrays: Mapping[str, np.ndarray], prefix: str, length: int) -> np.ndarray:
    """The flat float64 update from :func:`encode_update`'s arrays; DataError when malformed."""
    if f"{prefix}delta" in arrays:
        delta = np.asarray(arrays[f"{prefix}delta"], dtype=np.float64).reshape(-1)
        if delta.size != length:
            raise DataError(f"update '{prefix}delta' has {delta.size} entries; expected {length}")
        return delta
    if f"{prefix}codes" not in arrays or f"{prefix}levels" not in arrays:
        raise DataError(f"update carries neither '{prefix}delta' nor '{prefix}codes'")
    sent = int(np.asarray(arrays.get(f"{prefix}length", [-1])).reshape(-1)[0])
    if sent != length:
        raise DataError(f"compressed update '{prefix}' has length {sent}; expected {length}")
    try:
        codes = unpack_codes(arrays[f"{prefix}codes"], length)
    except (zlib.error, ValueError) as err:
        raise DataError(f"compressed update '{prefix}codes' is corrupt: {err}") from None
    levels = np.asarray(arrays[f"{prefix}levels"], dtype=np.float64).reshape(-1)
    if levels.size != 2 or not np.isfinite(levels).all():
        raise DataError(f"compressed update '{prefix}levels' must hold 2 finite numbers")
    return np.where(codes > 0, levels[0], np.where(codes < 0, levels[1], 0.0))


# --------------------------------------------------------------------------- byte accounting


def record_bytes(record: ArrayRecord | MetricRecord) -> tuple[int, int]:
    """Serialized protobuf size of a record and its DEFLATE-compressed size (zlib level 6).

    The protobuf carries every array's bytes, dtype, shape and key: what crosses the wire
    (Flower may further split arrays into deduplicated chunks; that saving is not counted).
    """
    if isinstance(record, ArrayRecord):
        payload = array_record_to_proto(record).SerializeToString()
    else:
        payload = metric_record_to_proto(record).SerializeToString()
    return len(payload), len(zlib.compress(payload, 6))


# --------------------------------------------------------------------------------- sketches


def _pool(inputs: torch.Tensor, max_size: int) -> torch.Tensor:
    """Images larger than ``max_size`` are average-pooled to at most ``max_size`` per side."""
    if inputs.ndim == 4 and max(inputs.shape[-2:]) > max_size:
        height = min(inputs.shape[-2], max_size)
        width = min(inputs.shape[-1], max_size)
        return torch.nn.functional.adaptive_avg_pool2d(inputs, (height, width))
    return inputs


def covariance_sketch(inputs: torch.Tensor, max_size: int = 32) -> np.ndarray:
    """The deep code's ``cov``, upper triangle (diagonal included) as a flat vector.

    X = inputs minus their overall (scalar) mean, reshaped to (B*C, H*W); sketch = X^T X / (B*C).
    Tabular inputs (B, F) are treated as (B, 1, 1, F). The full symmetric matrix is
    recovered from the triangle, so distances equal the deep code's (see
    :func:`triangle_weights`) at half the bytes.
    """
    x = _pool(inputs.detach().to(torch.float64).cpu(), max_size)
    if x.ndim == 2:
        x = x[:, None, None, :]
    b, c = x.shape[0], x.shape[1]
    flat = (x - x.mean()).reshape(b * c, -1)
    covariance = flat.T @ flat / (b * c)
    rows, cols = np.triu_indices(covariance.shape[0])
    return covariance.numpy()[rows, cols]


def covariance_shape(inputs: torch.Tensor, max_size: int = 32) -> tuple[int, int, str]:
    """Rows and columns of the matrix X whose X^T X/rows is the covariance sketch, and what a
    column is ("28x28 pixels", "13 features"). With fewer rows than columns the covariance
    has rank at most rows: it reveals the span of the hospital's centred images."""
    if inputs.ndim == 2:
        return int(inputs.shape[0]), int(inputs.shape[1]), f"{inputs.shape[1]} features"
    height, width = (min(int(side), max_size) for side in inputs.shape[-2:])
    rows = int(inputs.shape[0]) * int(inputs.shape[1])
    return rows, height * width, f"{height * width} pixels ({height}x{width})"


def triangle_weights(size: int) -> np.ndarray:
    """Weights that make an L1 distance on upper triangles equal the full-matrix L1 distance."""
    side = round(float(np.sqrt(8 * size + 1) - 1) / 2)
    if side * (side + 1) // 2 != size:
        raise DataError(f"a covariance sketch of {size} entries is not a triangle")
    rows, cols = np.triu_indices(side)
    return np.where(rows == cols, 1.0, 2.0)


def feature_mean_sketch(inputs: torch.Tensor, max_size: int = 32) -> np.ndarray:
    """Mean training input (the convex code's ``'data'`` sketch), pooled like the covariance."""
    x = _pool(inputs.detach().to(torch.float64).cpu(), max_size)
    return x.mean(dim=0).reshape(-1).numpy()


def noisy_counts(counts: Sequence[float], epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """PF-1 option: class counts under the Laplace mechanism, epsilon-DP for one record.

    Replacing one training record moves one count down and another up by 1: L1 sensitivity
    2, so Laplace noise of scale 2/epsilon per count; negative results are clipped to 0
    (post-processing keeps the guarantee).
    """
    exact = np.asarray(counts, dtype=np.float64)
    return np.clip(exact + rng.laplace(0.0, 2.0 / epsilon, size=exact.shape), 0.0, None)


@dataclass(frozen=True)
class Graph:
    """The similarity graph the server builds once: hospitals (sorted), edges, Q, inverse."""

    hospitals: tuple[str, ...]
    edges: tuple[tuple[int, int], ...]
    q: np.ndarray
    inverse: GraphInverse

    @classmethod
    def build(cls, hospitals: Sequence[str], distances: np.ndarray, k: int) -> Graph:
        edges = tuple(knn_edges(distances, k))
        q = incidence_matrix(len(hospitals), edges)
        return cls(tuple(hospitals), edges, q, GraphInverse(q))

    def named_edges(self) -> list[list[str]]:
        return [[self.hospitals[i], self.hospitals[j]] for i, j in self.edges]
