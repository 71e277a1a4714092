"""``python -m minibvit.train`` with an injected fault, for test_train_distributed.py:

    mpiexec -n 2 python reference_tests/train_fault.py {kill,raise} STEP <python -m minibvit.train arguments>

The last rank SIGKILLs itself (kill) or raises RuntimeError (raise) when it starts the data-parallel
computation of global step STEP, while the other ranks are inside that step (they wait for its
gradient allreduce)."""
import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minibvit import distributed, train  # noqa: E402


def main():
    mode, fault_step, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    real_step = train.train_step

    def faulty_step(*args, **kwargs):
        comm = distributed.current()
        if kwargs.get("parts") is not None and kwargs["step"] == fault_step and comm.rank == comm.world - 1:
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure at step {fault_step}")
        return real_step(*args, **kwargs)

    train.train_step = faulty_step  # train_stage looks the name up at every step
    sys.exit(train.main(argv))


if __name__ == "__main__":
    main()
