"""Check distributed.py's collectives, and every quantizer function that takes a statistic of its input
with ``reduce=comm``, on uneven shards: ``mpiexec -n 2 python reference_tests/dp_collectives.py``
prints "collectives ok" on rank 0 (any mismatch raises, which aborts the job with a non-zero exit code).

Every rank builds the same global float64 tensors and takes its rows. With reduce=comm, a quantizer's
forward on the shard must give exactly the rows of its forward on the whole tensor, its input gradient
the rows of the whole input gradient, and the sum over ranks of its scale gradients (and its first-batch
scales, running centres) the whole tensor's, to the rounding of the sums.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from minibvit import binaryvit, distributed, gsb, quant  # noqa: E402


def close(a, b, what, rtol=1e-13):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=0, err_msg=what)


def same(a, b, what):
    assert np.array_equal(a, b), what


def check_pair(what, comm, rows, forward, backward, x, g):
    """forward(t, reduce) -> (out, cache); backward(dout, cache) -> (dx, *param grads)."""
    out_whole, cache_whole = forward(x, None)
    out, cache = forward(x[rows], comm)
    same(out, out_whole[rows], f"{what}: forward")
    whole, part = backward(g, cache_whole), backward(g[rows], cache)
    same(part[0], whole[0][rows], f"{what}: input gradient")
    for k, (p, w) in enumerate(zip(part[1:], whole[1:])):
        close(comm.sum(p), w, f"{what}: parameter gradient {k}")


def main():
    comm = distributed.init()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7 * comm.world + 3, 5, 6))  # (batch, tokens, channels): uneven shards
    g = rng.standard_normal(x.shape)
    rows = distributed.batch_slices(len(x), comm.rank, comm.world)[0].slice
    xr = x[rows]

    # the generic collectives
    close(comm.sum(xr.sum(axis=0)), x.sum(axis=0), "sum")
    same(comm.max(xr.max(axis=0)), x.max(axis=0), "max")
    same(comm.min(xr.min(axis=0)), x.min(axis=0), "min")
    close(comm.mean(xr.mean(axis=0), weight=len(xr)), x.mean(axis=0), "weighted mean")
    same(comm.gather(xr), x, "gather")
    b = x[0].copy() if comm.rank == 0 else np.zeros_like(x[0])
    same(comm.broadcast(b), x[0], "broadcast")
    comm.barrier()

    # 8-bit min-max: signed (max|x|) and unsigned (min, max), per tensor and per channel
    for signed in (True, False):
        for axis in (None, -1):
            t = x if signed else x + 0.4  # unsigned: a range that is not symmetric
            check_pair(f"min-max signed={signed} axis={axis}", comm, rows,
                       lambda t, r: quant.minmax_quant_forward(t, 8, signed, axis, r),
                       lambda d, c: (quant.minmax_quant_backward(d, c),), t, g)

    # elastic binarizer: first-batch alpha, and the 1/sqrt(N) of the alpha gradient
    for signed, alpha_grad in ((True, "lsq"), (True, "gsb"), (False, "lsq")):
        close(quant.elastic_alpha_init(xr, signed, comm), quant.elastic_alpha_init(x, signed), "elastic alpha init")
        alpha = quant.elastic_alpha_init(x, signed)
        check_pair(f"elastic signed={signed} {alpha_grad}", comm, rows,
                   lambda t, r: quant.elastic_binarize_forward(t, alpha, signed, alpha_grad, r),
                   quant.elastic_binarize_backward, x, g)

    # LSQ on activations: first-batch step and the 1/sqrt(N Qp) of the step gradient, per tensor / channel
    for axis in (None, -1):
        close(quant.lsq_step_init(xr, 8, True, axis, comm), quant.lsq_step_init(x, 8, True, axis), "LSQ step init")
        step = quant.lsq_step_init(x, 8, True, axis)
        check_pair(f"LSQ axis={axis}", comm, rows, lambda t, r: quant.lsq_forward(t, step, 8, True, axis, r),
                   quant.lsq_backward, x, g)

    # ASM running centres: per-channel mean (weighted by rows) and median (gathered rows), and its inner
    # binarizer's first-batch alpha, through the wrapper's collective attribute
    for center in ("mean", "median"):
        asms = [binaryvit.ASM(quant.make_quantizer("a_elastic_signed", dtype=np.float64), 6, center=center,
                              dtype=np.float64) for _ in range(2)]
        asms[1].collective = asms[1].inner.collective = comm
        for t in (x, x[::-1] * 0.5):  # the first batch sets the centre, the second updates it
            asms[0].forward(t, True)
            asms[1].forward(t[rows], True)
        close(asms[1].buffers["running_center"], asms[0].buffers["running_center"], f"ASM {center} centre")
        close(asms[1].params["alpha"], asms[0].params["alpha"], f"ASM {center} inner alpha")

    # GSB values: masks of the global max / min, group sizes, first-batch alphas (also with a group that
    # is empty on some ranks only, and with one empty everywhere: the fallback follows the global counts)
    v = x.reshape(len(x), 5, 2, 3).transpose(0, 2, 1, 3).copy()  # (B, heads, N, head_dim)
    gv = g.reshape(v.shape)
    sparse = np.zeros_like(v)
    sparse[0, 0, 0, 0], sparse[-1, 1, 2, 1] = 10.0, 7.5  # T2 on rank 0's rows, T1 minus T2 on the last rank's
    lonely = np.zeros_like(v)
    lonely[-1, 0, 0, 0] = 10.0  # T1 minus T2 empty everywhere; every row but one all zero
    for t, what in ((v, "random"), (sparse, "group on one rank"), (lonely, "empty group")):
        close(gsb.gsb_value_init(t[rows], comm), gsb.gsb_value_init(t), f"GSB value init, {what}")
    for mode in gsb.GSB_MODES:
        alphas = gsb.gsb_value_init(v)
        check_pair(f"GSB value {mode}", comm, rows, lambda t, r: gsb.gsb_value_forward(t, alphas, mode, r),
                   gsb.gsb_value_backward, v, gv)

    # GSB attention: max over the tensor (a collective) or per row (none); counts and init either way
    a = np.exp(v) / np.exp(v).sum(axis=-1, keepdims=True)
    for max_over in gsb.GSB_MAX_OVER:
        close(gsb.gsb_attn_init(a[rows], max_over, comm), gsb.gsb_attn_init(a, max_over), f"GSB attn init {max_over}")
        close(gsb.gsb_attn_init(sparse[rows], max_over, comm), gsb.gsb_attn_init(sparse, max_over),
              f"GSB attn init {max_over}, group on one rank")
        for mode in gsb.GSB_MODES:
            alphas = gsb.gsb_attn_init(a, max_over)
            check_pair(f"GSB attention {mode} {max_over}", comm, rows,
                       lambda t, r: gsb.gsb_attn_forward(t, alphas, mode, max_over, r), gsb.gsb_attn_backward, a, gv)
    if comm.is_main:
        print("collectives ok")


if __name__ == "__main__":
    main()
