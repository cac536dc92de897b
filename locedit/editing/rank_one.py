"""Rank-one and batched closed-form updates of a linear memory W (ROME, MEMIT, AlphaEdit, head edits).

All solves run in float64; inputs are float32 statistics (`locedit.editing.stats`)."""

from __future__ import annotations

import torch

from locedit.errors import LoceditError
from locedit.editing.edit import WeightDelta, tensor_sha256


def param_name(model: torch.nn.Module, param: torch.Tensor) -> str:
    for name, p in model.named_parameters():
        if p is param:
            return name
    raise LoceditError("the edited weight is not a parameter of the model")


def rank_one(C: torch.Tensor | None, key: torch.Tensor, delta_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ROME's update with the r-ROME fix: ΔW = r uᵀ with u = C⁻¹k/‖C⁻¹k‖ and r = δ / (uᵀk), so that
    (W + ΔW) k = W k + δ for the same (template-averaged) key k in numerator and denominator.

    `C=None` uses the identity (EasyEdit's `mom2_adjustment: false`). Returns (r, u) as float32 column vectors."""
    k = key.double()
    u = k.clone() if C is None else _solve(C.double().to(k.device), k[:, None])[:, 0]
    u = u / u.norm()
    denom = u @ k
    if not torch.isfinite(denom) or denom.abs() < 1e-12:
        raise LoceditError("degenerate key: C⁻¹k is orthogonal to k (statistics too few or singular)")
    r = delta_out.double() / denom
    return r.float()[:, None], u.float()[:, None]


def memit_factors(C: torch.Tensor, K: torch.Tensor, R: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT: Δ = R Kᵀ (λC + K Kᵀ)⁻¹ = R Vᵀ with V = (λC + K Kᵀ)⁻¹ K (the matrix is symmetric).
    K: (d_k, n) keys, R: (d_out, n) residuals. Returns (R, V) as float32."""
    Kd = K.double()
    A = weight * C.double().to(Kd.device) + Kd @ Kd.T
    V = _solve(A, Kd)
    return R.float(), V.float()


def nullspace_projector(C: torch.Tensor, threshold: float, energy: float | None = None) -> torch.Tensor:
    """AlphaEdit's P = Û Ûᵀ over the eigenvectors of C = E[kkᵀ] whose eigenvalues are below `threshold`; with
    `energy`, instead the smallest-eigenvalue eigenvectors that together hold at most that share of E[‖k‖²] (trace
    C): a rule that does not depend on the keys' scale, which differs between models."""
    if energy is not None and not 0 < energy <= 1:
        raise LoceditError(f"nullspace_energy is a share of E[‖k‖²] in (0, 1], not {energy!r}")
    values, vectors = torch.linalg.eigh(C.double())  # ascending
    if energy is not None:
        share = values.clamp_min(0).cumsum(0) / values.clamp_min(0).sum().clamp_min(1e-300)
        keep = vectors[:, share <= energy]
        what = f"nullspace_energy={energy}"
    else:
        keep = vectors[:, values < threshold]
        what = f"nullspace_threshold={threshold}"
    if keep.shape[1] == 0:
        raise LoceditError(f"the null space of the preserved keys is empty at {what} "
                           f"(smallest eigenvalue of E[kkᵀ] is {float(values.min()):.3g}); raise it")
    return keep @ keep.T


def nullspace_summary(C: torch.Tensor, P: torch.Tensor) -> dict:
    """How much the projector P leaves of the preserved keys: its rank, and the share of E[‖k‖²] = trace C inside
    the null space (trace PC / trace C; AlphaEdit assumes it is near 0)."""
    Cd, Pd = C.double(), P.double().to(C.device)
    return {"dims": int(round(float(torch.trace(Pd)))), "of": int(C.shape[0]),
            "energy_share": float(torch.trace(Pd @ Cd) / torch.trace(Cd).clamp_min(1e-300))}


def alphaedit_factors(P: torch.Tensor, K: torch.Tensor, R: torch.Tensor, previous: torch.Tensor | None,
                      alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit: Δ = R (A⁻¹ P K)ᵀ with A = P (K Kᵀ + K_p K_pᵀ) + α I, so Δ lives in the null space of the
    preserved keys (Δ k₀ ≈ 0) and also leaves earlier edits' keys K_p alone. Returns (R, V = A⁻¹ P K)."""
    Kd, Pd = K.double(), P.double().to(K.device)
    cache = Kd @ Kd.T
    if previous is not None:
        cache = cache + previous.double().to(K.device)
    A = Pd @ cache + alpha * torch.eye(Pd.shape[0], dtype=torch.float64, device=K.device)
    V = torch.linalg.solve(A, Pd @ Kd)
    return R.float(), V.float()


def _solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    try:
        return torch.linalg.solve(A, B)
    except RuntimeError:  # singular: least squares
        return torch.linalg.lstsq(A, B).solution


def linear_delta(model: torch.nn.Module, module: torch.nn.Module, left: torch.Tensor, right: torch.Tensor,
                 conv1d: bool) -> WeightDelta:
    """A low-rank change `left @ right.T` (out, in) of `module.weight`, fingerprinted."""
    weight = module.weight
    return WeightDelta(param_name(model, weight), tensor_sha256(weight), tuple(weight.shape),
                       left=left.detach().float().cpu(), right=right.detach().float().cpu(), transposed=conv1d)


def weight_out_in(module: torch.nn.Module, conv1d: bool) -> torch.Tensor:
    """The weight in (out, in) orientation (a view)."""
    return module.weight.T if conv1d else module.weight
