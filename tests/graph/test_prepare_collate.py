"""PrepareCollate / PackedBatch: the host part of prepare_batch done in DataLoader workers, as one buffer.

The unpacked batch must equal ``prepare_batch`` on the same CPU batch: batch attributes, every schedule, every
Triton plan entry (host entries on the host), and the model's outputs and gradients. No GPU here: devices are
``cpu`` (views of the worker's buffer) and ``meta`` (placement bookkeeping)."""
import pickle

import pytest
import torch
from torch_geometric.loader import DataLoader

from plstm_graph.graph import PackedBatch, PrepareCollate, prepare_batch, schedule_from_batch

pytest.importorskip("rdkit")
from plstm_graph.chem import smiles_to_dag  # noqa: E402
from plstm_graph.models.molecule import MoleculeModel  # noqa: E402

from .test_prepare_batch import KEYS, SMILES, _assert_same_schedule, _kdag  # noqa: E402

GRAPHS = [smiles_to_dag(s) for s in SMILES]


def _reference(model, plans: bool):
    batch = next(iter(DataLoader(GRAPHS, batch_size=len(GRAPHS))))
    return prepare_batch(batch, "cpu", keys=model, triton_plans=plans)


@pytest.mark.parametrize("plans", [False, True])
def test_unpacked_equals_prepare_batch(plans):
    if plans:
        _kdag()
    model = MoleculeModel("plstm", hidden=16, num_layers=4)
    collate = PrepareCollate(GRAPHS, keys=model, triton_plans=plans)
    packed = pickle.loads(pickle.dumps(collate(GRAPHS)))  # as it crosses from a worker
    assert isinstance(packed, PackedBatch) and packed.buffer.dtype == torch.uint8
    got, ref = prepare_batch(packed, "cpu"), _reference(model, plans)
    assert set(got.keys()) == set(ref.keys()) and got.num_graphs == ref.num_graphs
    for k, v in ref.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
        else:
            assert got[k] == v, k
    assert got.to_data_list()[2].num_nodes == ref.to_data_list()[2].num_nodes  # PyG's slice bookkeeping kept
    for key in KEYS:
        s, r = got.schedule(*key), ref.schedule(*key)
        _assert_same_schedule(s, r)
        assert s.cache.keys() == r.cache.keys()
        for name, plan in r.cache.items():
            if isinstance(plan, dict):
                for k, v in plan.items():
                    if isinstance(v, torch.Tensor):
                        assert torch.equal(s.cache[name][k], v), (name, k)
                    else:
                        assert s.cache[name][k] == v, (name, k)
            elif isinstance(plan, tuple):  # e.g. both_directions: (src, dst)
                assert all(torch.equal(a, b) for a, b in zip(s.cache[name], plan)), name
            else:
                assert s.cache[name] == plan
    tensors = [t for key in KEYS for t in got.schedule(*key).tensors() if t.numel()] + [got.x, got.edge_index]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1  # all views of the one buffer
    assert all(t.data_ptr() % 16 == 0 for t in tensors)


def test_unpack_to_meta_places_device_and_host_tensors():
    _kdag()
    model = MoleculeModel("plstm", hidden=16, num_layers=4)
    out = PrepareCollate(GRAPHS, keys=model, triton_plans=True)(GRAPHS).unpack("meta")
    assert out.x.device.type == "meta" and out.batch.device.type == "meta"
    for key in KEYS:
        s = out.schedule(*key)  # served from the cache under the new device: nothing rebuilt
        assert all(t.device.type == "meta" for t in s.tensors())
        plan = s.cache["triton_" + s.cache["triton_strategy"]]
        assert all(v.device.type == "cpu" for k, v in plan.items() if k.endswith("_cpu"))


def test_baseline_batch_is_only_packed():
    out = prepare_batch(PrepareCollate(GRAPHS, keys=())(GRAPHS), "cpu")
    ref = next(iter(DataLoader(GRAPHS, batch_size=len(GRAPHS))))
    assert not out.__dict__.get("_schedule_cache")
    for k, v in ref.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(out[k], v), k


@pytest.mark.parametrize("plans", [False, True])
def test_training_step_identical_through_workers(plans):
    if plans:
        _kdag()
    torch.manual_seed(0)
    model = MoleculeModel("plstm", hidden=16, num_layers=4, num_heads=2,
                          plstm_kwargs={"backend": "triton" if plans else "auto"})

    def step(batch):
        model.zero_grad(set_to_none=True)
        loss = (model(batch) ** 2).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_a, grads_a = step(_reference(model, plans))
    loader = torch.utils.data.DataLoader(GRAPHS, batch_size=len(GRAPHS), num_workers=1,
                                         collate_fn=PrepareCollate(GRAPHS, keys=model, triton_plans=plans))
    loss_b, grads_b = step(prepare_batch(next(iter(loader)), "cpu"))
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)


def test_schedules_for_every_carried_key_with_keys_none():
    out = prepare_batch(PrepareCollate(GRAPHS, keys=None)(GRAPHS), "cpu")
    ref = next(iter(DataLoader(GRAPHS, batch_size=len(GRAPHS))))
    assert {k for k, _ in out.__dict__["_schedule_cache"]} == {"P", "P_rev", "D", "D_rev"}
    for key in KEYS:
        _assert_same_schedule(out.schedule(*key), schedule_from_batch(ref, *key))


def test_collate_docstring_example():
    import doctest

    import plstm_graph.graph.collate as mod

    result = doctest.testmod(mod)
    assert result.attempted > 0 and result.failed == 0
