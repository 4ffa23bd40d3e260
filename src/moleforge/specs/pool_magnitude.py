"""DoRA magnitudes on the experts of a pool (``ExpertPool.magnitude``).

No paper defines DoRA over a routed mixture, so this is the one definition moleforge uses: every
expert is a DoRA-adapted linear of its own, ``W_i' = m_i ⊙ V_i / ‖V_i‖`` with ``V_i = W + s B_i A_i``
(Liu et al. 2024, arXiv 2402.09353, per expert), and the pool mixes the experts' changes of the
frozen output:

    Δy = Σ_i g_i (x W_i'ᵀ - x Wᵀ) = Σ_i g_i [(c_i - 1) ⊙ (x Wᵀ) + c_i ⊙ s (x A_iᵀ) B_iᵀ],
    c_i = (‖W‖ + Δm_i) / ‖W + s B_i A_i‖   (row norms over d_in, the denominator without gradient)

with ``Δm_i`` the expert's trainable magnitude (starting at 0, so a fresh expert is its plain LoRA
form and an untrained pool changes nothing). Why per expert rather than one magnitude over
``W + Σ_i g_i ΔW_i``: the site-level norm depends on each token's gates, so it would need a
``d_out × d_in`` norm per token; per expert it is one norm per expert per forward, and a pool with
one expert under a gate of 1 is exactly a DoRA LoRA (PEFT's ``use_dora``)."""

from __future__ import annotations

__all__ = ["check_pool_magnitude"]


def check_pool_magnitude(pool) -> None:
    """``magnitude`` needs experts of one rank, each with an A or a B of its own (a factor the experts
    share, HydraLoRA's A, is shared by their DoRA updates too), with a trainable router's gates.

    Raises:
        ValueError: naming the field that conflicts.
    """
    if not pool.magnitude:
        return
    if pool.down.kind not in ("per_expert", "shared"):
        raise ValueError(f"magnitude: down.kind = {pool.down.kind!r} (FlyLoRA's frozen sparse A, routed on x A by its "
                         "implicit top-k router) takes no DoRA magnitude; use down.kind 'per_expert' or 'shared'")
    if pool.down.kind == "shared" and pool.up == "shared":
        raise ValueError("magnitude: with down.kind = 'shared' and up = 'shared' every expert is the same "
                         "update; give the experts their own A or B")
    if pool.ranks is not None:
        raise ValueError("magnitude with ranks (one per expert) is not defined; remove one of them")
