"""RetNetLM: token-by-token decoding reproduces the chunkwise/parallel logits with an O(1) state."""
from __future__ import annotations

import torch

from plstm_graph.models import RetNetLM

F64 = torch.float64


def _model(**kw):
    torch.manual_seed(0)
    return RetNetLM(vocab_size=40, dim=32, num_layers=2, num_heads=2, chunk_size=8, **kw).double()


def test_step_reproduces_forward_logits_with_constant_state():
    model = _model()
    ids = torch.randint(0, 40, (3, 29))
    logits = model(ids)
    parallel = _model(mode="parallel")
    torch.testing.assert_close(parallel(ids), logits)
    state, rows, sizes = None, [], set()
    for t in range(ids.shape[1]):
        out, state = model.step(ids[:, t], state)
        rows.append(out)
        sizes.add(state.nbytes())
    torch.testing.assert_close(torch.stack(rows, 1), logits)
    assert len(sizes) == 1 and state.position == 29  # state size does not grow with the sequence


def test_forward_continues_from_state():
    model = _model()
    ids = torch.randint(0, 40, (2, 20))
    a, s = model(ids[:, :13], output_state=True)
    b = model(ids[:, 13:], state=s)
    torch.testing.assert_close(torch.cat([a, b], 1), model(ids))


def test_greedy_generate_follows_forward_argmax():
    model = _model()
    prompt = torch.randint(0, 40, (2, 5))
    out = model.generate(prompt, max_new_tokens=7, temperature=0)
    assert out.shape == (2, 12) and torch.equal(out[:, :5], prompt)
    logits = model(out[:, :-1])
    torch.testing.assert_close(out[:, 5:], logits[:, 4:].argmax(-1))
    sampled = model.generate(prompt[:, :1], max_new_tokens=4, top_k=5, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 5) and int(sampled.max()) < 40


def test_training_step_reduces_loss():
    model = RetNetLM(vocab_size=10, dim=16, num_layers=1, num_heads=2, chunk_size=4)
    ids = torch.arange(24).remainder(10)[None].repeat(4, 1)  # a learnable periodic pattern
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 10), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
