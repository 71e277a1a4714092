"""PyTorch baselines for the benchmark scripts, each timed in a process of its own.

Why a separate process: the benchmarks set minibvit's thread-pool defaults (`minibvit.process.configure_process`,
e.g. OMP_WAIT_POLICY=PASSIVE), and there is one OpenMP runtime per process: PyTorch's bundled libgomp and
Numba's resolve to the same library, which reads its settings once, when it is loaded. Timed in
minibvit's process, PyTorch would run with minibvit's settings, not its own: measured here with passive
OpenMP waiting, a PyTorch training step of the issue-2 model ran ~10 % slower and a DeiT-Tiny batch-8
forward ~20 % slower. The worker process starts without the variables minibvit set (any the user set
stays), imports torch before anything else, and so runs like a plain PyTorch program.

Use from a benchmark:

    with BaselineProcess("train-step", threads=2, config=dataclasses.asdict(cfg), arrays={...}) as torch_side:
        seconds = torch_side.time(runs=1)          # list of wall times, one per run

Kinds (arrays are passed through an .npz file, settings as JSON; no pickle):
    train-step   TorchViT float32 + AdamW(lr): one step = zero_grad, forward, loss, backward, step.
                 arrays: the state dict (timm names), "x" [B, C, H, W] float32, "y" [B] int64, and
                 "teacher_logits" [B, classes] float32 for a distillation loss. Optional settings
                 (their defaults give a plain float cross-entropy step): quantizers {role: spec}
                 (reference_tests/torch_quant.py modules; minibvit.methods.resolve gives the table),
                 options (QuantizerOptions fields), loss {"kind": "ce" | "soft" | "hard",
                 "label_smoothing", "kd_temperature", "kd_alpha"} as minibvit.train's stage loss,
                 weight_decay (on the parameters minibvit.optim.decays names, else torch's default
                 on all), clip_grad (global norm; None: no clipping).
    inference    TorchViT float32 forward under torch.inference_mode. arrays: the state dict; each time()
                 call names the batch size (seeded random images).
    matmul       torch.matmul(x, w.T) on seeded float32 data; each time() call names the shape (m, k, n).

The worker is this file run as a script: `python scripts/torch_baseline.py <setup dir>`; it reads
one JSON request per line on stdin and answers one JSON line on stdout.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


class BaselineProcess:
    """A PyTorch baseline in a worker process started without minibvit's thread-pool defaults.

    Inputs:
        kind: "train-step", "inference" or "matmul" (see the module docstring)
        threads: torch.set_num_threads in the worker (OMP_NUM_THREADS etc. are inherited as set)
        config: dict of ViTConfig fields (train-step, inference)
        arrays: dict name -> np.ndarray (train-step, inference)
        lr: AdamW learning rate (train-step)
        settings: the train-step options of the module docstring (quantizers, options, loss,
            weight_decay, clip_grad)
    """

    def __init__(self, kind, threads, config=None, arrays=None, lr=1e-4, **settings):
        import numpy as np
        from minibvit.process import env_set_by_configure

        self._dir = tempfile.TemporaryDirectory(prefix="minibvit-baseline-")
        with open(os.path.join(self._dir.name, "setup.json"), "w") as f:
            json.dump({"kind": kind, "threads": threads, "config": config, "lr": lr, **settings}, f)
        np.savez(os.path.join(self._dir.name, "arrays.npz"), **(arrays or {}))
        env = {k: v for k, v in os.environ.items() if k not in env_set_by_configure()}
        self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), self._dir.name], env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = self._proc.stdout.readline()
        if ready.strip() != "ready":
            self.close()
            raise RuntimeError(f"the PyTorch baseline worker ({kind}) did not start; its error is printed above")

    def time(self, runs, warmup_seconds=0.0, shape=None, batch=None, threads=None):
        """Wall times (seconds) of `runs` back-to-back runs, after warmup_seconds of untimed runs;
        shape (m, k, n) for matmul, batch for inference; threads changes the worker's thread count
        from here on."""
        request = {"runs": runs, "warmup_seconds": warmup_seconds, "shape": shape, "batch": batch,
                   "threads": threads}
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        answer = self._proc.stdout.readline()
        if not answer:
            raise RuntimeError("the PyTorch baseline worker exited; its error is printed above")
        return json.loads(answer)

    def close(self):
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=60)
        self._dir.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------------------
# worker side
# ------------------------------------------------------------------------------------------------

def _load_model(config, arrays, quantizers=None, options=None):
    """TorchViT float32 with the state dict from arrays; quantizers {role: spec} become the
    reference torch modules of torch_quant.py."""
    import types

    import torch

    sys.path.insert(0, os.path.join(ROOT, "reference_tests"))
    sys.path.insert(0, ROOT)
    from torch_reference import TorchViT
    from minibvit.model import ViTConfig

    cfg = ViTConfig(**config)
    quant = None
    if quantizers:
        from torch_quant import torch_quantizers
        quant = torch_quantizers(quantizers, cfg, types.SimpleNamespace(**(options or {})), dtype=torch.float32)
    model = TorchViT(cfg, quant=quant, dtype=torch.float32)
    model.load_numpy({k: v for k, v in arrays.items() if k not in ("x", "y", "teacher_logits")})
    return model


def _loss_fn(loss, teacher_logits):
    """The stage loss of minibvit.train (its _loss) in torch: logits (a pair for a distilled model),
    labels -> scalar."""
    import torch.nn.functional as F

    kind, smoothing = loss.get("kind", "ce"), loss.get("label_smoothing", 0.0)
    if kind == "hard":  # DeiT: 0.5 CE(cls head, y) + 0.5 CE(dist head, argmax teacher)
        hard = teacher_logits.argmax(dim=1)
        return lambda logits, y: 0.5 * (F.cross_entropy(logits[0], y, label_smoothing=smoothing)
                                        + F.cross_entropy(logits[1], hard))
    if kind == "soft":  # (1 - a) CE + a tau^2 KL(teacher || student), both at temperature tau
        tau, a = loss["kd_temperature"], loss["kd_alpha"]
        target = F.softmax(teacher_logits / tau, dim=1)
        return lambda logits, y: ((1 - a) * F.cross_entropy(logits, y, label_smoothing=smoothing)
                                  + a * tau * tau * F.kl_div(F.log_softmax(logits / tau, dim=1), target,
                                                             reduction="batchmean"))
    if kind != "ce":
        raise ValueError(f"unknown train-step loss kind {kind!r}; expected ce, soft or hard")
    return lambda logits, y: F.cross_entropy(logits, y, label_smoothing=smoothing)


def _build(setup, arrays):
    """A function request -> None that runs the baseline once."""
    import torch

    kind = setup["kind"]
    if kind == "train-step":
        model = _load_model(setup["config"], arrays, setup.get("quantizers"), setup.get("options"))
        named = model.named_params()
        params = list(named.values())
        if setup.get("weight_decay") is None:
            opt = torch.optim.AdamW(params, lr=setup["lr"])
        else:
            from minibvit.optim import decays
            groups = [[p for n, p in named.items() if decays(n, p) == d] for d in (True, False)]
            opt = torch.optim.AdamW([{"params": groups[0], "weight_decay": setup["weight_decay"]},
                                     {"params": groups[1], "weight_decay": 0.0}], lr=setup["lr"])
        x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
        teacher = torch.from_numpy(arrays["teacher_logits"]) if "teacher_logits" in arrays else None
        loss_fn = _loss_fn(setup.get("loss") or {}, teacher)
        clip = setup.get("clip_grad")

        def step(request):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
        return step
    if kind == "inference":
        import numpy as np
        model = _load_model(setup["config"], arrays)
        cfg = setup["config"]
        images = {}

        def forward(request):
            batch = request["batch"]
            if batch not in images:
                rng = np.random.default_rng(batch)
                images[batch] = torch.from_numpy(rng.standard_normal(
                    (batch, cfg["in_chans"], cfg["image_size"], cfg["image_size"]), dtype=np.float32))
            with torch.inference_mode():
                model(images[batch])
        return forward
    if kind == "matmul":
        import numpy as np
        operands = {}

        def matmul(request):
            shape = tuple(request["shape"])
            if shape not in operands:
                m, k, n = shape
                rng = np.random.default_rng(list(shape))
                operands.clear()
                operands[shape] = (torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32)),
                                   torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32)))
            x, w = operands[shape]
            torch.matmul(x, w.T)
        return matmul
    raise ValueError(f"unknown baseline kind {kind!r}; expected train-step, inference or matmul")


def _serve(setup_dir):
    import torch  # first: the OpenMP runtime and OpenBLAS start with their own defaults
    import numpy as np

    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from minibvit.process import configure_process

    # The same glibc malloc settings as the minibvit side (not its thread settings): with glibc's
    # defaults PyTorch re-faults its activations on every call (DeiT-Tiny batch 8 inference: 59 against
    # 80 images/s). Before the redesign this worker got them by importing minibvit.
    configure_process(threads=False)

    with open(os.path.join(setup_dir, "setup.json")) as f:
        setup = json.load(f)
    torch.set_num_threads(setup["threads"])
    with np.load(os.path.join(setup_dir, "arrays.npz"), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    run = _build(setup, arrays)
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["threads"]:
            torch.set_num_threads(request["threads"])
        warm_until = time.perf_counter() + request["warmup_seconds"]
        while time.perf_counter() < warm_until:
            run(request)
        times = []
        for _ in range(request["runs"]):
            t0 = time.perf_counter()
            run(request)
            times.append(time.perf_counter() - t0)
        print(json.dumps(times), flush=True)


if __name__ == "__main__":
    _serve(sys.argv[1])
