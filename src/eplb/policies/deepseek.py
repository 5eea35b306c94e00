"""DeepSeek-compatible EPLB: the hierarchical and global policies of DeepSeek's ``eplb.py``.

Same results, shapes and dtypes as the reference, written anew and vectorised over layers
(Python loops run only over items, never over layers). Arithmetic is float32 like the
reference (``weight.float()``), so ties and near-ties resolve the same way.

* :func:`replicate` -- give the next redundant slot to the expert with the highest load per replica.
* :func:`balanced_packing` -- greedy LPT with equal item counts per pack (heaviest item to the
  lightest pack that still has room; ties to the lowest pack index).
* :func:`rebalance_experts` -- hierarchical when ``num_groups % num_nodes == 0`` (groups to nodes,
  replicate within nodes, replicas to GPUs), else global (one group, one node).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eplb._checks import ArrayLike, check_layout, check_load, check_positive_int

__all__ = ["balanced_packing", "rebalance_experts", "rebalance_experts_hierarchical", "replicate"]


def _descending_order(weight: np.ndarray) -> np.ndarray:
    """Item order of DeepSeek's ``weight.float().sort(-1, descending=True)``: torch's sort, ties included.

    Tied loads (common in real traces: many experts with equal small counts) are ordered exactly as the
    reference orders them, so results match DeepSeek's ``eplb.py`` on the same torch build. Falls back to a
    stable numpy sort when torch is not installed.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return np.argsort(-weight, axis=1, kind="stable")
    return torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)).sort(-1, descending=True).indices.numpy()


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack ``n`` weighted items into ``num_packs`` packs of ``n / num_packs`` items each.

    Args:
        weight: ``[X, n]`` item weights (rows are independent problems).
        num_packs: packs per row; must divide ``n``.

    Returns:
        ``pack_index`` ``[X, n]`` (pack of each item) and ``rank_in_pack`` ``[X, n]`` (position in it).
    """
    X, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        return np.broadcast_to(np.arange(n, dtype=np.int64), (X, n)).copy(), np.zeros((X, n), dtype=np.int64)
    order = _descending_order(weight)
    rows = np.arange(X)
    pack_w = np.zeros((X, num_packs), dtype=weight.dtype)
    pack_n = np.zeros((X, num_packs), dtype=np.int64)
    pack_index = np.empty((X, n), dtype=np.int64)
    rank_in_pack = np.empty((X, n), dtype=np.int64)
    inf = np.array(np.inf, dtype=weight.dtype)
    for j in range(n):
        item = order[:, j]
        pack = np.argmin(np.where(pack_n < per_pack, pack_w, inf), axis=1)
        pack_index[rows, item] = pack
        rank_in_pack[rows, item] = pack_n[rows, pack]
        pack_w[rows, pack] += weight[rows, item]
        pack_n[rows, pack] += 1
    return pack_index, rank_in_pack


def replicate(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replicate ``n`` logical experts into ``num_phy`` replicas, minimising the max load per replica.

    Args:
        weight: ``[X, n]`` loads.
        num_phy: replicas per row (``>= n``).

    Returns:
        ``phy2log`` ``[X, num_phy]`` (expert of each replica; the first ``n`` are ``0..n-1``),
        ``rank`` ``[X, num_phy]`` (replica index of each replica within its expert),
        ``logcnt`` ``[X, n]`` (replica count).
    """
    X, n = weight.shape
    rows = np.arange(X)
    phy2log = np.empty((X, num_phy), dtype=np.int64)
    phy2log[:, :n] = np.arange(n)
    rank = np.zeros((X, num_phy), dtype=np.int64)
    logcnt = np.ones((X, n), dtype=np.int64)
    for i in range(n, num_phy):
        best = np.argmax(weight / logcnt.astype(weight.dtype), axis=1)
        phy2log[:, i] = best
        rank[:, i] = logcnt[rows, best]
        logcnt[rows, best] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_experts_hierarchical(
    weight: np.ndarray, num_physical_experts: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The hierarchical policy on a validated ``[L, E]`` float32 array.

    Returns ``phy2log`` ``[L, S]``, ``phyrank`` ``[L, S]`` (replica index of each slot), ``logcnt`` ``[L, E]``.
    """
    L, E = weight.shape
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = num_physical_experts // num_gpus
    log_per_node = E // num_nodes

    # 1. pack expert groups to nodes
    tokens_per_group = weight.reshape(L, num_groups, group_size).sum(-1)
    g_pack, g_rank = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (((g_pack * groups_per_node + g_rank) * group_size)[:, :, None] + np.arange(group_size)).reshape(L, E)
    mlog2log = _inverse(log2mlog)

    # 2. replicate experts within each node: rows are (layer, node)
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, axis=1).reshape(L * num_nodes, log_per_node)
    phy2mlog, phyrank, mlogcnt = replicate(tokens_per_mlog, num_physical_experts // num_nodes)

    # 3. pack replicas to the node's GPUs
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt.astype(weight.dtype), phy2mlog, axis=1)
    pack, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * phy_per_gpu + rank_in_pack)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    pphy2mlog = (pphy2mlog.reshape(L, num_nodes, -1) + (np.arange(num_nodes) * log_per_node)[None, :, None]).reshape(L, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(L, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(L, -1), log2mlog, axis=1)
    return pphy2log, pphyrank, logcnt


#: Largest per-layer total load kept as is in float32; larger loads are scaled down first.
_F32_SAFE = 1e30


def to_float32(weight: np.ndarray) -> np.ndarray:
    """``weight`` as float32 for DeepSeek's arithmetic, scaled down when a layer's total would overflow
    float32 (only the ratios of loads matter to the policy; a load past 3.4e38 would become inf)."""
    w = np.asarray(weight, dtype=np.float64)
    if w.size:
        tot = w.sum(-1, keepdims=True)  # rows (layers) are planned independently: scale each on its own
        w = np.where(tot > _F32_SAFE, w * (_F32_SAFE / np.maximum(tot, 1.0)), w)
    return w.astype(np.float32)


def _check_args(weight: ArrayLike, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> np.ndarray:
    w = to_float32(check_load(weight, "weight", ndim=2, dtype=np.float64))
    E = w.shape[1]
    check_positive_int(num_groups, "num_groups")
    check_layout(E, num_replicas, num_gpus, num_nodes)
    if E % num_groups:
        raise ValueError(f"num_groups: {E} experts cannot be split into {num_groups} equal groups")
    return w


def rebalance_experts(
    weight: ArrayLike, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[Any, Any, Any]:
    """DeepSeek's entry point: plan replicas and their placement for every layer.

    Args:
        weight: ``[L, E]`` load of each logical expert (token counts), torch tensor or numpy array.
        num_replicas: ``S``, physical slots per layer (multiple of ``num_gpus``, ``>= E``).
        num_groups: expert groups (DeepSeek-V3: 8); must divide ``E``.
        num_nodes: server nodes; hierarchical policy when it divides ``num_groups``.
        num_gpus: ranks; multiple of ``num_nodes``.

    Returns:
        ``phy2log`` ``[L, S]``, ``log2phy`` ``[L, E, max_replicas]`` (padded with ``-1``; replica ``k``
        of an expert at index ``k``), ``logcnt`` ``[L, E]``; all int64, torch tensors on ``weight``'s
        device when ``weight`` is a tensor, else numpy arrays.
    """
    w = _check_args(weight, num_replicas, num_groups, num_nodes, num_gpus)
    L, E = w.shape
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(w, num_replicas, 1, 1, num_gpus)
    width = int(logcnt.max())
    log2phy = np.full((L, E * width), -1, dtype=np.int64)
    np.put_along_axis(log2phy, phy2log * width + phyrank, np.broadcast_to(np.arange(num_replicas), (L, num_replicas)), axis=1)
    log2phy = log2phy.reshape(L, E, width)
    if hasattr(weight, "device") and hasattr(weight, "detach"):
        import torch

        dev = weight.device
        return (torch.from_numpy(phy2log).to(dev), torch.from_numpy(log2phy).to(dev), torch.from_numpy(logcnt).to(dev))
    return phy2log, log2phy, logcnt
