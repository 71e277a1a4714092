"""Batches decoded in worker processes into a shared-memory ring: ``BatchLoader``.

The parent hands out one task per batch (step, ring slot, sample indices); a worker decodes the
batch's images with the per-image transform straight into that slot of a
``multiprocessing.shared_memory`` ring, uint8 (num_slots, B, S, S, 3), and reports back. The parent
yields the slots in step order as views (no copy), keeping up to num_slots batches decoded ahead.

Determinism: image i of batch `step` is transformed with
``Generator([seed, CROP_STREAM, epoch, step, first_index + i])``, whichever worker does it, so the
batches do not depend on the number of workers, on timing, or on start_step (a resumed epoch yields
exactly the remaining batches of the uninterrupted one).

Process safety: workers are started with ``spawn`` by default (a fresh interpreter: no copied
OpenMP/Numba thread pools or locks of the parent, which fork would inherit in an undefined state),
ignore SIGINT (the parent decides when to stop) and exit on their own once the parent is gone.
``close()`` (also by ``with``, and at garbage collection / interpreter exit) stops them and unlinks
the shared memory; a worker that raises or dies makes the parent raise ``LoaderError`` within
``poll_interval`` seconds, never hang.

A source is any picklable object with ``__len__``, ``labels`` (int64 array), ``open(i)`` -> a path
or a binary file object Pillow can read, and ``describe(i)`` -> a string naming the sample
(minibvit.imagenet.FolderSource / HubSource).
"""
from __future__ import annotations

import itertools
import math
import multiprocessing
import queue
import signal
import traceback
import weakref
from multiprocessing import shared_memory

import numpy as np

from .augment import CROP_STREAM


class LoaderError(RuntimeError):
    """A worker failed (raised, or died) or the loader was used after close()."""


def steps_in_epoch(num_samples, batch_size, drop_last):
    return num_samples // batch_size if drop_last else math.ceil(num_samples / batch_size)


def decode_batch(source, transform, indices, seed, epoch, step, first_index=0, out=None):
    """Batch `step` decoded in this process into out (or a new array): uint8 (len(indices), S, S, 3).

    This is what a worker writes into its ring slot. Image i draws from
    Generator([seed, CROP_STREAM, epoch, step, first_index + i]). A failing sample raises
    LoaderError naming it.
    """
    for i, index in enumerate(indices):
        rng = np.random.default_rng([seed, CROP_STREAM, epoch, step, first_index + i])
        try:
            image = transform(source.open(int(index)), rng)
        except Exception as error:
            raise LoaderError(f"sample {int(index)} ({source.describe(int(index))}): "
                              f"{type(error).__name__}: {error}") from error
        if out is None:
            out = np.empty((len(indices),) + image.shape, np.uint8)
        out[i] = image
    return out


def _worker_main(source, transform, shm_name, ring_shape, tasks, results):
    """Worker loop: take (token, step, slot, indices, seed, epoch, first_index), decode, report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # exit without waiting to flush results nobody will read (we only exit when told or orphaned)
    results.cancel_join_thread()
    parent = multiprocessing.parent_process()
    shm = shared_memory.SharedMemory(name=shm_name)
    ring = np.ndarray(ring_shape, np.uint8, buffer=shm.buf)
    try:
        while True:
            try:
                task = tasks.get(timeout=0.25)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    return
                continue
            if task is None:
                return
            token, step, slot, indices, seed, epoch, first_index = task
            try:
                decode_batch(source, transform, indices, seed, epoch, step, first_index, out=ring[slot])
                results.put((token, step, slot, None))
            except Exception as error:  # reported to the parent, which raises LoaderError
                results.put((token, step, slot, f"{error}\n{traceback.format_exc()}"))
    finally:
        del ring
        shm.close()


def _shutdown(workers, tasks, results, shm):
    """Stop the workers (sentinel, then terminate, then kill) and unlink the shared memory."""
    for _ in workers:
        try:
            tasks.put_nowait(None)
        except Exception:
            pass
    for p in workers:
        p.join(timeout=2.0)
    for p in workers:
        if p.is_alive():
            p.terminate()
            p.join(timeout=1.0)
        if p.is_alive():
            p.kill()
            p.join()
    for q in (tasks, results):
        q.cancel_join_thread()
        q.close()
    try:
        shm.close()
    except BufferError:  # a batch view is still held somewhere: the mapping lives until it goes
        pass
    try:
        shm.unlink()
    except FileNotFoundError:
        pass


def _death_note(name, pid, code):
    if code < 0:
        note = f"{name} (pid {pid}) was killed by signal {-code}"
        return note + (" (SIGKILL: the OOM killer? lower num_workers or the batch size)" if code == -9 else "")
    return (f"{name} (pid {pid}) exited with code {code} (its traceback is on stderr; with start_method "
            f"'spawn' the main script must start the loader under `if __name__ == '__main__':`)")


class BatchLoader:
    """Decode batches of `source` with `transform` in `num_workers` processes.

    transform(file, rng) -> uint8 (image_size, image_size, 3), picklable (minibvit.augment
    TrainTransform / EvalTransform). num_slots: ring size, default 2 * num_workers + 1 (each worker
    decoding one batch ahead while the consumer holds one). Workers start at the first batches()
    call and serve every epoch until close().
    """

    def __init__(self, source, transform, batch_size, image_size, num_workers=2, num_slots=None,
                 start_method="spawn", poll_interval=0.1):
        if not (isinstance(batch_size, int) and batch_size > 0):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not (isinstance(num_workers, int) and num_workers > 0):
            raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}")
        if not (num_slots is None or (isinstance(num_slots, int) and num_slots > 0)):
            raise ValueError(f"num_slots must be a positive integer or None, got {num_slots!r}")
        self.source, self.transform = source, transform
        self.batch_size, self.image_size, self.num_workers = batch_size, image_size, num_workers
        self.num_slots = num_slots or 2 * num_workers + 1
        self.start_method, self.poll_interval = start_method, poll_interval
        self._started = self._closed = False
        self._tokens = itertools.count()
        self._outstanding = 0  # tasks handed out whose result has not been received
        self._active = None  # token of the batches() iterator that owns the ring

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self):
        if self._closed:
            raise LoaderError("this BatchLoader is closed; create a new one")
        if self._started:
            return self
        ctx = multiprocessing.get_context(self.start_method)
        ring_shape = (self.num_slots, self.batch_size, self.image_size, self.image_size, 3)
        self._shm = shared_memory.SharedMemory(create=True, size=int(np.prod(ring_shape)))
        self._ring = np.ndarray(ring_shape, np.uint8, buffer=self._shm.buf)
        self._tasks, self._results = ctx.Queue(), ctx.Queue()
        self._workers = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, self._tasks, self._results,
                                           self._shm)
        self._started = True
        for k in range(self.num_workers):
            p = ctx.Process(target=_worker_main, name=f"minibvit-loader-{k}", daemon=True,
                            args=(self.source, self.transform, self._shm.name, ring_shape, self._tasks,
                                  self._results))
            p.start()
            self._workers.append(p)
        return self

    def close(self):
        """Stop the workers and free the shared memory (idempotent; batch views become invalid)."""
        self._closed = True
        if self._started:
            self._ring = None
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def shm_name(self):
        return self._shm.name if self._started else None

    @property
    def worker_pids(self):
        return [p.pid for p in self._workers] if self._started else []

    # -- batches ------------------------------------------------------------------------------------

    def batches(self, order, seed, epoch, start_step=0, drop_last=True, part=None):
        """Yield (step, images uint8 (n, S, S, 3), labels int64 (n,)) for steps start_step, ... .

        order: the epoch's sample indices; batch `step` is order[step * B:(step + 1) * B].
        part=(lo, hi): only positions lo:hi of every batch (a data-parallel rank's slice), with the
        same per-image random streams as in the whole batch. The images are a view into the ring,
        valid until the next batch is requested: copy or convert them before that.
        """
        order = np.asarray(order, np.int64)
        steps = steps_in_epoch(len(order), self.batch_size, drop_last)
        if not (isinstance(start_step, (int, np.integer)) and 0 <= start_step <= steps):
            raise ValueError(f"start_step must be in [0, {steps}] for {len(order)} samples, got {start_step!r}")
        lo, hi = part if part is not None else (0, self.batch_size)
        if not 0 <= lo < hi <= self.batch_size:
            raise ValueError(f"part must satisfy 0 <= lo < hi <= batch_size={self.batch_size}, got {part}")
        self.start()
        self._drain()  # results of an abandoned earlier epoch
        token = self._active = next(self._tokens)
        labels = np.asarray(self.source.labels, np.int64)
        free, done, next_submit = list(range(self.num_slots)), {}, start_step

        def batch_indices(step):
            return order[step * self.batch_size:(step + 1) * self.batch_size][lo:hi]

        for step in range(start_step, steps):
            if self._closed:
                raise LoaderError("the BatchLoader was closed while this batches() iterator was in use")
            if self._active != token:
                raise LoaderError("this batches() iterator was superseded by a later batches() call on the "
                                  "same loader (they share its ring); iterate one epoch at a time")
            while free and next_submit < steps:
                indices = batch_indices(next_submit)
                if len(indices):
                    self._tasks.put((token, next_submit, free.pop(), indices, seed, epoch, lo))
                    self._outstanding += 1
                next_submit += 1
            indices = batch_indices(step)
            if not len(indices):  # a rank's part of a short last batch can be empty
                yield step, self._ring[0, :0], labels[indices]
                continue
            while step not in done:
                self._receive(token, done)
            slot = done.pop(step)
            yield step, self._ring[slot, :len(indices)], labels[indices]
            free.append(slot)

    def _receive(self, token, done):
        try:
            got_token, step, slot, error = self._results.get(timeout=self.poll_interval)
        except queue.Empty:
            dead = [(p.name, p.pid, p.exitcode) for p in self._workers if p.exitcode is not None]
            if dead:
                self.close()
                raise LoaderError("loader worker(s) died: " + "; ".join(_death_note(*d) for d in dead))
            return
        self._outstanding -= 1
        if error is not None:
            self.close()
            raise LoaderError(f"a loader worker failed decoding batch {step}: {error}")
        if got_token == token:
            done[step] = slot

    def _drain(self):
        while self._outstanding:
            self._receive(None, {})
