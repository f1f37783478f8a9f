"""Triton kernels (installed as ``plstm_graph.kernels``). Imported lazily: nothing here imports triton at
package import time, so plstm-graph works on machines without it."""
