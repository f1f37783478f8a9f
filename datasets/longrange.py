"""A generated long-range DAG task that message passing with a few layers cannot solve.

Each graph holds ``1..max_tracks`` *tracks*. A track is a directed path of ``depth`` hops
(``min_depth <= depth <= max_depth``, default 30..60)

    key source p_0 -> p_1 -> ... -> p_depth = sink

and the label of the sink is the token (0/1) written on its key source ``p_0``, ``depth`` hops upstream.
Every source carries a random token, so the sink's neighbourhood is full of tokens that say nothing
about its label:

* distractor branches: short chains (1..4 hops) from fresh sources with random tokens, merging into
  the track at random points (more of them near the sink than far away is not needed: they are uniform);
* cross links: some distractor nodes also feed a second track (out-degree 2), so the graph is one
  connected DAG rather than a forest, while the key of a track still reaches only its own sink;
* the key source is marked (``is_key = 1``); every track has exactly one key, and it is the only
  ``is_key`` ancestor of its sink. Track nodes have out-degree 1, so the path from a key to its sink is
  unique.

Node features ``x`` (``[N, 5]``, float): ``[is_key, token (+-1 on sources, 0 elsewhere), is_sink, noise, noise]``.
Labels are node-level: ``y[n]`` is the key token (0/1) of ``n``'s track if ``n`` is a sink, ``-1``
otherwise; ``label_mask = y >= 0``; ``hops[n]`` is the sink's distance to its key (``-1`` elsewhere).
A model that sees ``r < depth`` hops around a sink sees only random tokens: its accuracy is 50% (chance),
whatever it learns. Graph-level pooling is deliberately not the task (a readout over all nodes would
see the key node directly).

Everything is generated from ``seed`` with numpy (deterministic across machines); no download.

Example:
    >>> from plstm_graph.datasets.longrange import longrange_dataset
    >>> graphs = longrange_dataset(4, seed=0)
    >>> g = graphs[0]
    >>> g.x.shape[1], int(g.label_mask.sum()) >= 1, int(g.hops[g.label_mask].min()) >= 30
    (5, True, True)
    >>> g.schedule("P").num_nodes == g.num_nodes
    True
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch
from torch_geometric.data import Data

from plstm_graph.graph import DAGData, attach_schedules

__all__ = ["make_longrange_graph", "longrange_dataset", "NUM_FEATURES", "NUM_CLASSES"]

NUM_FEATURES = 5
NUM_CLASSES = 2


def make_longrange_graph(
    rng: np.random.Generator,
    min_depth: int = 30,
    max_depth: int = 60,
    max_tracks: int = 3,
    branch_prob: float = 0.5,
    max_branch_len: int = 4,
    cross_prob: float = 0.3,
) -> Data:
    """One graph of the task as a plain PyG ``Data`` (no schedules); see the module docstring.

    Shapes: ``x [N, 5]``, ``edge_index [2, E]``, ``y [N]`` (long, -1 off sinks), ``label_mask [N]``,
    ``hops [N]``.
    """
    if not (1 <= min_depth <= max_depth):
        raise ValueError(f"need 1 <= min_depth <= max_depth, got {min_depth}, {max_depth}")
    feats: List[List[float]] = []  # [is_key, token, is_sink]
    edges: List[tuple] = []
    y: List[int] = []
    hops: List[int] = []

    def node(is_key=0.0, is_sink=0.0, token=None, label=-1, hop=-1) -> int:
        # token +-1 on sources (the key and every distractor source), 0 elsewhere
        feats.append([is_key, 0.0 if token is None else 2.0 * float(token) - 1.0, is_sink])
        y.append(label)
        hops.append(hop)
        return len(feats) - 1

    num_tracks = int(rng.integers(1, max_tracks + 1))
    tracks = []
    for _ in range(num_tracks):
        depth = int(rng.integers(min_depth, max_depth + 1))
        token = int(rng.integers(0, 2))
        path = [node(is_key=1.0, token=token)]
        for i in range(1, depth + 1):
            last = i == depth
            path.append(node(is_sink=1.0 if last else 0.0, label=token if last else -1, hop=depth if last else -1))
            edges.append((path[-2], path[-1]))
        tracks.append(path)
    distractors = []  # (node, track id) of distractor-chain nodes, candidates for cross links
    for t, path in enumerate(tracks):
        for i in range(1, len(path)):
            if rng.random() >= branch_prob:
                continue
            length = int(rng.integers(1, max_branch_len + 1))
            chain = [node(token=int(rng.integers(0, 2)))] + [node() for _ in range(length - 1)]
            for a, b in zip(chain[:-1], chain[1:]):
                edges.append((a, b))
            edges.append((chain[-1], path[i]))
            distractors.extend((c, t) for c in chain)
    if num_tracks > 1:
        for c, t in distractors:
            if rng.random() < cross_prob:
                other = int(rng.choice([u for u in range(num_tracks) if u != t]))
                target = tracks[other][int(rng.integers(1, len(tracks[other])))]
                edges.append((c, target))  # a distractor feeds two tracks; still acyclic (into a track)
    n = len(feats)
    x = np.concatenate([np.asarray(feats, dtype=np.float32), rng.standard_normal((n, 2)).astype(np.float32)], 1)
    # shuffle node ids so that ids carry no information about positions
    perm = rng.permutation(n)
    inv = np.empty(n, dtype=np.int64)
    inv[perm] = np.arange(n)
    ei = np.asarray(edges, dtype=np.int64).T
    ei = inv[ei]
    x_out = np.empty_like(x)
    x_out[inv] = x
    y_out = np.empty(n, dtype=np.int64)
    y_out[inv] = np.asarray(y)
    hops_out = np.empty(n, dtype=np.int64)
    hops_out[inv] = np.asarray(hops)
    y_t = torch.from_numpy(y_out)
    return Data(
        x=torch.from_numpy(x_out), edge_index=torch.from_numpy(np.ascontiguousarray(ei)), y=y_t,
        label_mask=y_t >= 0, hops=torch.from_numpy(hops_out), num_nodes=n,
    )


def longrange_dataset(
    num_graphs: int,
    seed: int = 0,
    min_depth: int = 30,
    max_depth: int = 60,
    max_tracks: int = 3,
    modes: Sequence[str] = ("P", "D"),
    reverse: bool = True,
    **kwargs,
) -> List[DAGData]:
    """``num_graphs`` graphs of the task as :class:`~plstm_graph.graph.DAGData` with schedules attached
    (for ``modes``, and their reversed DAGs if ``reverse``). Deterministic in ``seed``.

    Usable directly with ``torch_geometric.loader.DataLoader``; extra ``kwargs`` go to
    :func:`make_longrange_graph`.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_graphs):
        g = make_longrange_graph(rng, min_depth=min_depth, max_depth=max_depth, max_tracks=max_tracks, **kwargs)
        out.append(attach_schedules(g, modes=tuple(modes), reverse=reverse))
    return out
