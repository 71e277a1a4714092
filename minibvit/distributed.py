"""Data-parallel training over MPI: launch detection, batch slices, bucketed gradient allreduce
overlapped with the backward, the communicator the quantizers take their input statistics through
(global_quantizer_state), and fail-fast error handling.

    comm = distributed.init()                  # SingleProcess, or MPICommunicator under mpiexec/srun
    distributed.broadcast_state(model.state_dict(), comm)
    reducer = distributed.GradientReducer(model.parameters(), comm)
    for each global batch (x, y):              # the same global batch on every rank
        for part in distributed.batch_slices(len(y), comm.rank, comm.world, accum_steps):
            with distributed.global_quantizer_state(model, comm):
                logits, cache = model.forward(x[part.slice], training=True, rng=rng)
            loss, dlogits = loss_fn(logits, y[part.slice])  # mean over the rank's slice
            reducer.begin(part)
            model.backward(dlogits, cache, on_grads_ready=reducer.hook(model))
        grads = reducer.finish()              # = the gradient of the mean loss over the global batch
        opt.step(grads, lr=lr)                 # the same step on every rank

A single process (no launcher in the environment) gets ``SingleProcess``, whose collectives are
identities, and never imports mpi4py; importing this module changes nothing. docs/scaling.md says how
each piece of data-dependent quantizer state is made global, and has the trainer integration, the
measured figures and the scaling model.
"""
import contextlib
import hashlib
import os
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np

DEFAULT_TIMEOUT_S = 1800.0
"""How long a rank waits for its peers in any collective before it aborts the job (override with
MINIBVIT_MPI_TIMEOUT, seconds). It must exceed the longest legitimate skew between ranks: rank 0
writing a checkpoint or evaluating while the others wait at a barrier."""

DEFAULT_BUCKET_BYTES = 4 << 20

# (rank variable, size variable, launcher) in the order they are trusted. srun sets SLURM_STEP_NUM_TASKS
# only inside a job step, so a batch script that runs python without srun stays a single process.
_LAUNCH_VARIABLES = (
    ("PMI_RANK", "PMI_SIZE", "mpiexec (PMI: MPICH hydra, Intel MPI, srun --mpi=pmi2)"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "Open MPI mpirun"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MVAPICH2"),
    ("PMIX_RANK", None, "PMIx (srun --mpi=pmix, Open MPI 5)"),
    ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "srun"),
)


@dataclass(frozen=True)
class Launch:
    rank: int
    world: int  # None when the launcher does not say (PMIx): MPI is initialised to find out
    launcher: str


def detect_launch(environ=None):
    """The rank and world size the launcher put in the environment, or rank 0 of 1 ("python")."""
    environ = os.environ if environ is None else environ
    for rank_var, size_var, launcher in _LAUNCH_VARIABLES:
        if rank_var in environ and (size_var is None or size_var in environ):
            try:
                rank = int(environ[rank_var])
                world = int(environ[size_var]) if size_var else None
            except ValueError:
                raise ValueError(f"{rank_var}={environ[rank_var]!r} / {size_var}={environ.get(size_var)!r} "
                                 f"are not integers; is this a real {launcher} launch?") from None
            return Launch(rank, world, launcher)
    return Launch(0, 1, "python")


def local_ranks(environ=None):
    """How many ranks share this node (MPI_LOCALNRANKS, OMPI_COMM_WORLD_LOCAL_SIZE, SLURM_NTASKS_PER_NODE;
    1 when unknown): a rank should use os.cpu_count() // local_ranks() threads."""
    environ = os.environ if environ is None else environ
    for name in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE"):
        if name in environ:
            return max(1, int(environ[name]))
    per_node = environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    return max(1, int(per_node)) if per_node.isdigit() else 1


# ---------------------------------------------------------------------------------------------
# communicators: one interface, an identity for one process and MPI for many


class SingleProcess:
    """The communicator of a run without MPI: every collective is the identity (copies, so callers
    may write into results as they would with MPI)."""

    rank, world, launcher = 0, 1, "python"

    @property
    def is_main(self):
        return True

    def sum(self, x):
        return np.array(x, copy=True)

    def max(self, x):
        return np.array(x, copy=True)

    def min(self, x):
        return np.array(x, copy=True)

    def mean(self, x, weight=1.0):
        """Weighted mean over ranks of x (each rank's local mean) with this rank's weight (its
        element count); over equal shards it is sum / world."""
        return np.array(x, copy=True)

    def gather(self, x):
        """Every rank's array concatenated along axis 0, in rank order (lengths may differ)."""
        return np.array(x, copy=True)

    def broadcast(self, x, root=0):
        """x from rank `root`, in place."""
        return x

    def barrier(self):
        pass

    def start_sum(self, buffer):
        """Start an in-place sum of `buffer` over the ranks; returns a request for wait()."""
        return None

    def test(self, requests):
        return True

    def wait(self, requests, what):
        pass

    def abort(self, message, code=1):
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(code)


ABORT_GRACE_S = 0.5  # seconds between printing the reason and MPI_Abort


class MPICommunicator(SingleProcess):
    """COMM_WORLD through mpi4py. Every wait polls a non-blocking operation with a deadline, so a dead
    or stuck peer ends the job with a message (abort) instead of a hang."""

    def __init__(self, mpi, comm, launcher, timeout_s):
        self.MPI, self.comm, self.launcher, self.timeout_s = mpi, comm, launcher, timeout_s
        self.rank, self.world = comm.Get_rank(), comm.Get_size()

    @property
    def is_main(self):
        return self.rank == 0

    def _allreduce(self, x, op, what):
        buf = np.array(x, copy=True)
        self.wait([self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=op)], what)
        return buf

    def sum(self, x):
        return self._allreduce(x, self.MPI.SUM, "sum")

    def max(self, x):
        return self._allreduce(x, self.MPI.MAX, "max")

    def min(self, x):
        return self._allreduce(x, self.MPI.MIN, "min")

    def mean(self, x, weight=1.0):
        x = np.asarray(x)
        both = self.sum(np.concatenate([np.ravel(x).astype(np.float64) * weight, [float(weight)]]))
        return (both[:-1] / both[-1]).astype(x.dtype).reshape(x.shape)

    def gather(self, x):
        x = np.ascontiguousarray(x)
        counts = np.empty(self.world, dtype=np.int64)
        self.wait([self.comm.Iallgather(np.array([x.size], dtype=np.int64), counts)], "gather sizes")
        out = np.empty(int(counts.sum()), dtype=x.dtype)
        self.wait([self.comm.Iallgatherv(x.reshape(-1), (out, counts))], "gather")
        return out.reshape((-1,) + x.shape[1:])

    def broadcast(self, x, root=0):
        self.wait([self.comm.Ibcast(x, root=root)], "broadcast")
        return x

    def barrier(self):
        self.wait([self.comm.Ibarrier()], "barrier")

    def start_sum(self, buffer):
        return self.comm.Iallreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM)

    def test(self, requests):
        """Drive MPI's progress engine (MPICH advances a non-blocking operation only inside MPI calls)."""
        return self.MPI.Request.Testall(requests)

    def wait(self, requests, what):
        deadline = time.monotonic() + self.timeout_s
        delay = 1e-5
        while not self.MPI.Request.Testall(requests):
            if time.monotonic() > deadline:
                self.abort(f"[rank {self.rank}/{self.world}] waited {self.timeout_s:.0f} s for the {what} "
                           f"collective: a peer is dead or stuck; aborting the job "
                           f"(raise MINIBVIT_MPI_TIMEOUT if a rank legitimately takes longer)")
            time.sleep(delay)
            delay = min(2 * delay, 1e-3)

    def abort(self, message, code=1):
        print(message, file=sys.stderr, flush=True)
        # MPI_Abort tears the job down at once, and mpiexec may then drop output it has not forwarded
        # yet (seen: a job that exited 1 with an empty stderr): give the message time to get out.
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(code)


_current = None


def init(timeout_s=None, environ=None):
    """The process's communicator, created on the first call: SingleProcess without a launcher,
    otherwise MPI's COMM_WORLD (mpi4py imported here, not before). With MPI it also installs
    abort_on_uncaught(), so a rank that raises takes the job down."""
    global _current
    if _current is not None:
        return _current
    environ = os.environ if environ is None else environ
    launch = detect_launch(environ)
    if launch.world == 1:
        _current = SingleProcess()
        return _current
    try:
        import mpi4py
    except ImportError:
        raise RuntimeError(f"launched by {launch.launcher} with {launch.world or 'several'} ranks, but mpi4py is "
                           f"not installed: pip install 'minibvit[mpi]'") from None
    mpi4py.rc.thread_level = "funneled"  # only the main thread calls MPI (Numba/BLAS threads never do)
    from mpi4py import MPI

    timeout_s = float(environ.get("MINIBVIT_MPI_TIMEOUT", DEFAULT_TIMEOUT_S)) if timeout_s is None else timeout_s
    comm = MPICommunicator(MPI, MPI.COMM_WORLD, launch.launcher, timeout_s)
    if launch.world is not None and (comm.world != launch.world or comm.rank != launch.rank):
        comm.abort(f"{launch.launcher} announced rank {launch.rank} of {launch.world}, but MPI sees rank "
                   f"{comm.rank} of {comm.world}: mpi4py is built against a different MPI than the launcher "
                   f"(use the mpiexec of the MPI that mpi4py loads: python -c 'import mpi4py; print(mpi4py.get_config())')")
    _current = comm
    abort_on_uncaught(comm)
    return comm


def current():
    """The communicator of init() (SingleProcess before init())."""
    return _current or SingleProcess()


def is_main():
    """True on rank 0 (and in a single process): the rank that logs and writes checkpoints."""
    return current().is_main


def barrier():
    current().barrier()


def abort_on_uncaught(comm):
    """sys.excepthook that prints the traceback with the rank and aborts every rank (MPI_Abort);
    without it the other ranks would wait for this one forever, or Python's MPI_Finalize at exit
    would."""
    def hook(kind, value, tb):
        text = "".join(traceback.format_exception(kind, value, tb))
        comm.abort(f"[rank {comm.rank}/{comm.world}] uncaught {kind.__name__}; aborting the job\n{text}", 1)

    sys.excepthook = hook


@contextlib.contextmanager
def abort_on_error(comm=None):
    """Abort the whole job (exit code 1, or a SystemExit's non-zero code) when the body raises on
    this rank; for code that catches exceptions before sys.excepthook would see them."""
    comm = comm or current()
    try:
        yield
    except SystemExit as e:
        if comm.world > 1 and e.code not in (0, None):
            comm.abort(f"[rank {comm.rank}/{comm.world}] exiting with {e.code}; aborting the job",
                       e.code if isinstance(e.code, int) else 1)
        raise
    except BaseException as e:
        if comm.world == 1:
            raise
        text = traceback.format_exc()
        comm.abort(f"[rank {comm.rank}/{comm.world}] {type(e).__name__}: {e}; aborting the job\n{text}", 1)


# ---------------------------------------------------------------------------------------------
# batches


@dataclass(frozen=True)
class Part:
    """One rank's share of one micro-step of a global batch."""

    slice: slice  # rows of the global batch this rank computes in this micro-step
    weight: float  # its rows / global batch: the factor of its mean loss in the global mean loss
    last: bool  # the last micro-step: the gradient is complete after it


def batch_slices(global_batch, rank, world, accum_steps=1):
    """This rank's parts of a global batch of `global_batch` rows: the batch is cut into accum_steps
    micro-steps, and each micro-step into `world` contiguous slices (sizes differ by at most one).
    Scaling each part's mean loss by its weight makes the summed gradient that of the mean loss over
    the global batch, so the global batch means what it means in one process. Every rank must get at
    least one row per micro-step."""
    if accum_steps < 1 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"batch_slices needs accum_steps >= 1 and 0 <= rank < world, got "
                         f"accum_steps={accum_steps}, rank={rank}, world={world}")
    if global_batch < world * accum_steps:
        raise ValueError(f"a global batch of {global_batch} rows cannot give each of {world} ranks a row in each of "
                         f"{accum_steps} micro-steps; use a batch of at least {world * accum_steps} rows, "
                         f"fewer ranks or fewer --accum-steps")
    parts = []
    for a in range(accum_steps):
        lo, hi = global_batch * a // accum_steps, global_batch * (a + 1) // accum_steps
        start, stop = lo + (hi - lo) * rank // world, lo + (hi - lo) * (rank + 1) // world
        parts.append(Part(slice(start, stop), (stop - start) / global_batch, a == accum_steps - 1))
    return parts


def owned_batches(n_batches, comm):
    """The indices of whole batches this rank handles when ranks share out a loop of n_batches (e.g.
    evaluation: each rank evaluates whole batches, so batch statistics stay those of one process,
    and comm.sum of the per-rank counts gives the totals)."""
    return range(comm.rank, n_batches, comm.world)


# ---------------------------------------------------------------------------------------------
# gradients


def _ready_order(names):
    """Names in the order the ViT backward completes them: head and final norm, the blocks from the
    last to the first, then the stem (tokens, position embedding, patch embedding)."""
    def key(item):
        index, name = item
        if name.startswith("blocks."):
            return (1, -int(name.split(".")[1]), index)
        return (0 if name.startswith(("head", "norm.")) else 2, 0, index)

    return [name for _, name in sorted(enumerate(names), key=key)]


class GradientReducer:
    """The sum over ranks (and micro-steps) of weighted gradients in one flat buffer, cut into buckets
    of about `bucket_bytes` in backward order; with `overlap`, a bucket's non-blocking allreduce starts
    as soon as the backward has completed all its gradients, while earlier blocks are still being
    differentiated.

    params: {name: array} (model.parameters()), one floating dtype.
    """

    def __init__(self, params, comm, bucket_bytes=DEFAULT_BUCKET_BYTES, overlap=True):
        dtypes = {p.dtype for p in params.values()}
        if len(dtypes) != 1 or not np.issubdtype(next(iter(dtypes)), np.floating):
            raise ValueError(f"GradientReducer needs parameters of one floating dtype, got {sorted(map(str, dtypes))}")
        self.comm, self.overlap = comm, overlap
        order = _ready_order(list(params))
        self.flat = np.zeros(sum(params[n].size for n in order), dtype=dtypes.pop())
        self.views, self.bucket_of, self.buckets = {}, {}, []  # bucket: (flat slice, names)
        offset, start, names = 0, 0, []
        for name in order:
            size = params[name].size
            self.views[name] = self.flat[offset:offset + size].reshape(params[name].shape)
            offset += size
            names.append(name)
            if (offset - start) * self.flat.itemsize >= bucket_bytes or name == order[-1]:
                for n in names:
                    self.bucket_of[n] = len(self.buckets)
                self.buckets.append((slice(start, offset), names))
                start, names = offset, []
        self.bytes_per_step = self.flat.nbytes if comm.world > 1 else 0
        self.wait_s = 0.0  # time finish() waited for communication (not hidden behind the backward)
        self.overlap_s = 0.0  # time from the first bucket's start to finish(): the backward that can hide it
        self._part, self._missing, self._requests, self._started = None, None, [], set()
        self._first_start, self._reported = None, set()

    def begin(self, part):
        """Start a micro-step (a Part of batch_slices); the first micro-step of a step clears the sums."""
        if self._part is None or self._part.last:
            self.flat[...] = 0
            self._reported = set()
        self._part = part
        self._missing = [len(names) for _, names in self.buckets]
        self._requests, self._started, self._first_start = [], set(), None

    def hook(self, model):
        """The on_grads_ready callback for model.backward."""
        return lambda names: self.ready(names, model.grads)

    def ready(self, names, grads):
        """Add weight * gradient of `names` (complete in `grads`) to the sums; on the last micro-step,
        start every bucket that is now complete."""
        part = self._part
        if part is None:
            raise RuntimeError("GradientReducer.ready() before begin(part)")
        for name in names:
            if name not in self.views:
                raise ValueError(f"the backward reported a gradient {name!r} that is not among the reducer's "
                                 f"parameters; build the GradientReducer from model.parameters()")
            self.views[name] += self.flat.dtype.type(part.weight) * grads[name]
            self._missing[self.bucket_of[name]] -= 1
            self._reported.add(name)
        if part.last and self.overlap:
            for b, missing in enumerate(self._missing):
                if missing == 0:
                    self._start(b)
            self.comm.test(self._requests)

    def _start(self, b):
        if b in self._started:
            return
        if self._first_start is None:
            self._first_start = time.perf_counter()
        if self.comm.world > 1:
            self._requests.append(self.comm.start_sum(self.flat[self.buckets[b][0]]))
        self._started.add(b)

    def finish(self):
        """After the backward of a micro-step: None before the last micro-step, then {name: summed
        gradient} for the names the backward reported (views into the flat buffer, valid until the
        next begin), so that the optimizer skips a parameter without a gradient, as in one process."""
        if not self._part.last:
            return None
        t0 = time.perf_counter()
        self.overlap_s = t0 - self._first_start if self._first_start is not None else 0.0
        for b in range(len(self.buckets)):  # a parameter without a gradient adds its zeros
            self._start(b)
        self.comm.wait(self._requests, "gradient allreduce")
        self.wait_s = time.perf_counter() - t0
        return {name: view for name, view in self.views.items() if name in self._reported}


@contextlib.contextmanager
def global_quantizer_state(model, comm):
    """While the body runs (the model's training forward on this rank's slice of a micro-step), every
    activation quantizer of `model` takes the statistics of its input over all ranks' slices through
    `comm`'s collectives, so the forward, its cache and the quantizer state it updates are those of
    one process on the whole micro-step:

    - 8-bit min-max activation scales: MAX of max|x| (signed), MAX of (-min x, max x) (unsigned);
    - the first-batch scales of the elastic binarizers and activation LSQ quantizers: the
      element-count-weighted mean of the ranks' initial values (all are linear in a mean |x|);
    - the sizes 1/sqrt(N) of the elastic alpha / LSQ step gradients: SUM of the slices' sizes;
    - ASM's running centre: the row-weighted mean of the ranks' per-channel means, or the per-channel
      median of all ranks' rows (gather);
    - GSB: MAX of max / -min v and of max A (max_over="tensor"), SUM of the group counts and, at the
      first batch, of the groups' sums of |x|.

    The quantizers call the collectives themselves (each quantizer's `collective`, which this sets on
    every activation role, and on an ASM's inner binarizer, and resets afterwards), in training
    forwards only; the backward reads what it needs from the forward's cache, so it may run outside
    the body. Weight roles are left alone (weights are the same on every rank). With SingleProcess the
    collectives are identities and the forward gives the bits of a forward without this context.
    Every rank must run the same forward (the same model, one call per quantizer in the same order).
    """
    quantizers = []
    for role, q in model.quantizers.items():
        while q is not None and not role.endswith(".weight"):
            if not hasattr(q, "collective"):
                raise TypeError(f"the quantizer of {role!r} ({q!r}) has no 'collective' attribute: it cannot take "
                                f"its input statistics over the ranks; give it one (see minibvit.quant's docstring)")
            quantizers.append(q)
            q = getattr(q, "inner", None)
    previous = [q.collective for q in quantizers]
    for q in quantizers:
        q.collective = comm
    try:
        yield
    finally:
        for q, collective in zip(quantizers, previous):
            q.collective = collective


# ---------------------------------------------------------------------------------------------
# replicas


def broadcast_state(arrays, comm):
    """Copy rank 0's arrays (e.g. model.state_dict(), optimizer moments) to every rank, in place."""
    for name in sorted(arrays):
        comm.broadcast(arrays[name], root=0)


def state_digest(arrays):
    """A hash of the names, dtypes, shapes and bytes of arrays (identical replicas have equal digests)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def check_replicas(arrays, comm, what="model state"):
    """Abort unless every rank holds bit-identical arrays (cheap next to a checkpoint write)."""
    digest = np.frombuffer(bytes.fromhex(state_digest(arrays)), dtype=np.uint8)
    if comm.world > 1 and not np.array_equal(comm.min(digest), comm.max(digest)):
        comm.abort(f"[rank {comm.rank}/{comm.world}] the {what} differs between ranks: a collective is "
                   f"missing for some data-dependent state (docs/scaling.md)")
