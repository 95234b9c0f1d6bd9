"""The spectrum engine against dense float64 references computed here with torch.linalg."""

from __future__ import annotations

import math

import pytest
import torch

from lora_monitor.spectrum import (
    LinearOperator,
    condition_number,
    decomposition_dtype,
    effective_rank,
    energy_curve,
    factored_svd,
    lora_spectra,
    lora_step_spectra,
    randomized_svd,
    rank_for_energy,
    spectral_norm,
    stable_rank,
    truncate_factors,
    truncate_many,
)


def dense_svd(B, A, scale=1.0):
    return torch.linalg.svd(scale * B.double() @ A.double(), full_matrices=False)


def assert_spectrum_close(S, reference, rtol=1e-5):
    reference = reference[: S.shape[-1]].double()
    assert torch.allclose(S.double().cpu(), reference, rtol=rtol, atol=rtol * float(reference.max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_factored_svd_matches_dense_for_each_factor_dtype(dtype):
    generator = torch.Generator().manual_seed(0)
    B = torch.randn(96, 8, generator=generator).to(dtype)
    A = (torch.randn(8, 40, generator=generator) * torch.logspace(0, -2, 8)[:, None]).to(dtype)
    U, S, V = factored_svd(B, A, scale=0.75)
    _, reference, _ = dense_svd(B, A, 0.75)
    assert_spectrum_close(S, reference)
    # The vectors rebuild the delta and are orthonormal.
    rebuilt = (U.double() * S) @ V.double().T
    assert torch.allclose(rebuilt, 0.75 * B.double() @ A.double(), atol=1e-5 * float(reference[0]))
    assert torch.allclose(U.T.double() @ U.double(), torch.eye(8, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(V.T.double() @ V.double(), torch.eye(8, dtype=torch.float64), atol=1e-5)
    assert U.dtype == torch.float32


def test_float64_on_request_is_exact():
    generator = torch.Generator().manual_seed(1)
    B, A = torch.randn(50, 6, generator=generator), torch.randn(6, 30, generator=generator)
    U, S, _ = factored_svd(B, A, dtype=torch.float64)
    assert U.dtype == torch.float64
    assert_spectrum_close(S, dense_svd(B, A)[1], rtol=1e-10)


def test_stacks_lists_ragged_ranks_and_top_k():
    generator = torch.Generator().manual_seed(2)
    Bs, As = torch.randn(5, 32, 6, generator=generator), torch.randn(5, 6, 20, generator=generator)
    stacked = factored_svd(Bs, As, scale=torch.linspace(0.5, 2.5, 5), k=3)
    assert stacked.U.shape == (5, 32, 3) and stacked.S.shape == (5, 3) and stacked.V.shape == (5, 20, 3)
    for i, scale in enumerate(torch.linspace(0.5, 2.5, 5).tolist()):
        assert_spectrum_close(stacked.S[i], dense_svd(Bs[i], As[i], scale)[1])

    ragged_B = [torch.randn(16, 4, generator=generator), torch.randn(24, 7, generator=generator)]
    ragged_A = [torch.randn(4, 10, generator=generator), torch.randn(7, 12, generator=generator)]
    results = factored_svd(ragged_B, ragged_A, scale=[1.0, -2.0])
    assert [r.S.shape[0] for r in results] == [4, 7]
    assert_spectrum_close(results[1].S, dense_svd(ragged_B[1], ragged_A[1], 2.0)[1])
    # A negative scale is carried by the vectors, the singular values stay non-negative.
    rebuilt = (results[1].U.double() * results[1].S) @ results[1].V.double().T
    assert torch.allclose(rebuilt, -2.0 * ragged_B[1].double() @ ragged_A[1].double(), atol=1e-4)

    spectra = lora_spectra(ragged_B, ragged_A, [1.0, -2.0])
    assert spectra.delta.shape == (2, 7)
    assert torch.all(spectra.delta[0, 4:] == 0)
    assert_spectrum_close(spectra.A[1], torch.linalg.svdvals(ragged_A[1].double()))
    assert_spectrum_close(spectra.B[0, :4], torch.linalg.svdvals(ragged_B[0].double()))
    # Only the deltas' values: the same ones, without the factors'.
    deltas_only = lora_spectra(ragged_B, ragged_A, [1.0, -2.0], of_factors=False)
    assert deltas_only.A is None and deltas_only.B is None
    assert torch.allclose(deltas_only.delta, spectra.delta, rtol=1e-6, atol=1e-6 * float(spectra.delta.max()))


def test_rank_deficient_and_zero_factors():
    generator = torch.Generator().manual_seed(3)
    collapsed_B = torch.randn(40, 1, generator=generator) @ torch.randn(1, 8, generator=generator)
    A = torch.randn(8, 30, generator=generator)
    spectra = lora_spectra(collapsed_B, A, dtype=torch.float64)
    assert spectra.delta[0, 1:].abs().max() == 0  # exactly rank 1, not sqrt(eps) noise
    assert effective_rank(spectra.delta[0]).item() == pytest.approx(1.0)
    assert condition_number(collapsed_B).item() == math.inf
    # Without the factors' eigenvalues the collapse is found from the Cholesky pivots: still exactly rank 1.
    deltas_only = lora_spectra(collapsed_B, A, dtype=torch.float64, of_factors=False).delta
    assert deltas_only[0, 1:].abs().max() == 0
    assert torch.allclose(deltas_only, spectra.delta, rtol=1e-12)

    zero = lora_spectra(torch.zeros(40, 8), A)
    assert torch.all(zero.delta == 0)
    assert torch.all(lora_spectra(torch.zeros(40, 8), A, of_factors=False).delta == 0)
    assert effective_rank(zero.delta[0]).item() == 0.0
    assert torch.isnan(energy_curve(zero.delta[0])).all()
    assert rank_for_energy(zero.delta[0], 0.9) == 0


def test_truncate_factors_is_the_best_rank_k_approximation_and_maps_make_the_factors():
    generator = torch.Generator().manual_seed(4)
    B = torch.randn(64, 12, generator=generator, dtype=torch.float64).to(torch.bfloat16)
    A = torch.randn(12, 48, generator=generator, dtype=torch.float64).to(torch.bfloat16)
    result = truncate_factors(B, A, 5)
    assert result.B.dtype == torch.bfloat16 and result.B.shape == (64, 5) and result.A.shape == (5, 48)
    U, S, Vh = dense_svd(B, A)
    best = (U[:, :5] * S[:5]) @ Vh[:5]
    exact = truncate_factors(B.double(), A.double(), 5, dtype=torch.float64)
    assert torch.allclose(exact.B @ exact.A, best, atol=1e-9 * float(S[0]))
    assert torch.allclose(B.double() @ exact.map_B, exact.B, atol=1e-9 * float(S[0]))
    assert torch.allclose(exact.map_A @ A.double(), exact.A, atol=1e-9 * float(S[0]))
    assert result.retained == pytest.approx(float((S[:5] ** 2).sum() / (S**2).sum()), rel=1e-6)
    # √S is split evenly: both new factors have singular values √S_k.
    assert torch.allclose(torch.linalg.svdvals(exact.B), S[:5].sqrt(), rtol=1e-9)
    with pytest.raises(ValueError, match="at least 1"):
        truncate_factors(B, A, 0)


def test_lora_step_spectra_match_the_dense_first_order_change():
    generator = torch.Generator().manual_seed(8)
    # Two ranks (two groups), gradients a million times smaller than the weights, a zero ∇B, a zero B
    # (PEFT's first step: the step's left factor has a zero half) and a B with two repeated columns (the
    # left Gram matrix is singular without being zero: the floored route, decided from Cholesky pivots).
    shapes = [(48, 6, 40), (56, 4, 32), (40, 6, 64), (48, 6, 40), (40, 6, 48)]
    Bs = [torch.randn(m, r, generator=generator, dtype=torch.float64) for m, r, _ in shapes]
    As = [torch.randn(r, n, generator=generator, dtype=torch.float64) for _, r, n in shapes]
    grads_B = [1e-6 * torch.randn(B.shape, generator=generator, dtype=torch.float64) for B in Bs]
    grads_A = [1e-6 * torch.randn(A.shape, generator=generator, dtype=torch.float64) for A in As]
    grads_B[2] = torch.zeros_like(grads_B[2])
    Bs[3] = torch.zeros_like(Bs[3])
    Bs[4][:, 4:] = Bs[4][:, :2]
    grads_B[4][:, 4:] = grads_B[4][:, :2]
    scales = [0.5, -2.0, 1.0, 2.0, 1.0]
    spectra = lora_step_spectra(grads_B, Bs, As, grads_A, scales, dtype=torch.float64)
    assert spectra.shape == (5, 12) and spectra.dtype == torch.float64
    for index, (gB, B, A, gA) in enumerate(zip(grads_B, Bs, As, grads_A, strict=True)):
        change = abs(scales[index]) * (gB @ A + B @ gA)
        reference = torch.linalg.svdvals(change)[: 2 * A.shape[0]]
        assert_spectrum_close(spectra[index, : 2 * A.shape[0]], reference, rtol=1e-8)
        # Directions the change does not have are exactly zero, not rounding noise.
        assert int((spectra[index] > 0).sum()) == int(torch.linalg.matrix_rank(change))
        assert (spectra[index, 2 * A.shape[0] :] == 0).all()
    rough = lora_step_spectra([g.float() for g in grads_B], Bs, As, grads_A, scales)
    assert_spectrum_close(rough[0, :12], spectra[0], rtol=1e-4)


def test_lora_step_spectra_refuse_gradients_not_shaped_like_their_factors():
    B, A = torch.randn(8, 2), torch.randn(2, 6)
    with pytest.raises(
        ValueError, match=r"pair 1: gradients \(7, 2\) and \(2, 6\) are not shaped like B \(8, 2\)"
    ):
        lora_step_spectra([B, torch.randn(7, 2)], [B, B], [A, A], [A, A])
    with pytest.raises(ValueError, match="got 2 ∇B, 2 B, 1 A and 2 ∇A"):
        lora_step_spectra([B, B], [B, B], [A], [A, A])


def test_truncate_many_gives_each_pair_its_own_best_rank_k_approximation():
    generator = torch.Generator().manual_seed(5)
    # Mixed shapes, ranks (two groups) and targets, a zero B (PEFT's initialisation), and k above the rank.
    shapes = [(64, 12, 48), (80, 12, 40), (32, 6, 72), (48, 12, 48), (40, 6, 56)]
    Bs = [torch.randn(m, r, generator=generator, dtype=torch.float64) for m, r, _ in shapes]
    As = [torch.randn(r, n, generator=generator, dtype=torch.float64) for _, r, n in shapes]
    Bs[3] = torch.zeros_like(Bs[3])
    ks = [5, 3, 2, 4, 9]
    results = truncate_many(Bs, As, ks, dtype=torch.float64)
    for B, A, k, result in zip(Bs, As, ks, results, strict=True):
        keep = min(k, A.shape[0])
        U, S, Vh = dense_svd(B, A)
        best = (U[:, :keep] * S[:keep]) @ Vh[:keep]
        assert result.B.shape == (B.shape[0], keep) and result.A.shape == (keep, A.shape[1])
        assert torch.allclose(result.B @ result.A, best, atol=1e-9 * max(float(S[0]), 1e-300))
        assert torch.allclose(B @ result.map_B, result.B, atol=1e-9 * max(float(S[0]), 1e-300))
        assert torch.allclose(result.map_A @ A, result.A, atol=1e-9 * max(float(S[0]), 1e-300))
        if float(S[0]) == 0:
            assert math.isnan(result.retained)
        else:
            assert result.retained == pytest.approx(float((S[:keep] ** 2).sum() / (S**2).sum()), rel=1e-9)
    with pytest.raises(ValueError, match="target ranks"):
        truncate_many(Bs, As, ks[:2])
    with pytest.raises(ValueError, match="at least 1"):
        truncate_many(Bs, As, [0, 1, 1, 1, 1])


@pytest.mark.parametrize("stored", [torch.float64, torch.bfloat16])
def test_truncate_many_across_batches_with_ill_conditioned_and_rank_deficient_factors(stored):
    # Eleven same-rank pairs (more than one batch on the CPU): well-conditioned ones, B with singular values
    # down to 1e-3 of the largest (the Cholesky route), and A or B that hold fewer directions than their rank
    # (repeated rows or columns: the floored eigendecomposition route), each truncated below and above what
    # it holds. bfloat16 factors are decomposed in float32 and compared with a float64 SVD of the stored values.
    generator = torch.Generator().manual_seed(8)
    rank, Bs, As = 10, [], []
    for index in range(11):
        B = torch.randn(60 + index, rank, generator=generator, dtype=torch.float64)
        A = torch.randn(rank, 50 - index, generator=generator, dtype=torch.float64)
        if index % 3 == 1:
            B = B * torch.logspace(0, -3, rank, dtype=torch.float64)
        if index % 4 == 2:
            A[5:] = A[:5]  # A holds 5 directions
        if index % 4 == 3:
            B[:, 7:] = B[:, :3]  # B holds 7
        Bs.append(B.to(stored))
        As.append(A.to(stored))
    ks = [1 + (3 * index) % 9 for index in range(11)]
    compute = torch.float64 if stored == torch.float64 else torch.float32
    tolerance = 1e-9 if stored == torch.float64 else 1e-4
    results = truncate_many(Bs, As, ks, dtype=compute)
    for B, A, k, result in zip(Bs, As, ks, results, strict=True):
        U, S, Vh = dense_svd(B, A)
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        assert result.B.dtype == stored and result.A.dtype == stored
        assert result.B.shape == (B.shape[0], k) and result.A.shape == (k, A.shape[1])
        rebuilt = result.B.double() @ result.A.double()
        # bfloat16 output rounds each new factor to 2^-8: the product stays within about that of the best.
        slack = tolerance if stored == torch.float64 else 2e-2
        assert torch.linalg.matrix_norm(rebuilt - best) <= slack * float(S[0])
        assert_spectrum_close(result.singular_values, S, rtol=tolerance)
        assert result.retained == pytest.approx(float((S[:k] ** 2).sum() / (S**2).sum()), rel=tolerance)


def test_truncate_factors_rsvd_matches_the_dense_svd_and_its_maps_make_the_factors():
    generator = torch.Generator().manual_seed(6)
    # A decaying spectrum, rank 12: with k + oversample ≥ 12 the probes span the whole range (exact).
    B = torch.randn(64, 12, generator=generator, dtype=torch.float64) * torch.logspace(0, -1.5, 12)
    A = torch.randn(12, 48, generator=generator, dtype=torch.float64)
    U, S, Vh = dense_svd(B, A)
    best = (U[:, :5] * S[:5]) @ Vh[:5]
    probes = torch.Generator().manual_seed(0)
    result = truncate_factors(B, A, 5, dtype=torch.float64, method="rsvd", oversample=7, generator=probes)
    assert result.B.shape == (64, 5) and result.A.shape == (5, 48) and result.map_B.dtype == torch.float64
    assert torch.allclose(result.B @ result.A, best, atol=1e-9 * float(S[0]))
    assert torch.allclose(result.singular_values, S[:5], rtol=1e-9)
    assert torch.allclose(B @ result.map_B, result.B, atol=1e-9 * float(S[0]))
    assert torch.allclose(result.map_A @ A, result.A, atol=1e-9 * float(S[0]))
    assert result.retained == pytest.approx(float((S[:5] ** 2).sum() / (S**2).sum()), rel=1e-9)
    # Fewer probes than the rank: an approximation, but close, and never more energy than the best rank-5.
    rough = truncate_factors(B, A, 5, dtype=torch.float64, method="rsvd", oversample=2)
    error = torch.linalg.matrix_norm(B @ A - rough.B @ rough.A)
    best_error = torch.linalg.matrix_norm(B @ A - best)
    assert best_error * (1 - 1e-12) <= error <= 1.02 * best_error
    assert rough.retained <= result.retained + 1e-12
    with pytest.raises(ValueError, match="method"):
        truncate_factors(B, A, 5, method="svd")


def test_randomized_svd_on_matrix_and_operator():
    generator = torch.Generator().manual_seed(5)
    left, _ = torch.linalg.qr(torch.randn(200, 30, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(150, 30, generator=generator, dtype=torch.float64))
    planted = torch.logspace(1, -3, 30, dtype=torch.float64)
    matrix = (left * planted) @ right.T
    result = randomized_svd(matrix, k=6, dtype=torch.float64)
    assert torch.allclose(result.S, planted[:6], rtol=1e-6)
    B, A = torch.randn(80, 5, generator=generator), torch.randn(5, 60, generator=generator)
    operator_result = randomized_svd(LinearOperator.from_factors(B, A, 3.0), k=5, oversample=4)
    assert_spectrum_close(operator_result.S, dense_svd(B, A, 3.0)[1], rtol=1e-4)


def test_the_engine_modules_share_one_ground_and_do_not_import_each_other():
    import ast
    import inspect

    from lora_monitor.spectrum import randomized

    tree = ast.parse(inspect.getsource(randomized))
    assert "factored" not in {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}


def test_the_compute_precision_rule_is_as_exact_as_the_stored_factors():
    # float32 and float64 factors are decomposed in float64, 16-bit ones in float32; one float32 factor
    # in a mixed pair is enough for float64.
    assert decomposition_dtype(torch.float32) == decomposition_dtype(torch.float64) == torch.float64
    assert decomposition_dtype(torch.bfloat16) == decomposition_dtype(torch.float16) == torch.float32
    assert decomposition_dtype(torch.bfloat16, torch.float32) == torch.float64
    B, A = torch.randn(8, 2), torch.randn(2, 6)
    assert LinearOperator.from_factors(B, A).dtype == torch.float64
    assert LinearOperator.from_factors(B.bfloat16(), A.bfloat16()).dtype == torch.float32
    assert LinearOperator.from_factors(B, A, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be"):
        LinearOperator.from_factors(B, A, dtype=torch.float16)


def test_scalar_summaries_against_their_definitions():
    S = torch.tensor([4.0, 2.0, 1.0, 1.0])
    p = S / S.sum()
    assert effective_rank(S).item() == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert effective_rank(torch.ones(7)).item() == pytest.approx(7.0)
    assert stable_rank(S).item() == pytest.approx((16 + 4 + 1 + 1) / 16)
    assert torch.allclose(energy_curve(S), torch.tensor([16, 20, 21, 22], dtype=torch.float64) / 22)
    assert rank_for_energy(S, 0.9) == 2 and rank_for_energy(S, 1.0) == 4
    batch = torch.stack([S, torch.zeros(4)])
    assert effective_rank(batch).shape == (2,) and stable_rank(batch)[1] == 0

    generator = torch.Generator().manual_seed(6)
    M = torch.randn(6, 40, generator=generator)
    reference = torch.linalg.svdvals(M.double())
    assert condition_number(M).item() == pytest.approx((reference[0] / reference[-1]).item(), rel=1e-9)
    assert condition_number(torch.zeros(3, 5)).item() == math.inf  # a zero matrix is never "κ = 1"
    assert condition_number(torch.eye(4)).item() == pytest.approx(1.0)


def test_spectral_norm_of_a_weight_with_a_dominant_direction():
    generator = torch.Generator().manual_seed(7)
    W = torch.randn(256, 192, generator=generator) * 0.02
    W += 0.5 * torch.randn(256, 1, generator=generator) @ torch.randn(1, 192, generator=generator) / 16
    reference = torch.linalg.matrix_norm(W.double(), ord=2).item()
    assert spectral_norm(W) == pytest.approx(reference, rel=1e-4)
    conv_kernel = torch.randn(8, 4, 3, 3, generator=generator)
    flat = torch.linalg.matrix_norm(conv_kernel.reshape(8, -1).double(), ord=2).item()
    assert spectral_norm(conv_kernel, iters=20) == pytest.approx(flat, rel=1e-3)
    with pytest.raises(ValueError, match="dequantize"):
        spectral_norm(torch.zeros(4, 4, dtype=torch.int8))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="not an"):
        factored_svd(torch.zeros(4, 3), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="scales"):
        lora_spectra([torch.zeros(4, 2)] * 2, [torch.zeros(2, 3)] * 2, [1.0, 2.0, 3.0])
