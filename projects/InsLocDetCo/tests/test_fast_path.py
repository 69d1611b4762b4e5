"""The fast path (MODEL.FAST_PATH) computes what the eager step computes, without host syncs.

The equivalence tests compile with the ``aot_eager`` backend: it traces the very graphs that
inductor would compile (``fullgraph=True``: a graph break, which a host synchronisation or a
data-dependent shape causes, is an error) and runs them with eager kernels, so it checks the
tracing in seconds where inductor spends minutes of C++ compilation per encoder on two cores
(docs/SPEED.md). One inductor test (``slow``) checks the generated kernels on a ResNet-18.
"""

from types import SimpleNamespace

import pytest
import torch
from conftest import load_config
from detectron2.utils.events import EventStorage
from insloc_testing import run_distributed
from torch.utils._python_dispatch import TorchDispatchMode

from insloc_detco.data import build_pretrain_mapper, get_pretrain_dataset_dicts
from insloc_detco.data.batch import BatchCollator
from insloc_detco.engine import PretrainTrainer, create_ddp_model_any_device
from insloc_detco.engine.fast_path import compile_options, fast_path_enabled
from insloc_detco.engine.preemption import PreemptionHook
from insloc_detco.engine.resume import RunStateHook
from insloc_detco.engine.watchdog import ProgressHook
from insloc_detco.modeling.contrastive import ContrastiveQueue

METHODS = ["moco_v2", "insloc_fpn", "insloc_c4", "detco"]
STEPS = 3
# Stated tolerance of fast path vs eager after STEPS steps (relative, absolute). With the
# aot_eager backend the two run the same kernels in the same order: measured difference 0.
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def method_config(method, fast, *opts):
    """The instant_test recipe with the photometric augmentation in the step (as on CUDA)."""
    return load_config(
        f"instant_test/pretrain_{method}.yaml",
        "INPUT.PRETRAIN.AUGMENT_ON",
        "device",
        "MODEL.FAST_PATH.ENABLED",
        "on" if fast else "off",
        "MODEL.FAST_PATH.BACKEND",
        "aot_eager",
        "SOLVER.LOG_PERIOD",
        2,
        *opts,
    )


def mapped_batches(cfg, steps=STEPS, seed=0):
    """``steps`` per-process batches of the recipe's own mapper on the demo photos."""
    torch.manual_seed(seed)
    dicts = get_pretrain_dataset_dicts(cfg.DATASETS.TRAIN)
    mapper = build_pretrain_mapper(cfg, dicts)
    collate = BatchCollator(getattr(mapper, "collate", None))
    n = cfg.SOLVER.IMS_PER_BATCH
    samples = [mapper(dicts[i % len(dicts)]) for i in range(n * steps)]
    return [collate(samples[i * n : (i + 1) * n]) for i in range(steps)]


def detached(losses):
    return {k: v.detach() for k, v in losses.items()}


def train(cfg, batches, ddp=False):
    """
    The pretraining trainer's own model, optimizer and step on ``batches``.

    Returns:
        the model (unwrapped), and the loss dict of every step.
    """
    torch.manual_seed(0)
    model = PretrainTrainer.build_model(cfg)
    optimizer = PretrainTrainer.build_optimizer(cfg, model)
    losses = []
    model.register_forward_hook(lambda m, i, out: losses.append(detached(out)))
    wrapped = create_ddp_model_any_device(model, broadcast_buffers=False) if ddp else model
    step = PretrainTrainer.build_step_trainer(cfg, wrapped, batches, optimizer)
    torch.manual_seed(1)  # the step's own draws (augmentation, shuffle-BN) start equal
    with EventStorage(0) as storage:
        step.storage = storage
        for i in range(len(batches)):
            storage.iter = step.iter = i
            step.run_step()
    return model, losses


def assert_same_training(eager, fast, tolerance=TOLERANCE, grad_rel_l2=None):
    """
    Losses of every step, last gradients, queues and the momentum encoder agree within
    ``tolerance``; with ``grad_rel_l2``, each gradient instead within this relative L2 error
    (||g_fast - g_eager|| / ||g_eager||). Returns the largest relative L2 error of a gradient.
    """
    (m_e, losses_e), (m_f, losses_f) = eager, fast
    for step, (a, b) in enumerate(zip(losses_e, losses_f)):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], **tolerance, msg=f"step {step} {k}")
    grads_e = {n: p.grad for n, p in m_e.encoder_q.named_parameters()}
    worst = 0.0
    for n, p in m_f.encoder_q.named_parameters():
        error = float((p.grad - grads_e[n]).norm() / grads_e[n].norm().clamp(min=1e-12))
        worst = max(worst, error)
        if grad_rel_l2 is None:
            torch.testing.assert_close(p.grad, grads_e[n], **tolerance, msg=f"grad {n}")
        else:
            assert error <= grad_rel_l2, f"grad {n}: relative L2 error {error:.2g}"
    state_e = m_e.state_dict()
    for name, tensor in m_f.state_dict().items():
        if name.startswith(("encoder_k.", "queue")) or ".queues." in name:
            torch.testing.assert_close(tensor, state_e[name], **tolerance, msg=name)
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_fast_path_equals_eager(method):
    from torch._dynamo.utils import counters

    batches = mapped_batches(method_config(method, False))
    eager = train(method_config(method, False), batches)
    torch._dynamo.reset()
    counters.clear()
    fast = train(method_config(method, True), batches)
    # Compiled, in one graph each: query encoder, key encoder, the augmentation(s).
    assert counters["stats"]["unique_graphs"] >= 3, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert_same_training(eager, fast)
    queues = [m for m in fast[0].modules() if isinstance(m, ContrastiveQueue)]
    assert all(int(q.ptr) == STEPS * 8 % q.size for q in queues)  # the keys went in


SYNC_OPS = {
    "_local_scalar_dense",  # .item(), float(t), int(t), bool(t)
    "is_nonzero",  # if tensor:
    "nonzero",  # data-dependent shape
    "masked_select",
    "unique",
    "_unique2",
    "equal",
}


class HostSyncDetector(TorchDispatchMode):
    """
    Records operators that make the host wait for a device's result: the CPU counterpart of
    ``torch.cuda.set_sync_debug_mode``, which exists only on CUDA. Boolean-mask indexing
    (``x[mask]``) computes ``nonzero`` and is caught too.
    """

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        bool_index = name.startswith("index") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool
            for a in args
            if isinstance(a, (list, tuple))
            for t in a
        )
        if name in SYNC_OPS or bool_index:
            self.seen.append(name)
        return func(*args, **kwargs)


def cluster_hooks(cfg, step, iteration):
    """The loop's per-step hooks of cluster runs (per-iteration reseeding, the preemption
    request, the watchdog's step count) on a stand-in for the outer trainer at ``iteration``."""
    outer = SimpleNamespace(iter=iteration, max_iter=cfg.SOLVER.MAX_ITER, _trainer=step, cfg=cfg)
    solver = cfg.SOLVER
    preemption = PreemptionHook(None, solver.CHECKPOINT_PERIOD, solver.LOG_PERIOD)
    hooks = [RunStateHook(None, cfg.dump()), preemption, ProgressHook()]
    for h in hooks:
        h.trainer = outer
    return hooks


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_step_never_waits_for_the_device(method):
    """A whole step (augmentation, encoders, shuffle-BN, losses, enqueue, backward, SGD) at an
    iteration that logs nothing dispatches no synchronising operator, nor do the per-step
    hooks of cluster runs around it."""
    cfg = method_config(method, False, "SOLVER.IMS_PER_BATCH", 4, "SOLVER.LOG_PERIOD", 100)
    batch = mapped_batches(cfg, steps=1)[0]
    torch.manual_seed(0)
    model = PretrainTrainer.build_model(cfg)
    optimizer = PretrainTrainer.build_optimizer(cfg, model)
    step = PretrainTrainer.build_step_trainer(cfg, model, [batch, batch], optimizer)
    hooks = cluster_hooks(cfg, step, iteration=1)
    for h in hooks:
        h.before_train()
    with EventStorage(0) as storage:
        step.storage = storage
        storage.iter = step.iter = 1  # not a logging iteration
        detector = HostSyncDetector()
        with detector:
            for h in hooks:
                h.before_step()
            step.run_step()
            for h in hooks:
                h.after_step()
    for h in hooks:
        h.after_train()
    assert detector.seen == [], f"host syncs inside the step: {detector.seen}"
    # The detector works (float(tensor) waits for the device) ...
    with HostSyncDetector() as detector:
        float(torch.ones(()))
    assert detector.seen == ["_local_scalar_dense"]
    # ... and a logging iteration reads the accuracies back (one .tolist(), which a CPU
    # tensor serves without dispatching an operator).
    with EventStorage(0) as storage:
        step.storage = storage
        storage.iter = step.iter = 0
        step.run_step()
    assert any(name.startswith("[metric]acc/") for name in storage.latest())


def test_fast_path_switch():
    cpu = load_config("instant_test/pretrain_moco_v2.yaml")
    assert not fast_path_enabled(cpu)  # auto: eager on the CPU
    cuda = load_config("pretrain_moco_v2.yaml", "MODEL.DEVICE", "cuda")
    assert fast_path_enabled(cuda)
    assert compile_options(cuda) == {
        "backend": "inductor",
        "mode": "reduce-overhead",
        "fullgraph": True,
    }
    assert fast_path_enabled(load_config("pretrain_moco_v2.yaml", "MODEL.FAST_PATH.ENABLED", "on"))
    assert compile_options(cpu)["mode"] == "default"
    with pytest.raises(ValueError, match="FAST_PATH.ENABLED"):
        fast_path_enabled(load_config("pretrain_moco_v2.yaml", "MODEL.FAST_PATH.ENABLED", "yes"))


def _distributed_fast_equals_eager():
    from detectron2.utils import comm

    cfg = method_config("moco_v2", False, "SOLVER.IMS_PER_BATCH", 4)
    batches = mapped_batches(cfg, steps=2, seed=comm.get_rank())  # each rank its own data
    eager = train(cfg, batches, ddp=True)
    fast = train(method_config("moco_v2", True, "SOLVER.IMS_PER_BATCH", 4), batches, ddp=True)
    assert_same_training(eager, fast)
    # Shuffle-BN gathered the keys of both ranks into one queue: the ranks' queues agree.
    keys = fast[0].queue.keys
    gathered = comm.all_gather(keys)
    assert torch.equal(gathered[0], gathered[1])
    assert int(fast[0].queue.ptr) == 2 * 2 * 4 % fast[0].queue.size


@pytest.mark.slow
def test_fast_path_two_processes():
    """DDP, shuffle-BN's all-gathers and the queue's all-gather on the fast path (gloo)."""
    run_distributed(_distributed_fast_equals_eager, world_size=2)


@pytest.mark.slow
def test_inductor_kernels_equal_eager():
    """inductor's generated C++ kernels (MoCo v2, ResNet-18 to keep compilation short): the
    same losses, queue and momentum encoder within float32 re-association error; gradients
    within 2 % relative L2 error (measured 0.36 %: batch norm over 4-sample key chunks and
    2 x 2 res5 maps amplifies the re-association of its reductions)."""
    r18 = ("MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64)
    cfg = method_config("moco_v2", False, *r18)
    batches = mapped_batches(cfg, steps=2)
    eager = train(cfg, batches)
    torch._dynamo.reset()
    inductor = ("MODEL.FAST_PATH.BACKEND", "inductor")
    fast = train(method_config("moco_v2", True, *inductor, *r18), batches)
    worst = assert_same_training(eager, fast, dict(rtol=1e-3, atol=1e-4), grad_rel_l2=0.02)
    print(f"largest relative L2 error of a gradient, inductor vs eager: {worst:.2g}")
