"""The pLSTM operator on a sequence (SPEC section 4), and RetNet retention as a thin wrapper over it.

A sequence is the chain DAG ``0 -> 1 -> ... -> T-1`` with edge ``e_t = (t -> t+1)``; this operator equals
:func:`plstm_graph.plstm_dag` on that chain with ``source[e_t] = source_t``,
``transition[(e_{t-1}, e_t)] = transition_t`` and ``mark[e_{t-1}] = mark_t`` (the tests prove it).

Modes (``mode=``), all differentiable and equal to float tolerance:

* ``"chunkwise"`` (default): :mod:`.chunkwise`, matmuls inside chunks and a scan across them; long sequences.
* ``"parallel"``: :mod:`.parallel`, one T x T gating matrix per sequence; short sequences.
* ``"recurrent"``: :mod:`.recurrent`, a loop of O(1)-state steps; :func:`plstm_sequence_step` decodes.

The readable one-step-at-a-time oracle is :func:`.reference.plstm_sequence_reference`.

Backends (``backend=``): ``"torch"`` (the above). ``"triton"`` is a seam for GPU kernels in
:mod:`plstm_graph.kernels.sequence` (chunkwise mode only), imported lazily.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .chunkwise import plstm_sequence_chunkwise
from .parallel import plstm_sequence_parallel
from .recurrent import plstm_sequence_recurrent, plstm_sequence_step
from .reference import plstm_sequence_reference

__all__ = [
    "plstm_sequence",
    "plstm_sequence_step",
    "retention",
    "retention_gammas",
    "sequence_backends",
    "plstm_sequence_reference",
]

_MODES = ("chunkwise", "parallel", "recurrent")
_BACKENDS = ("torch", "triton")


def _triton_available() -> bool:
    try:
        from ...kernels import sequence as _ks  # noqa: F401  (lazy: triton is imported only here)
    except ImportError:
        return False
    return bool(getattr(_ks, "available", lambda: True)())


def sequence_backends() -> list:
    """Backends of :func:`plstm_sequence` usable on this machine, e.g. ``['torch']``."""
    return ["torch"] + (["triton"] if _triton_available() else [])


def _check(q, k, v, source, transition, mark, direct, initial_state, cu_seqlens, mode, chunk_size, backend):
    if mode not in _MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {list(_MODES)}")
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(_BACKENDS)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "q, k, v must be [B, T, H, K], [B, T, H, K], [B, T, H, V] (flash-linear-attention layout); got "
            f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}"
        )
    B, T, H, K = q.shape
    if tuple(k.shape) != (B, T, H, K) or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"q {list(q.shape)}, k {list(k.shape)} and v {list(v.shape)} disagree on [B, T, H, K]")
    for name, g in (("source", source), ("transition", transition), ("mark", mark), ("direct", direct)):
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != (B, T, H):
            shape = list(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(f"{name} must be a [B, T, H] = {[B, T, H]} tensor, got {shape}")
        if g.device != q.device:
            raise ValueError(f"{name} is on {g.device}, q on {q.device}")
    num_seqs = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"with cu_seqlens the sequences are packed along T, so B must be 1, got B={B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point:
            raise ValueError("cu_seqlens must be a 1-D integer tensor [num_seqs + 1] of offsets")
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu[:-1], cu[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to T={T} without decreasing, got {cu}")
        num_seqs = len(cu) - 1
    if initial_state is not None:
        expect = (num_seqs, H, K, v.shape[-1])
        if tuple(initial_state.shape) != expect:
            raise ValueError(
                f"initial_state has shape {list(initial_state.shape)}, expected [N, H, K, V] = {list(expect)} "
                "(N = number of sequences)"
            )


def plstm_sequence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    source: torch.Tensor,
    transition: torch.Tensor,
    mark: torch.Tensor,
    direct: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    mode: str = "chunkwise",
    chunk_size: int = 64,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "torch",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """pLSTM on a sequence (SPEC section 4): the chain case of :func:`plstm_graph.plstm_dag`.

    .. math::
        C_t = \\tau_t C_{t-1} + s_t\\, k_t v_t^\\top, \\qquad
        y_t = m_t\\, q_t^\\top C_{t-1} + d_t (q_t \\cdot k_t) v_t, \\qquad C_{-1} = \\text{initial\\_state}

    Gates are any real numbers (negative and zero transitions are exact in every mode). No scaling
    inside: scale ``q`` yourself. Half-precision inputs keep float32 states.

    Shapes:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; source, transition, mark, direct: ``[B, T, H]``;
        initial_state: ``[N, H, K, V]`` (N = B, or the number of sequences with ``cu_seqlens``);
        cu_seqlens: ``[N + 1]`` offsets of sequences packed along T (B must be 1), as in
        flash-linear-attention. Returns ``y: [B, T, H, V]`` in ``v``'s dtype and, if
        ``output_final_state``, ``final_state = C_{T-1}: [N, H, K, V]`` in float32 (float64 for float64
        inputs), else None.

    Args:
        mode: ``"chunkwise"`` (default; O(T * chunk_size) memory), ``"parallel"`` (O(T^2)) or
            ``"recurrent"`` (a loop over T).
        chunk_size: chunk length of the chunkwise mode.
        backend: ``"torch"`` or ``"triton"`` (GPU kernels, chunkwise only; see :func:`sequence_backends`).

    Example:
        >>> import torch
        >>> B, T, H, K, V = 2, 10, 3, 8, 4
        >>> q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
        >>> s, t, m, d = torch.rand(B, T, H), torch.rand(B, T, H) * 2 - 1, torch.rand(B, T, H), torch.rand(B, T, H)
        >>> y, state = plstm_sequence(q, k, v, s, t, m, d, output_final_state=True)
        >>> y2, _ = plstm_sequence(q, k, v, s, t, m, d, mode="recurrent")
        >>> y.shape, state.shape, bool(torch.allclose(y, y2, atol=1e-4))
        (torch.Size([2, 10, 3, 4]), torch.Size([2, 3, 8, 4]), True)
    """
    _check(q, k, v, source, transition, mark, direct, initial_state, cu_seqlens, mode, chunk_size, backend)
    return _plstm_sequence(q, k, v, source, transition, mark, direct, initial_state, output_final_state, mode,
                           chunk_size, cu_seqlens, backend)


def _plstm_sequence(q, k, v, source, transition, mark, direct, initial_state, output_final_state, mode, chunk_size,
                    cu_seqlens, backend, transitions_positive: bool = False):
    """:func:`plstm_sequence` after its checks. ``transitions_positive``: the caller knows every transition is
    > 0 (retention's decays), so the Triton dispatcher skips its device-synchronising check."""
    if backend == "triton":
        if mode != "chunkwise":
            raise ValueError(f"backend='triton' implements mode='chunkwise' only, got mode={mode!r}")
        if not _triton_available():
            raise RuntimeError(
                "backend='triton' needs the triton package, a CUDA device and plstm_graph.kernels.sequence; "
                f"available here: {sequence_backends()}"
            )
        from ...kernels import sequence as _ks

        y, final = _ks.plstm_sequence_triton(
            q, k, v, source, transition, mark, direct, initial_state=initial_state, cu_seqlens=cu_seqlens,
            chunk_size=chunk_size, transitions_positive=transitions_positive,
        )
        return y, (final if output_final_state else None)
    out_dtype = v.dtype
    acc = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    gates = [g.to(acc) for g in (source, transition, mark, direct)]
    init = None if initial_state is None else initial_state.to(acc)
    if mode == "chunkwise":
        mm = torch.promote_types(q.dtype, v.dtype)
        y, final = plstm_sequence_chunkwise(
            q.to(mm), k.to(mm), v.to(mm), *gates, initial_state=init, cu_seqlens=cu_seqlens, chunk_size=chunk_size
        )
    elif mode == "parallel":
        y, final = plstm_sequence_parallel(q.to(acc), k.to(acc), v.to(acc), *gates, init, cu_seqlens)
    else:
        y, final = plstm_sequence_recurrent(q.to(acc), k.to(acc), v.to(acc), *gates, init, cu_seqlens)
    return y.to(out_dtype), (final if output_final_state else None)


def retention_gammas(num_heads: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RetNet's default per-head decay ``gamma_h = 1 - 2^(-5-h)`` (``[H]``), as in flash-linear-attention."""
    return 1.0 - torch.pow(2.0, -5.0 - torch.arange(num_heads, device=device, dtype=torch.float64)).to(dtype)


_DEFAULT_GATES = {}  # (H, device, dtype, scale) -> retention's four [H] gate vectors for the default decays


def _retention_gates(q: torch.Tensor, gamma, scale):
    """retention's gates as four per-head ``[H]`` vectors ``(source, transition, mark, direct)`` (``scale`` folded
    into mark and direct), and whether every decay is known > 0 on the host. For the default decays they are
    built once per (heads, device, dtype, scale): no launches per call on a GPU."""
    B, T, H, K = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = K ** -0.5 if scale is None else scale
    default = gamma is None
    key = (H, q.device, acc, float(scale))
    if default and key in _DEFAULT_GATES:
        return _DEFAULT_GATES[key], True
    positive = default  # RetNet's default decays lie in (0, 1)
    if default:
        gamma = retention_gammas(H, device=q.device, dtype=acc)
    elif not (isinstance(gamma, torch.Tensor) and gamma.device.type != "cpu"):
        gamma = torch.as_tensor(gamma, dtype=acc)
        positive = bool((gamma > 0).all())  # read on the host: no device synchronisation later
    gamma = torch.as_tensor(gamma, dtype=acc, device=q.device)
    if gamma.dim() > 1 or gamma.numel() not in (1, H):
        raise ValueError(f"gamma must be a float or a [H] = [{H}] tensor of per-head decays, got {list(gamma.shape)}")
    decay = gamma.expand(H)
    gates = (torch.ones(H, dtype=acc, device=q.device), decay, decay * scale,
             torch.full((H,), scale, dtype=acc, device=q.device))
    if default and len(_DEFAULT_GATES) < 256:
        _DEFAULT_GATES[key] = gates
    return gates, positive


def retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: Optional[Union[float, torch.Tensor]] = None,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    mode: str = "chunkwise",
    chunk_size: int = 64,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "torch",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """RetNet retention (multi-scale, per-head decay): ``plstm_sequence(scale*q, k, v, source=1,
    transition=gamma, mark=gamma, direct=1)`` (computed as ``mark = scale*gamma, direct = scale``).

    .. math::
        o_t = \\sum_{s \\le t} \\gamma_h^{t-s}\\, \\text{scale}\\, (q_t \\cdot k_s)\\, v_s, \\qquad
        S_t = \\gamma_h S_{t-1} + k_t v_t^\\top, \\qquad \\text{final\\_state} = S_{T-1}

    A drop-in for flash-linear-attention's ``chunk_retention`` / ``fused_recurrent_retention`` when called
    with keyword arguments: same layout, ``gamma_h = 1 - 2^(-5-h)`` and ``scale = K^-0.5`` by default, the
    same initial/final state (float32) and ``cu_seqlens`` packing.

    Shapes:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; gamma: float or ``[H]``; initial_state
        ``[N, H, K, V]``; returns ``o: [B, T, H, V]`` and ``final_state: [N, H, K, V]`` or None.

    Example:
        >>> import torch
        >>> q, k, v = torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2, 3)
        >>> o, S = retention(q, k, v, output_final_state=True)
        >>> gamma = 1 - 2.0 ** -5   # head 0
        >>> o0 = sum(gamma ** (4 - s) * 0.5 * (q[0, 4, 0] @ k[0, s, 0]) * v[0, s, 0] for s in range(5))
        >>> bool(torch.allclose(o[0, 4, 0], o0, atol=1e-5))
        True
    """
    B, T, H, _ = q.shape
    # scale * q folded into mark and direct (exact, and no extra pass over q or rounding of q in bf16); the
    # per-head gates are expanded views (the Triton kernels read them as [H] vectors, no copies)
    gates, positive = _retention_gates(q, gamma, scale)
    source, transition, mark, direct = (g.expand(B, T, H) for g in gates)
    _check(q, k, v, source, transition, mark, direct, initial_state, cu_seqlens, mode, chunk_size, backend)
    return _plstm_sequence(q, k, v, source, transition, mark, direct, initial_state, output_final_state, mode,
                           chunk_size, cu_seqlens, backend, transitions_positive=positive)
