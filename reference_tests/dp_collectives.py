"""Check distributed.py's collectives, and the per-state collectives of docs/scaling.md, on uneven
shards: ``mpiexec -n 2 python reference_tests/dp_collectives.py`` prints "collectives ok" on rank 0
(any mismatch raises, which aborts the job with a non-zero exit code).

Every rank builds the same global float64 tensors and takes its rows; each statistic computed from the
shards with a collective must equal the quantizer's own function on the whole tensor.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from minibvit import distributed, gsb, quant  # noqa: E402


def close(a, b, what, rtol=1e-14):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=0, err_msg=what)


def main():
    comm = distributed.init()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7 * comm.world + 3, 5, 6))  # (batch, tokens, channels): uneven shards
    part = distributed.batch_slices(len(x), comm.rank, comm.world)[0]
    xr = x[part.slice]

    # the generic collectives
    close(comm.sum(xr.sum(axis=0)), x.sum(axis=0), "sum", 1e-13)
    assert np.array_equal(comm.max(xr.max(axis=0)), x.max(axis=0)), "max"
    assert np.array_equal(comm.min(xr.min(axis=0)), x.min(axis=0)), "min"
    close(comm.mean(xr.mean(axis=0), weight=len(xr)), x.mean(axis=0), "weighted mean", 1e-13)
    assert np.array_equal(comm.gather(xr), x), "gather"
    b = x[0].copy() if comm.rank == 0 else np.zeros_like(x[0])
    assert np.array_equal(comm.broadcast(b), x[0]), "broadcast"
    comm.barrier()

    # 8-bit min-max activation scales: MAX of max|x| (signed), MIN / MAX of the range (unsigned)
    _, scale, _ = quant.minmax_codes(x, 8, signed=True)
    close(comm.max(np.abs(xr).max()) / 127, scale[0], "min-max signed scale")
    _, scale, zero_point = quant.minmax_codes(x, 8, signed=False)
    lo, hi = min(comm.min(xr.min()), 0), max(comm.max(xr.max()), 0)
    close((hi - lo) / 255, scale[0], "min-max unsigned scale")
    assert np.round(-lo / ((hi - lo) / 255)) == zero_point[0], "min-max zero point"

    # elastic / LSQ first-batch scales: element-count-weighted mean of the shards' initial values
    for signed in (True, False):
        close(comm.mean(quant.elastic_alpha_init(xr, signed), weight=xr.size), quant.elastic_alpha_init(x, signed),
              "elastic alpha init", 1e-13)
    close(comm.mean(quant.lsq_step_init(xr, 8, True, -1), weight=xr.size), quant.lsq_step_init(x, 8, True, -1),
          "LSQ per-channel step init", 1e-13)

    # ASM running centres: per-channel mean (weighted by rows) and median (gathered rows)
    rows = xr.reshape(-1, x.shape[-1])
    close(comm.mean(rows.mean(axis=0), weight=len(rows)), x.reshape(-1, x.shape[-1]).mean(axis=0), "ASM mean", 1e-13)
    assert np.array_equal(np.median(comm.gather(rows), axis=0), np.median(x.reshape(-1, x.shape[-1]), axis=0)), "ASM median"

    # GSB value quantizer: masks from the global max / min, group sizes and first-batch scales from sums
    t1, t2 = gsb.gsb_value_masks(x)
    vmax, vmin = comm.max(xr.max()), comm.min(xr.min())
    r1 = (xr > gsb.GSB_T1_FRACTION * vmax) | (xr < gsb.GSB_T1_FRACTION * vmin)
    r2 = (xr > gsb.GSB_T2_FRACTION * vmax) | (xr < gsb.GSB_T2_FRACTION * vmin)
    assert np.array_equal(r1, t1[part.slice]) and np.array_equal(r2, t2[part.slice]), "GSB value masks"
    groups = (~r1, r1 & ~r2, r2)
    sums = comm.sum(np.array([v for g in groups for v in (np.abs(xr[g]).sum(), g.sum())]))
    means = sums[0::2] / sums[1::2]  # every group is non-empty here (no fallback needed)
    close(2 * means, gsb.gsb_value_init(x), "GSB value alpha init", 1e-13)
    assert comm.sum(np.array([r1.sum(), r2.sum()])).tolist() == [t1.sum(), t2.sum()], "GSB group sizes"

    # GSB attention quantizer (max over the tensor): the global max
    a = np.abs(x)
    assert np.array_equal(gsb.gsb_attn_masks(a)[0][part.slice], a[part.slice] > gsb.GSB_T1_FRACTION * comm.max(a[part.slice].max())), "GSB attention masks"
    if comm.is_main:
        print("collectives ok")


if __name__ == "__main__":
    main()
