"""TEMPORARY stand-in for ``plstm_graph.nn.PLSTMGraphStack`` (branch ``layers``); deleted after the merge."""
import torch
from torch import nn

from plstm_graph.ops import plstm_dag


class PLSTMGraphStack(nn.Module):
    def __init__(self, dim, num_heads, num_layers=4, pattern=None, edge_dim=None, dropout=0.0, **_):
        super().__init__()
        self.h, self.k = num_heads, dim // num_heads
        self.pattern = [("P", False), ("D", True), ("P", True), ("D", False)]
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_layers))
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(num_layers))
        self.gates = nn.ModuleList(nn.Linear(dim, 4 * num_heads) for _ in range(num_layers))
        self.edge = nn.ModuleList(nn.Linear(edge_dim or dim, num_heads) for _ in range(num_layers))
        self.out = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_layers))

    def forward(self, x, batch, edge_attr=None):
        for i in range(len(self.norms)):
            mode, rev = self.pattern[i % 4]
            sched = batch.schedule(mode, rev)
            h = self.norms[i](x)
            q, k, v = self.qkv[i](h).view(-1, 3, self.h, self.k).unbind(1)
            g = self.gates[i](h).view(-1, 4, self.h)
            tail, head = sched.edge_index
            e = self.edge[i](edge_attr) if edge_attr is not None else 0
            source = torch.sigmoid(g[tail, 0] + e)
            mark = torch.sigmoid(g[head, 1])
            a = sched.line_index[1]
            deg = torch.bincount(tail, minlength=x.size(0)).clamp(min=1).to(x.dtype)
            trans = torch.sigmoid(g[tail[a], 2]) / deg[tail[a]].unsqueeze(-1)
            direct = torch.sigmoid(g[:, 3])
            y = plstm_dag(q * self.k ** -0.5, k, v, source / deg[tail].unsqueeze(-1), trans, mark, direct, sched)
            x = x + self.out[i](y.reshape(x.size(0), -1))
        return x
