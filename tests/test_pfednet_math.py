"""pFedNet maths against independent computations: scipy solvers, sklearn, numpy.linalg."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.serde import array_record_to_proto
from scipy.optimize import lsq_linear, minimize
from sklearn.neighbors import kneighbors_graph

from fedclinic.errors import DataError
from strategies import pfednet_math as pm

# ------------------------------------------------------------------------------------ graph


def test_knn_edges_match_sklearn_symmetrised() -> None:
    rng = np.random.default_rng(0)
    sketches = rng.normal(size=(7, 4))
    distances = pm.pairwise_distances(sketches, "l2")
    for k in (1, 2, 3):
        adjacency = kneighbors_graph(sketches, k, mode="connectivity").toarray() > 0
        union = adjacency | adjacency.T
        expected = [(i, j) for i in range(7) for j in range(i + 1, 7) if union[i, j]]
        assert pm.knn_edges(distances, k) == expected


def test_knn_by_hand_and_k_capped() -> None:
    # points on a line at 0, 1, 3, 10: 1-NN of 0 is 1, of 1 is 0, of 3 is 1, of 10 is 3
    distances = pm.pairwise_distances(np.array([[0.0], [1.0], [3.0], [10.0]]), "l2")
    assert pm.knn_edges(distances, 1) == [(0, 1), (1, 2), (2, 3)]
    assert pm.knn_edges(distances, 10) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert pm.knn_edges(np.zeros((1, 1)), 3) == []


def test_incidence_matrix_and_laplacian() -> None:
    edges = [(0, 1), (1, 2), (0, 3)]
    q = pm.incidence_matrix(4, edges)
    assert q.shape == (4, 3)
    assert q[:, 0].tolist() == [1, -1, 0, 0] and q[:, 2].tolist() == [1, 0, 0, -1]
    adjacency = np.zeros((4, 4))
    for i, j in edges:
        adjacency[i, j] = adjacency[j, i] = 1
    np.testing.assert_array_equal(q @ q.T, np.diag(adjacency.sum(1)) - adjacency)


def test_weighted_l1_on_triangles_equals_full_matrix_l1() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
    ca, cb = a.T @ a, b.T @ b  # symmetric 6x6
    rows, cols = np.triu_indices(6)
    sketches = np.stack([ca[rows, cols], cb[rows, cols]])
    distances = pm.pairwise_distances(sketches, "l1", pm.triangle_weights(sketches.shape[1]))
    assert distances[0, 1] == pytest.approx(np.abs(ca - cb).sum(), rel=1e-12)
    with pytest.raises(DataError):
        pm.triangle_weights(5)


def test_covariance_sketch_matches_reference_formula() -> None:
    x = torch.rand(6, 2, 4, 4)
    centred = (x.double() - x.double().mean()).reshape(12, 16)
    full = (centred.T @ centred / 12).numpy()
    rows, cols = np.triu_indices(16)
    np.testing.assert_allclose(pm.covariance_sketch(x, 32), full[rows, cols], atol=1e-12)
    assert pm.covariance_sketch(torch.rand(3, 1, 40, 40), 8).size == 64 * 65 // 2  # pooled


def test_noisy_counts_scale() -> None:
    rng = np.random.default_rng(2)
    noise = np.array([pm.noisy_counts([1e6, 1e6], 0.5, rng) for _ in range(4000)]) - 1e6
    # Laplace(b = 2/epsilon = 4): mean absolute deviation b
    assert np.abs(noise).mean() == pytest.approx(4.0, rel=0.1)


# ------------------------------------------------------------------------------ server ADMM


def test_graph_inverse_equals_numpy_inv() -> None:
    q = pm.incidence_matrix(5, [(0, 1), (1, 2), (2, 3), (3, 4), (0, 4), (1, 3)])
    graph = pm.GraphInverse(q)
    for c in (0.01, 1.0, 5.0):
        np.testing.assert_allclose(
            graph.inverse(c), np.linalg.inv(np.eye(5) + c * q @ q.T), atol=1e-12
        )


def _dual_solution(a: np.ndarray, q: np.ndarray, c: float) -> np.ndarray:
    """Independent solve of prox_{c sum ||Z q_m||}(A) through its dual, by scipy SLSQP:
    Z = A - Y Q^T with Y = argmin 1/2 ||A - Y Q^T||^2 subject to ||Y_m|| <= c."""
    d, e = a.shape[0], q.shape[1]

    def objective(y: np.ndarray) -> float:
        return 0.5 * float(((a - y.reshape(d, e) @ q.T) ** 2).sum())

    def gradient(y: np.ndarray) -> np.ndarray:
        return (-(a - y.reshape(d, e) @ q.T) @ q).ravel()

    constraints = [
        {"type": "ineq", "fun": lambda y, m=m: c**2 - float((y.reshape(d, e)[:, m] ** 2).sum())}
        for m in range(e)
    ]
    result = minimize(
        objective,
        np.zeros(d * e),
        jac=gradient,
        constraints=constraints,
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 2000},
    )
    return a - result.x.reshape(d, e) @ q.T


@pytest.mark.parametrize(("lam", "eta"), [(0.3, 2.0), (0.05, 4.0), (2.0, 0.5)])
def test_admm_matches_independent_solver(lam: float, eta: float) -> None:
    rng = np.random.default_rng(3)
    d, n = 3, 4
    q = pm.incidence_matrix(n, [(0, 1), (1, 2), (2, 3), (0, 2)])
    z_t, g = rng.normal(size=(d, n)), rng.normal(size=(d, n))
    z = pm.admm_personal_step(z_t, g, q, lam, eta, rho=1.0, iterations=3000)
    expected = _dual_solution(z_t - eta * g / n, q, eta * lam)
    np.testing.assert_allclose(z, expected, atol=1e-5)
    # and it is the minimum of the stated objective: no random perturbation does better
    best = pm.personal_objective(z, z_t, g, q, lam, eta)
    for _ in range(50):
        other = z + 1e-3 * rng.normal(size=z.shape)
        assert pm.personal_objective(other, z_t, g, q, lam, eta) >= best - 1e-12


def test_admm_two_hospitals_closed_form() -> None:
    """One edge: each column moves eta*lam towards the other, or both meet at the mean."""
    a = np.array([[1.0, -1.0], [0.0, 0.0]])  # columns (1,0) and (-1,0): distance 2
    q = pm.incidence_matrix(2, [(0, 1)])
    zero = np.zeros_like(a)
    z = pm.admm_personal_step(a, zero, q, lam=0.25, eta=2.0, iterations=2000)  # c = 0.5
    np.testing.assert_allclose(z, [[0.5, -0.5], [0.0, 0.0]], atol=1e-8)
    z = pm.admm_personal_step(a, zero, q, lam=1.0, eta=2.0, iterations=2000)  # c = 2 >= 1
    np.testing.assert_allclose(z, np.zeros_like(a), atol=1e-8)


def test_admm_limits_local_and_full_fusion() -> None:
    rng = np.random.default_rng(4)
    q = pm.incidence_matrix(3, [(0, 1), (1, 2)])
    z_t, g = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    local = pm.admm_personal_step(z_t, g, q, lam=0.0, eta=3.0)
    np.testing.assert_allclose(local, z_t - g, atol=1e-10)  # eta = N keeps the full step
    fused = pm.admm_personal_step(z_t, g, q, lam=100.0, eta=3.0, iterations=500)
    mean = (z_t - g).mean(axis=1, keepdims=True)
    np.testing.assert_allclose(fused, np.repeat(mean, 3, axis=1), atol=1e-6)
    no_edges = pm.admm_personal_step(z_t, g, np.zeros((3, 0)), lam=5.0, eta=0.01)
    np.testing.assert_allclose(no_edges, z_t - 0.01 * g / 3)


# ---------------------------------------------------------------------------- compression


def test_dtd_closed_form_eigendecomposition() -> None:
    for length in (1, 2, 9, 64):
        sigma, p = pm.dtd_eigendecomposition(length)
        d = pm.difference_matrix(length)
        np.testing.assert_allclose(p @ np.diag(sigma) @ p.T, d.T @ d, atol=1e-12)
        np.testing.assert_allclose(p.T @ p, np.eye(length), atol=1e-12)
        np.testing.assert_allclose(np.sort(sigma), np.linalg.eigvalsh(d.T @ d), atol=1e-12)
        for k in (0.05, 1.0):
            inverse = (p * (1 / (1 + k * sigma))) @ p.T
            np.testing.assert_allclose(
                inverse, np.linalg.inv(np.eye(length) + k * d.T @ d), atol=1e-12
            )


def test_difference_matrix_shape() -> None:
    d = pm.difference_matrix(3)
    np.testing.assert_array_equal(d, [[1, -1, 0], [0, 1, -1], [0, 0, 1]])
    v = torch.tensor([[3.0], [1.0], [2.0]], dtype=torch.float64)
    np.testing.assert_array_equal(pm._d(v)[:, 0].numpy(), d @ [3.0, 1.0, 2.0])
    np.testing.assert_array_equal(pm._dt(v)[:, 0].numpy(), d.T @ [3.0, 1.0, 2.0])


def _direct_fused_lasso(g: np.ndarray, gamma: float) -> np.ndarray:
    """argmin 1/2||v - g||^2 + gamma ||Dv||_1 via its box-constrained dual (scipy BVLS):
    v = g - D^T s with s = argmin ||D^T s - g|| subject to |s| <= gamma."""
    d = pm.difference_matrix(g.size)
    s = lsq_linear(d.T, g, bounds=(-gamma, gamma), method="bvls", tol=1e-14).x
    return g - d.T @ s


@pytest.mark.parametrize("gamma", [0.02, 0.2, 1.0])
def test_fused_lasso_matches_direct_solve(gamma: float) -> None:
    rng = np.random.default_rng(5)
    g = np.repeat(rng.normal(size=6), 5) + 0.1 * rng.normal(size=30)
    v = pm.fused_lasso_denoise(torch.tensor(g).reshape(-1, 1), gamma, iterations=4000)
    np.testing.assert_allclose(v[:, 0].numpy(), _direct_fused_lasso(g, gamma), atol=1e-5)


def test_fused_lasso_prox_in_original_variables() -> None:
    """The section 2.5 problem in y (with w and eta) against a direct scipy solve."""
    rng = np.random.default_rng(6)
    length, gamma, eta = 12, 0.3, 0.01
    w, g = rng.normal(size=length), rng.normal(size=length)
    y = pm.fused_lasso_prox(w, g, gamma, eta, iterations=4000)
    np.testing.assert_allclose(y, w - eta * _direct_fused_lasso(g, gamma), atol=1e-7)
    d = pm.difference_matrix(length)

    def objective(candidate: np.ndarray) -> float:
        penalty = gamma * np.abs(d @ (candidate - w)).sum()
        return float(penalty + ((candidate - (w - eta * g)) ** 2).sum() / (2 * eta))

    for _ in range(50):
        assert objective(y + 1e-4 * rng.normal(size=length)) >= objective(y) - 1e-12


def test_ternarize_by_hand() -> None:
    v = np.array([5.0, 4.0, 1.0, 0.0, -1.0, -3.0, -6.0, 2.0, 0.5, -0.5])
    codes, positive, negative = pm.ternarize(v, 0.2)
    # quantile 0.8 of max(v, 0) = [5,4,1,0,0,0,0,2,.5,0] is 2.6: entries 5 and 4
    # quantile 0.8 of max(-v, 0) = [0,0,0,0,1,3,6,0,0,.5] is 1.4: entries -3 and -6
    assert codes.tolist() == [1, 1, 0, 0, 0, -1, -1, 0, 0, 0]
    assert positive == pytest.approx(4.5) and negative == pytest.approx(-4.5)
    assert pm.ternarize(np.zeros(4), 0.2)[0].tolist() == [0, 0, 0, 0]


def test_encode_decode_roundtrip() -> None:
    rng = np.random.default_rng(7)
    g = rng.normal(size=1001)
    plain = pm.decode_update(pm.encode_update(g, "p.", "none"), "p.", 1001)
    np.testing.assert_allclose(plain, g.astype(np.float32))
    arrays = pm.encode_update(g, "p.", "stc", gamma=1.0, ratio=0.2)
    codes, positive, negative = pm.ternarize(g, 0.2)
    decoded = pm.decode_update(arrays, "p.", 1001)
    expected = np.where(codes > 0, positive, np.where(codes < 0, negative, 0.0))
    np.testing.assert_allclose(decoded, expected, rtol=1e-6)
    fused = pm.encode_update(g, "p.", "fused-stc", gamma=1.0, ratio=0.2, chunk=300, iterations=30)
    assert pm.decode_update(fused, "p.", 1001).shape == (1001,)
    with pytest.raises(DataError, match="length"):
        pm.decode_update(arrays, "p.", 1000)
    with pytest.raises(DataError, match="corrupt"):
        pm.decode_update({**arrays, "p.codes": np.array([1, 2, 3], np.uint8)}, "p.", 1001)
    with pytest.raises(DataError, match="neither"):
        pm.decode_update({}, "p.", 3)


def test_fused_chunks_equal_per_chunk_solves() -> None:
    rng = np.random.default_rng(8)
    g = rng.normal(size=25)
    out = pm._fused_chunks(g, 0.5, chunk=10, rho=1.0, iterations=3000, device=torch.device("cpu"))
    rms = np.sqrt(np.mean(g**2))
    for start, stop in ((0, 10), (10, 20), (20, 25)):
        piece = g[start:stop]
        expected = np.clip(_direct_fused_lasso(piece / rms, 0.5) * rms, piece.min(), piece.max())
        np.testing.assert_allclose(out[start:stop], expected, atol=1e-6)


def test_record_bytes_is_the_serialized_protobuf() -> None:
    record = ArrayRecord({"a": Array(np.arange(1000, dtype=np.float32))})
    raw, deflated = pm.record_bytes(record)
    assert raw == len(array_record_to_proto(record).SerializeToString())
    assert 4000 < raw < 4200  # 1000 float32 plus keys, dtype and shape
    assert deflated < raw
    serialized = array_record_to_proto(record).SerializeToString()
    assert deflated == len(zlib.compress(serialized, 6))
    zeros = ArrayRecord({"a": Array(np.zeros(1000, dtype=np.float32))})
    assert pm.record_bytes(zeros)[1] < 200  # DEFLATE collapses a constant payload
