import torch


from plstm_graph import compile_dag


def random_dag(num_nodes: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Random DAG: edge i -> j (i < j) with probability p, nodes then shuffled so ids are not topological."""
    if num_nodes < 2:
        return torch.zeros(2, 0, dtype=torch.long)
    i, j = torch.triu_indices(num_nodes, num_nodes, offset=1)
    keep = torch.rand(i.numel(), generator=generator) < p
    perm = torch.randperm(num_nodes, generator=generator)
    return torch.stack([perm[i[keep]], perm[j[keep]]])


def grid_dag(side_y: int, side_x: int) -> torch.Tensor:
    idx = torch.arange(side_y * side_x).view(side_y, side_x)
    right = torch.stack([idx[:, :-1].reshape(-1), idx[:, 1:].reshape(-1)])
    down = torch.stack([idx[:-1, :].reshape(-1), idx[1:, :].reshape(-1)])
    return torch.cat([right, down], 1)


def chain_dag(n: int) -> torch.Tensor:
    return torch.stack([torch.arange(n - 1), torch.arange(1, n)])




def saturate_(layer, factor: float = 8.0) -> None:
    """Saturate a PLSTMGraphLayer: every weight x factor and the gate biases set to +factor, so sources,
    marks, direct and transitions all sit at ~1 (the worst case for path sums)."""
    import torch

    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(factor)
        for b in (layer.source_bias, layer.transition_bias, layer.mark_bias, layer.direct_bias):
            b.fill_(factor)
