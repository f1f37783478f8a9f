"""The molecule-path Triton kernels compile for a GPU (sm_90) on a machine without one.

The interpreter tests (``TRITON_INTERPRET=1``) run the kernels' Python, which accepts things the GPU compiler
rejects: twice a kernel called a plain helper function (not ``@triton.jit``) and passed every CPU test, then
failed on the H200 at the first launch. This test runs Triton's real compiler front end and code generation
(``triton.compile`` with a CUDA target, down to a cubin through the ptxas that ships with triton) on every
kernel of ``kernels/graph_gates.py``, ``kernels/local_mix.py`` and ``kernels/dag.py``, with the
argument types and constexpr variants the layers launch. It runs in a subprocess with ``TRITON_INTERPRET=0``:
triton's own library functions (``tl.sigmoid``) are bound to the interpreter when triton is imported under
``=1``, as the other kernel tests do. Skipped where triton has no CUDA backend.
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'plstm-graph[triton]')")


def test_molecule_kernels_compile_for_the_gpu():
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    if res.returncode == 3:
        pytest.skip(res.stdout.strip().splitlines()[-1])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert res.stdout.count("compiled") == 14, res.stdout


P, B, IDX = "*fp32", "*bf16", "*i64"


class NoCudaBackend(Exception):
    pass


def _compile(module, name, types, constexprs):
    """Compile ``module.name`` for sm_90 with ``types`` (argument name -> Triton type) and ``constexprs``."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    module.triton, module.tl = triton, tl  # the kernel bodies resolve tl in their module
    if hasattr(module, "_bind_helpers"):  # jitted device helpers the kernels call
        module._bind_helpers()
    fn = getattr(module, name)
    names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    sig = {n: ("constexpr" if n in constexprs else types[n]) for n in names}
    # a JITFunction whatever TRITON_INTERPRET says (triton.jit returns the interpreter's wrapper under =1)
    src = ASTSource(fn=JITFunction(fn), signature=sig, constexprs=dict(constexprs))
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    except (FileNotFoundError, RuntimeError) as err:  # no ptxas / no CUDA backend in this triton
        if "ptxas" in str(err) or "backend" in str(err).lower():
            raise NoCudaBackend(f"triton cannot build CUDA code here: {err}") from err
        raise
    assert "cubin" in kernel.asm
    print("compiled", module.__name__, name, constexprs, flush=True)


def _types(pointers=(), index=(), bf16=(), ints=(), floats=()):
    out = {n: P for n in pointers}
    out.update({n: IDX for n in index})
    out.update({n: B for n in bf16})
    out.update({n: "i32" for n in ints})
    out.update({n: "fp32" for n in floats})
    return out


def graph_gate_kernels(norm):
    from plstm_graph.kernels import graph_gates as kg

    flags = dict(HP=4, BR=128)
    fwd = _types(pointers=("b_s", "b_m", "b_t", "b_d", "src", "mark", "trans", "direct", "ntot", "etot"),
                 index=("eid", "tail", "head", "la", "lb"), bf16=("g", "e"),
                 ints=("g_rs", "e_rs", "N", "E", "L", "H", "nb_e", "nb_l"), floats=("scale",))
    _compile(kg, "_fwd_kernel", fwd, dict(flags, HAS_E=True, HAS_EID=True, NORM=norm))
    bwd = _types(pointers=("src", "mark", "trans", "direct", "dsrc", "dmark", "dtrans", "ddirect", "ntot", "etot",
                           "nred", "ered", "dg", "de", "db"), index=("eid", "tail", "head", "la", "lb"),
                 ints=("dg_rs", "N", "E", "L", "H", "nb_e", "nb_l"), floats=("scale",))
    _compile(kg, "_bwd_kernel", bwd, dict(flags, HAS_E=True, HAS_EID=True, NORM=norm))
    if norm:
        _compile(kg, "_norm_kernel", _types(pointers=("src", "trans", "ntot", "etot"), index=("tail", "la"),
                                            ints=("E", "L", "H", "nb_e")), flags)
        _compile(kg, "_bwd_reduce_kernel",
                 _types(pointers=("src", "trans", "dsrc", "dtrans", "nred", "ered"), index=("tail", "la"),
                        ints=("E", "L", "H", "nb_e")), flags)


def local_mix_kernels(relu):
    from plstm_graph.kernels import local_mix as km

    flags = dict(BD=64, BR=16, HAS_P=True, HAS_EID=True, RELU=relu)
    _compile(km, "_fwd_kernel", _types(pointers=("h", "out"), bf16=("p",), index=("eid", "tail", "head"),
                                       ints=("p_rs", "E", "D")), flags)
    _compile(km, "_bwd_kernel", _types(pointers=("h", "dout", "dh", "dp"), bf16=("p",),
                                       index=("eid", "tail", "head"), ints=("p_rs", "E", "D")), flags)


def dag_kernels():
    """The DAG operator's kernels with row-strided q, k, v (read in place from the layer's projection) and the
    q scale (``kernels.graph_heads``)."""
    from plstm_graph.kernels import dag as kd

    strides = ("q_rs", "k_rs", "v_rs")
    _compile(kd, "_direct_bwd_kernel", _types(pointers=("direct", "dq", "dk", "dv", "ddirect"),
                                              bf16=("q", "k", "v", "dy"),
                                              ints=("R", "H") + strides + ("dq_rs", "dk_rs", "dv_rs"),
                                              floats=("qs",)),
             dict(K=16, V=16, BK=16, BV=16, BR=16))
    index = ("tails", "heads", "e_items", "e_pptr", "in_ptr", "in_pos", "in_line", "n_items", "n_pptr", "nin_ptr",
             "nin_pos", "out_ptr", "out_pos", "out_line", "slot_of")
    i32 = {n: "*i32" for n in index}
    fwd = dict(_types(pointers=("src", "trans", "mark", "direct", "y", "state"), ints=("e_base", "n_base",
                      "slot_base", "H") + strides, floats=("qs",)), q="*fp32", k="*fp32", v="*fp32", **i32)
    for edges in (True, False):
        _compile(kd, "_fwd_kernel", fwd, dict(K=16, V=16, BK=16, BV=16, DO_EDGES=edges, DO_NODES=not edges,
                                              USE_SLOTS=False))
    bwd = dict(_types(pointers=("q", "k", "v", "src", "trans", "mark", "dy", "state", "dstate", "dq", "dk", "dv",
                                "dsrc", "dtrans", "dmark"),
                      ints=("e_base", "slot_base", "H") + strides + ("dq_rs", "dk_rs", "dv_rs"), floats=("qs",)),
               **i32)
    _compile(kd, "_bwd_kernel", bwd, dict(K=16, V=16, BK=16, BV=16, USE_SLOTS=False))


if __name__ == "__main__":  # the subprocess of the test above (TRITON_INTERPRET=0)
    try:
        for flag in (True, False):
            graph_gate_kernels(flag)
            local_mix_kernels(flag)
        dag_kernels()
    except NoCudaBackend as err:
        print(err)
        sys.exit(3)
