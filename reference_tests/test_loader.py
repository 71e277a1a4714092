"""minibvit.loader: worker decode into a shared-memory ring -- determinism across worker counts and
start steps, clean shutdown (also on errors, interrupts and parent death), and dead workers."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from jpeg_tree import SlowTransform, make_tree, write_jpeg
from minibvit import augment as A
from minibvit import imagenet
from minibvit.loader import BatchLoader, LoaderError, decode_batch

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 24


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    make_tree(str(root), per_class=5)
    return imagenet.folder_source(str(root), "train")


def shm_exists(name):
    return os.path.exists(os.path.join("/dev/shm", name.lstrip("/")))


def collect(loader, order, seed, epoch, start_step=0, drop_last=True, part=None):
    return [(step, images.copy(), labels.copy())
            for step, images, labels in loader.batches(order, seed, epoch, start_step, drop_last, part)]


def test_batches_independent_of_workers_and_start_step(source):
    transform = A.TrainTransform(size=SIZE)
    order = np.random.default_rng(0).permutation(len(source))
    with BatchLoader(source, transform, 4, SIZE, num_workers=1) as one, \
            BatchLoader(source, transform, 4, SIZE, num_workers=2, num_slots=2) as two:
        full = collect(one, order, seed=3, epoch=1, drop_last=False)
        assert [s for s, _, _ in full] == [0, 1, 2, 3]
        assert [len(y) for _, _, y in full] == [4, 4, 4, 3]
        for step, images, labels in full:
            indices = order[step * 4:(step + 1) * 4]
            np.testing.assert_array_equal(labels, source.labels[indices])
            np.testing.assert_array_equal(images, decode_batch(source, transform, indices, 3, 1, step))
            assert images.dtype == np.uint8 and images.shape[1:] == (SIZE, SIZE, 3)
        for (s1, x1, y1), (s2, x2, y2) in zip(full, collect(two, order, seed=3, epoch=1, drop_last=False)):
            assert s1 == s2
            np.testing.assert_array_equal(x1, x2)
        resumed = collect(two, order, seed=3, epoch=1, start_step=2, drop_last=False)
        assert [s for s, _, _ in resumed] == [2, 3]
        for (_, x1, _), (_, x2, _) in zip(full[2:], resumed):
            np.testing.assert_array_equal(x1, x2)
        # another epoch draws other crops; drop_last drops the short batch
        other = collect(two, order, seed=3, epoch=2)
        assert len(other) == 3 and not np.array_equal(other[0][1], full[0][1])


def test_part_of_batch_equals_the_whole_batch_positions(source):
    transform = A.TrainTransform(size=SIZE)
    order = np.arange(len(source))
    with BatchLoader(source, transform, 6, SIZE, num_workers=1) as loader:
        whole = collect(loader, order, 5, 0)
        part = collect(loader, order, 5, 0, part=(2, 5))
    for (_, x, y), (_, xp, yp) in zip(whole, part):
        np.testing.assert_array_equal(xp, x[2:5])
        np.testing.assert_array_equal(yp, y[2:5])


def test_abandoned_epoch_then_new_epoch(source):
    transform = A.TrainTransform(size=SIZE)
    order = np.arange(len(source))
    with BatchLoader(source, transform, 2, SIZE, num_workers=2) as loader:
        for step, _, _ in loader.batches(order, 0, 0):
            if step == 1:
                break
        stale = loader.batches(order, 0, 0)
        next(stale)
        again = collect(loader, order, 0, 0)
        with pytest.raises(LoaderError, match="superseded"):
            next(stale)
        assert [s for s, _, _ in again] == list(range(len(source) // 2))
        np.testing.assert_array_equal(again[3][1], decode_batch(source, transform, order[6:8], 0, 0, 3))


def test_close_frees_shared_memory_and_workers(source):
    loader = BatchLoader(source, A.EvalTransform(size=SIZE), 4, SIZE, num_workers=1)
    next(iter(loader.batches(np.arange(len(source)), 0, 0)))
    name, workers = loader.shm_name, list(loader._workers)
    assert shm_exists(name) and all(p.is_alive() for p in workers)
    batches = loader.batches(np.arange(len(source)), 0, 0)
    next(batches)
    loader.close()
    loader.close()  # idempotent
    with pytest.raises(LoaderError, match="closed while"):
        next(batches)
    assert not shm_exists(name)
    assert all(p.exitcode is not None for p in workers)  # joined: no zombies
    with pytest.raises(LoaderError, match="closed"):
        next(iter(loader.batches(np.arange(len(source)), 0, 0)))


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_consumer_raising_cleans_up(source, error):
    with pytest.raises(error):
        with BatchLoader(source, A.EvalTransform(size=SIZE), 2, SIZE, num_workers=1) as loader:
            for step, _, _ in loader.batches(np.arange(len(source)), 0, 0):
                name, workers = loader.shm_name, list(loader._workers)
                raise error("consumer failed")
    assert not shm_exists(name)
    assert all(p.exitcode is not None for p in workers)


def test_worker_exception_names_the_sample(tmp_path):
    make_tree(str(tmp_path), per_class=2)
    bad = tmp_path / "train" / "n01443537" / "n01443537_0.JPEG"
    bad.write_bytes(b"not a jpeg")
    src = imagenet.folder_source(str(tmp_path), "train")
    with BatchLoader(src, A.EvalTransform(size=SIZE), 2, SIZE, num_workers=1) as loader:
        with pytest.raises(LoaderError, match="n01443537_0.JPEG"):
            collect(loader, np.arange(len(src)), 0, 0)
        assert not shm_exists(loader._shm.name)


def test_dead_worker_raises_instead_of_hanging(source):
    transform = SlowTransform(A.EvalTransform(size=SIZE), 0.05)
    with BatchLoader(source, transform, 2, SIZE, num_workers=2) as loader:
        with pytest.raises(LoaderError, match="signal 9"):
            for step, _, _ in loader.batches(np.arange(len(source)), 0, 0):
                if step == 0:
                    os.kill(loader.worker_pids[0], signal.SIGKILL)
        name = loader._shm.name
    assert not shm_exists(name)


def test_workers_fine_after_numba_threads_in_parent(source):
    numba = pytest.importorskip("numba")

    @numba.njit(parallel=True)
    def parallel_sum(x):
        total = 0.0
        for i in numba.prange(x.shape[0]):
            total += x[i]
        return total

    assert parallel_sum(np.ones(10000)) == 10000.0  # the parent's thread pool is running
    transform = A.EvalTransform(size=SIZE)
    with BatchLoader(source, transform, 4, SIZE, num_workers=2) as loader:
        batches = collect(loader, np.arange(len(source)), 0, 0)
    np.testing.assert_array_equal(batches[1][1], decode_batch(source, transform, np.arange(4, 8), 0, 0, 1))


PARENT = textwrap.dedent("""
    import faulthandler, signal, sys, time, numpy as np
    faulthandler.register(signal.SIGUSR1)  # the test asks for the stacks if the parent hangs
    sys.path.insert(0, {tests!r})
    from jpeg_tree import SlowTransform
    from minibvit import augment as A, imagenet
    from minibvit.loader import BatchLoader

    if __name__ == "__main__":
        src = imagenet.folder_source({root!r}, "train")
        loader = BatchLoader(src, SlowTransform(A.EvalTransform(size=16), 0.01), 2, 16, num_workers=2)
        with loader:
            for epoch in range(1000):
                for step, x, y in loader.batches(np.arange(len(src)), 0, epoch):
                    if epoch == 0 and step == 0:
                        print(loader.shm_name, *loader.worker_pids, flush=True)
""")


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too (its parent has gone)
        return f.read().split(")")[-1].split()[0] != "Z"


def wait_until(condition, limit=20.0):
    """Poll up to `limit` seconds (a bound against hanging, not a timing assertion)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_parent_interrupted_or_killed_leaves_nothing(source, tmp_path, how):
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(tests=os.path.join(ROOT, "reference_tests"), root=os.path.dirname(source.root)))
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True)
    try:
        name, *pids = proc.stdout.readline().split()
        pids = [int(p) for p in pids]
        assert shm_exists(name) and all(pid_alive(p) for p in pids)
        proc.send_signal(getattr(signal, how))
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # every thread's stack to stderr (faulthandler), then fail
            time.sleep(2)
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"the parent did not exit within 30 s of {how}; its stderr:\n{err[-6000:]}")
        if how == "SIGINT":
            assert "KeyboardInterrupt" in err
        # SIGINT: the with block closes the loader; SIGKILL: the workers notice the parent is gone
        # and exit, then Python's resource tracker unlinks the orphaned segment
        assert wait_until(lambda: not any(pid_alive(p) for p in pids))
        assert wait_until(lambda: not shm_exists(name))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
