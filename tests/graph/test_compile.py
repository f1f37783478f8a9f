"""compile_dag: line graph, levels, D-mode multitree, orientation, errors (SPEC section 1)."""
import time

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from plstm_graph import compile_dag
from plstm_graph.graph import DAGSchedule

from ..conftest import hostile_dags, random_dag


def brute_line_pairs(ei):
    pairs = set()
    for a in range(ei.shape[1]):
        for b in range(ei.shape[1]):
            if ei[1, a] == ei[0, b]:
                pairs.add((a, b))
    return pairs


def path_counts(line_index, num_edges):
    """Number of directed paths between every ordered pair of line nodes (>= 1 edge)."""
    a = np.zeros((num_edges, num_edges), dtype=np.int64)
    for x, y in line_index.T.tolist():
        a[x, y] += 1
    total, power = np.zeros_like(a), a.copy()
    for _ in range(num_edges):
        if not power.any():
            break
        total += power
        power = power @ a
    return total


def longest_path_levels(ei, n):
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    g.add_edges_from(ei.T.tolist())
    level = {}
    for u in nx.topological_sort(g):
        level[u] = max((level[p] + 1 for p in g.predecessors(u)), default=0)
    return [level[i] for i in range(n)]


@pytest.mark.parametrize("case", hostile_dags(), ids=lambda c: c[0])
def test_p_mode_line_graph_and_levels(case):
    _, ei, n = case
    s = compile_dag(ei, n, mode="P")
    assert isinstance(s, DAGSchedule)
    assert set(map(tuple, s.line_index.T.tolist())) == brute_line_pairs(ei.numpy())
    assert s.line_index.shape[1] == len(brute_line_pairs(ei.numpy()))
    assert s.node_level.tolist() == longest_path_levels(ei.numpy(), n)
    # every line edge runs from an earlier level to a later one
    el = s.edge_level
    if s.num_line_edges:
        assert (el[s.line_index[0]] < el[s.line_index[1]]).all()
    # the level plan covers every edge once, in level order
    assert sorted(s.edge_order.tolist()) == list(range(s.num_edges))
    for lvl in range(s.num_levels):
        ids = s.edge_order[s.edge_ptr[lvl]:s.edge_ptr[lvl + 1]]
        assert (el[ids] == lvl).all()


def test_matches_networkx_line_graph():
    ei = random_dag(25, 0.2, 11)
    s = compile_dag(ei, 25)
    g = nx.MultiDiGraph()
    g.add_nodes_from(range(25))
    for e, (u, w) in enumerate(ei.T.tolist()):
        g.add_edge(u, w, key=e)
    lg = nx.line_graph(g)
    expected = {(a[2], b[2]) for a, b in lg.edges()}
    assert set(map(tuple, s.line_index.T.tolist())) == expected


def check_multitree_maximal(ei, s_p, s_d):
    e = ei.shape[1]
    p_pairs = set(map(tuple, s_p.line_index.T.tolist()))
    d_pairs = set(map(tuple, s_d.line_index.T.tolist()))
    assert d_pairs <= p_pairs
    li = s_d.line_index.numpy()
    counts = path_counts(li, e)
    assert counts.max(initial=0) <= 1, "D-mode line graph is not a multitree"
    for pair in sorted(p_pairs - d_pairs):  # maximal: no dropped pair can come back
        more = np.concatenate([li, np.array(pair).reshape(2, 1)], 1)
        assert path_counts(more, e).max() > 1, f"dropped line edge {pair} could be kept"


@pytest.mark.parametrize("case", hostile_dags(), ids=lambda c: c[0])
def test_d_mode_is_maximal_multitree(case):
    _, ei, n = case
    check_multitree_maximal(ei, compile_dag(ei, n, "P"), compile_dag(ei, n, "D"))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 14), p=st.floats(0.0, 0.7), seed=st.integers(0, 10_000))
def test_d_mode_property(n, p, seed):
    ei = random_dag(n, p, seed)
    s_d = compile_dag(ei, n, "D")
    check_multitree_maximal(ei, compile_dag(ei, n, "P"), s_d)
    again = compile_dag(ei, n, "D")
    assert torch.equal(again.line_index, s_d.line_index)  # deterministic


def test_d_mode_prunes_a_second_path():
    # 0 -> {1, 2} -> 3 -> 4: the line nodes (0->1) and (0->2) share no ancestor, so both are kept into
    # (3->4); but with a common root edge above them one of the two paths must go.
    ei = torch.tensor([[9, 0, 0, 1, 2, 3], [0, 1, 2, 3, 3, 4]])
    s_d = compile_dag(ei, 10, "D")
    s_p = compile_dag(ei, 10, "P")
    assert s_p.num_line_edges == s_d.num_line_edges + 1
    # the later candidate (edge 4 = 2 -> 3) loses to the earlier one (edge 3 = 1 -> 3)
    assert (4, 5) not in set(map(tuple, s_d.line_index.T.tolist()))


def test_reverse_equals_compiling_flipped():
    ei = random_dag(20, 0.25, 5)
    for mode in "PD":
        s = compile_dag(ei, 20, mode)
        r = s.reverse()
        direct = compile_dag(ei.flip(0), 20, mode)
        assert r.reversed and not s.reversed
        assert torch.equal(r.line_index, direct.line_index)
        assert torch.equal(r.node_level, direct.node_level)
        assert torch.equal(r.edge_index, ei.flip(0))


# ---------------------------------------------------------------- inputs and orientation
def test_accepts_pyg_data_and_networkx():
    from torch_geometric.data import Data

    ei = torch.tensor([[0, 1, 1], [1, 2, 3]])
    s = compile_dag(Data(edge_index=ei, num_nodes=5))
    assert s.num_nodes == 5 and torch.equal(s.edge_index, ei)
    g = nx.DiGraph([("a", "b"), ("b", "c")])
    s = compile_dag(g)
    assert s.num_nodes == 3 and s.edge_index.tolist() == [[0, 1], [1, 2]]
    with pytest.raises(ValueError, match="undirected networkx"):
        compile_dag(nx.Graph([(0, 1)]))
    # nodes are renumbered in G.nodes() order (2 -> 0, 0 -> 1, 1 -> 2) before orienting low -> high
    s = compile_dag(nx.Graph([(2, 0), (0, 1)]), orientation="index")
    assert sorted(map(tuple, s.edge_index.T.tolist())) == [(0, 1), (1, 2)]


def test_undirected_pyg_convention_is_recognised():
    from torch_geometric.utils import to_undirected

    ei = to_undirected(torch.tensor([[0, 1, 2], [1, 2, 3]]))
    with pytest.raises(ValueError, match="both directions.*PyG's convention.*orientation="):
        compile_dag(ei, 4)
    s = compile_dag(ei, 4, orientation="index")
    assert s.edge_index.tolist() == [[0, 1, 2], [1, 2, 3]]
    # input_edge_ids point at the input columns holding each kept pair
    kept = ei[:, s.input_edge_ids]
    assert torch.equal(kept.sort(0).values, s.edge_index.sort(0).values)


def test_orientation_policies():
    # star with centre 3: bfs from 3 points every edge away from the centre
    ei = torch.tensor([[3, 3, 3], [0, 1, 2]])
    und = torch.cat([ei, ei.flip(0)], 1)
    s = compile_dag(und, 4, orientation="bfs", roots=[3])
    assert (s.edge_index[0] == 3).all()
    s = compile_dag(und, 4, orientation="index")
    assert (s.edge_index[1] == 3).all()
    rank = torch.tensor([3.0, 2.0, 1.0, 0.0])  # user ranking: reversed ids
    s = compile_dag(und, 4, orientation=rank)
    assert (s.edge_index[0] == 3).all()
    with pytest.raises(ValueError, match="one value per node"):
        compile_dag(und, 4, orientation=torch.zeros(3))
    with pytest.raises(ValueError, match="orientation must be"):
        compile_dag(und, 4, orientation="random")
    with pytest.raises(ValueError, match="bfs root"):
        compile_dag(und, 4, orientation="bfs", roots=[9])


def test_directed_input_keeps_directions():
    ei = torch.tensor([[3, 2, 1], [2, 1, 0]])  # high -> low ids, still a DAG
    s = compile_dag(ei, 4)
    assert torch.equal(s.edge_index, ei)
    assert s.node_level.tolist() == [3, 2, 1, 0]


# ---------------------------------------------------------------- errors
def test_cycle_names_a_node_on_it():
    ei = torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 1, 5]])  # 1 -> 2 -> 3 -> 1
    with pytest.raises(ValueError, match="cycle") as err:
        compile_dag(ei, 6)
    msg = str(err.value)
    node = int(msg.split("through node ")[1].split(" ")[0])
    assert node in (1, 2, 3)


def test_long_cycle_does_not_hang():
    n = 5000
    ei = torch.stack([torch.arange(n), (torch.arange(n) + 1) % n])
    t = time.perf_counter()
    with pytest.raises(ValueError, match="cycle length 5000"):
        compile_dag(ei, n)
    assert time.perf_counter() - t < 30  # a hang guard, not a speed target


@pytest.mark.parametrize(
    "ei,n,match",
    [
        (torch.tensor([[0, 1], [1, 1]]), 2, "self-loop"),
        (torch.tensor([[0, 1], [1, 5]]), 3, "num_nodes=3"),
        (torch.tensor([[0, -1], [1, 2]]), 3, "negative"),
        (torch.tensor([[0.0, 1.0], [1.0, 2.0]]), 3, "integer"),
        (torch.tensor([0, 1, 2]), 3, r"shape \[2, E\]"),
        (torch.tensor([[0, 1, 2], [1, 2, 3], [0, 0, 0]]), 4, r"shape \[2, E\]"),
    ],
)
def test_bad_input(ei, n, match):
    with pytest.raises(ValueError, match=match):
        compile_dag(ei, n)


def test_bad_mode():
    with pytest.raises(ValueError, match="mode must be"):
        compile_dag(torch.tensor([[0], [1]]), 2, mode="X")


def test_empty_graph():
    s = compile_dag(torch.zeros(2, 0, dtype=torch.long), 0)
    assert s.num_nodes == 0 and s.num_levels == 0 and s.num_line_edges == 0


def test_to_device_keeps_plan():
    s = compile_dag(random_dag(10, 0.3, 1), 10)
    t = s.to("cpu")
    assert t is s  # same device: no copy
    assert "DAGSchedule(" in repr(s)
