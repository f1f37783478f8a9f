"""prepare_batch: schedules (and Triton plans) built on the CPU batch, then moved with it.

No GPU here: the move is exercised CPU -> CPU through the same packing code (``_move_prepared``), and
CPU -> ``meta`` for the device bookkeeping (every tensor moved, host-side plan entries kept)."""
import pytest
import torch
from torch_geometric.loader import DataLoader

from plstm_graph import compile_dag
from plstm_graph.graph import DAGSchedule, prepare_batch, schedule_from_batch, schedule_requirements
from plstm_graph.graph.batching import _move_prepared, _pack_to

from ..conftest import random_dag

pytest.importorskip("rdkit")
from plstm_graph.chem import smiles_to_dag  # noqa: E402
from plstm_graph.models.molecule import MoleculeModel  # noqa: E402

SMILES = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "C", "OCC(O)CO", "C1CC2CCC1C2"]
KEYS = [("P", False), ("P", True), ("D", False), ("D", True)]


def _batch():
    return next(iter(DataLoader([smiles_to_dag(s) for s in SMILES], batch_size=len(SMILES))))


def _kdag():
    import os

    from plstm_graph.ops.dag import _triton_dag_available

    # these tests run the triton backend on CPU tensors: the interpreter (on a GPU machine run with
    # TRITON_INTERPRET=0 the kernel tests in tests/kernels cover the device)
    if not _triton_dag_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton interpreter (TRITON_INTERPRET=1) not available")
    from plstm_graph.kernels import dag

    return dag


def _assert_same_schedule(a: DAGSchedule, b: DAGSchedule):
    for name in a.__dataclass_fields__:
        if name == "cache":
            continue
        va, vb = getattr(a, name), getattr(b, name)
        if isinstance(va, torch.Tensor):
            assert va.dtype == vb.dtype and torch.equal(va, vb), name
        else:
            assert va == vb, name


def test_pack_to_roundtrip_dtypes_shapes_alignment():
    ts = [torch.arange(7), torch.arange(5, dtype=torch.int32), torch.randn(3, 4), torch.tensor([True, False, True]),
          torch.randn(2, 3, dtype=torch.bfloat16), torch.zeros(0, 3), torch.tensor(2.5),
          torch.arange(12).view(3, 4).t(),  # non-contiguous
          torch.zeros(2, 0, dtype=torch.float16)]  # empty, and the last bytes of the buffer
    out = _pack_to(ts, torch.device("cpu"), pin=False)
    for a, b in zip(ts, out):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        if b.numel():
            assert b.data_ptr() % 16 == 0 and b.is_contiguous()
    assert len({b.untyped_storage().data_ptr() for b in out if b.numel()}) == 1  # one buffer, one copy


def test_schedule_to_moves_cache_keeps_host_entries():
    kd = _kdag()
    s = compile_dag(random_dag(20, 0.3, 1), num_nodes=20, mode="P")
    for strategy in ("graph", "levels"):
        kd._plan(s, strategy)
    s.cache["triton_strategy"] = kd._choose_strategy(s)
    m = s.to("meta")
    assert m.cache is not s.cache and m.num_levels == s.num_levels and m.edge_ptr == s.edge_ptr
    for strategy in ("graph", "levels"):
        p, q = s.cache["triton_" + strategy], m.cache["triton_" + strategy]
        assert p.keys() == q.keys()
        for k, v in p.items():
            if k.endswith("_cpu"):
                assert q[k] is v  # host data of the launch loop stays on the host
            elif isinstance(v, torch.Tensor):
                assert q[k].device.type == "meta" and q[k].shape == v.shape and q[k].dtype == v.dtype
            else:
                assert q[k] == v
    assert m.cache["triton_strategy"] == s.cache["triton_strategy"]
    assert all(t.device.type == "meta" for t in m.tensors())
    assert s.to("cpu") is s


def test_moved_plans_are_reused_not_rebuilt(monkeypatch):
    kd = _kdag()
    s = compile_dag(random_dag(16, 0.3, 2), num_nodes=16, mode="P")
    plan = kd._plan(s, kd._choose_strategy(s))
    c = s.map_tensors(lambda t: t.clone())  # a "move" that copies every tensor
    monkeypatch.setattr(kd, "_csr_by", lambda *a: pytest.fail("plan rebuilt"))
    moved = kd._plan(c, kd._choose_strategy(c))
    for k, v in plan.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(moved[k], v)
            assert (moved[k] is v) == k.endswith("_cpu")


def test_requirements_from_model_and_keys():
    model = MoleculeModel("plstm", hidden=16, num_layers=4)
    assert schedule_requirements(model) == (KEYS, {"auto"})
    assert schedule_requirements(["P_rev", ("D", False)])[0] == [("P", True), ("D", False)]
    assert schedule_requirements(None, _batch())[0] == [("P", False), ("P", True), ("D", False), ("D", True)]
    with pytest.raises(ValueError):
        schedule_requirements([("X", False)])


@pytest.mark.parametrize("pack", [True, False])
def test_prepared_schedules_equal_rebuilt(pack):
    batch = _batch()
    ref = _batch()
    scheds = {k: batch.schedule(*k) for k in KEYS}
    moved = _move_prepared(batch, scheds, torch.device("cpu"), pack=pack)
    for key in KEYS:
        got = moved.schedule(*key)
        assert got is not scheds[key]  # the moved copy is served from the cache
        _assert_same_schedule(got, schedule_from_batch(ref, *key))
    for k, v in ref.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(moved[k], v), k


def test_prepare_batch_to_meta_moves_everything():
    kd = _kdag()
    batch = _batch()
    model = MoleculeModel("plstm", hidden=16, num_layers=4)
    out = prepare_batch(batch, "meta", keys=model, triton_plans=True)
    assert out.x.device.type == "meta" and out.edge_index.device.type == "meta"
    ref = _batch()
    for key in KEYS:
        s = out.schedule(*key)
        r = schedule_from_batch(ref, *key)
        assert s.device.type == "meta" and s.num_levels == r.num_levels and s.line_ptr_b == r.line_ptr_b
        strategy = s.cache["triton_strategy"]
        assert strategy == kd._choose_strategy(r)
        assert all(t.device.type == "meta" for t in s.tensors())
        assert s.cache["triton_" + strategy]["e_pptr_cpu"].device.type == "cpu"


def test_prepare_batch_cpu_builds_schedules_once():
    batch = _batch()
    model = MoleculeModel("plstm", hidden=16, num_layers=4)
    out = prepare_batch(batch, "cpu", keys=model)
    assert out is batch
    cached = {k: batch.schedule(*k) for k in KEYS}
    model(batch)
    assert all(batch.schedule(*k) is cached[k] for k in KEYS)
    gin = torch.zeros(3)
    assert prepare_batch(gin, "cpu") is gin  # not a DAGData: plain .to


def test_path_tables_built_for_the_cpu_step_only(monkeypatch):
    """The CPU step of a molecule model runs the ``paths`` backend: its tables come with the prepared batch,
    never built inside ``forward``; for a CUDA target (the triton backend) they are not built at all."""
    from plstm_graph.graph.batching import _build_schedules
    from plstm_graph.ops import dag as dag_ops

    model = MoleculeModel("plstm", hidden=16, num_layers=4)
    batch = prepare_batch(_batch(), "cpu", keys=model)
    tables = {k: batch.schedule(*k).cache["paths"] for k in KEYS}
    calls = []

    def spy(*args):
        calls.append(args[-1])
        return plstm_dag_paths(*args)
    plstm_dag_paths = dag_ops.plstm_dag_paths
    monkeypatch.setattr(dag_ops, "plstm_dag_paths", spy)
    model(batch)
    assert len(calls) == len(KEYS)  # every layer ran on the paths backend ...
    assert all(batch.schedule(*k).cache["paths"] is tables[k] for k in KEYS)  # ... with the prepared tables
    # a CUDA target (the host side needs no GPU): no path tables
    from plstm_graph.graph.batching import _wants_paths

    assert _wants_paths(torch.device("cuda"), {"auto"}) is None
    assert _wants_paths(torch.device("cpu"), {"auto"}) == "auto"
    assert _wants_paths(torch.device("cuda"), {"paths"}) == "all"
    other = _batch()
    _build_schedules(other, KEYS, triton_plans=False, paths=None)
    assert not any("paths" in other.schedule(*k).cache for k in KEYS)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_training_step_identical_with_prepared_batch(backend, monkeypatch):
    if backend == "triton":
        kd = _kdag()
    torch.manual_seed(0)
    model = MoleculeModel("plstm", hidden=16, num_layers=4, num_heads=2, plstm_kwargs={"backend": backend})

    def step(batch):
        model.zero_grad(set_to_none=True)
        loss = (model(batch) ** 2).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_a, grads_a = step(_batch())
    batch = _batch()
    needed, backends = schedule_requirements(model)
    assert backends == {backend}
    scheds = {k: batch.schedule(*k) for k in needed}
    if backend == "triton":
        for s in scheds.values():
            kd._plan(s, kd._choose_strategy(s))
        monkeypatch.setattr(kd, "_csr_by", lambda *a: pytest.fail("plan rebuilt inside the step"))
    moved = _move_prepared(batch, scheds, torch.device("cpu"))
    loss_b, grads_b = step(moved)
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)


def test_lightning_transfer_hook_prepares():
    pytest.importorskip("lightning")
    from plstm_graph.train.lightning import MoleculeLitModule

    lit = MoleculeLitModule(dict(model="plstm", hidden=16, num_layers=2), "regression", [0.0], [1.0])
    batch = _batch()
    out = lit.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    keys = {k for k, _ in out.__dict__["_schedule_cache"]}
    assert keys == {"P", "D"}  # default_pattern(2): P forward, D forward


def test_batching_docstring_examples():
    import doctest

    import plstm_graph.graph.batching as mod

    result = doctest.testmod(mod)
    assert result.attempted > 0 and result.failed == 0
