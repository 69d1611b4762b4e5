"""The training engine on several processes: queues, start-up summaries, hooks after a failure."""

import os

import pytest
import torch
from conftest import load_config
from detectron2.engine import HookBase, hooks
from detectron2.utils.events import EventStorage
from insloc_testing import run_distributed

from insloc_detco.checkpoint import PeriodicCheckpointer
from insloc_detco.engine import DeviceAgnosticTrainer, PretrainTrainer, describe_model
from insloc_detco.modeling.contrastive import ContrastiveQueue, broadcast_queues

CONFIG = "instant_test/pretrain_moco_v2.yaml"


def _queues_identical_worker(out):
    import torch.distributed as dist
    from detectron2.utils import comm
    from torch import nn

    def same_on_all_ranks(t):
        gathered = [torch.empty_like(t) for _ in range(comm.get_world_size())]
        dist.all_gather(gathered, t.contiguous())
        return all(torch.equal(gathered[0], g) for g in gathered)

    rank = comm.get_rank()
    torch.manual_seed(rank)  # as unseeded ranks would: different initial queues
    # broadcast_queues itself: keys and write position of every queue become rank 0's.
    model = nn.ModuleDict({"a": ContrastiveQueue(4, 6), "b": nn.Sequential(ContrastiveQueue(4, 3))})
    model["a"].ptr.fill_(rank + 1)
    assert not same_on_all_ranks(model["a"].keys)  # what the broadcast is for
    assert broadcast_queues(model) == 2
    for queue in (model["a"], model["b"][0]):
        assert same_on_all_ranks(queue.keys) and same_on_all_ranks(queue.ptr)
    assert int(model["a"].ptr) == 1

    # ... and the trainer applies it.
    cfg = load_config(CONFIG, "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", out)
    trainer = PretrainTrainer(cfg)
    queues = [m for m in trainer.model.modules() if isinstance(m, ContrastiveQueue)]
    assert queues and all(same_on_all_ranks(q.keys) for q in queues), "queues differ"

    # --resume past a truncated last checkpoint: every rank resumes from the same older one.
    if comm.is_main_process():
        for trainer.iter in (3, 5):
            trainer.checkpointer.save(f"model_{trainer.iter:07d}")
        with open(os.path.join(out, "model_0000005.pth"), "r+b") as f:
            f.truncate(1000)
    comm.synchronize()
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 4
    assert same_on_all_ranks(torch.tensor([trainer.start_iter]))


@pytest.mark.slow
def test_queues_start_identical_and_resume_agrees_on_every_rank(tmp_path):
    run_distributed(_queues_identical_worker, 2, args=(str(tmp_path),))


def test_model_summary_prints_the_key_encoder_once(cfg_loader):
    from detectron2.modeling import build_model

    model = build_model(cfg_loader(CONFIG))
    text = describe_model(model)
    assert text.count("(res5)") == 1  # encoder_q's ResNet; encoder_k is named, not printed
    assert "(encoder_k): momentum copy of encoder_q" in text
    n_trained = sum(p.numel() for p in model.encoder_q.parameters()) / 1e6
    assert f"Parameters: {n_trained:.1f}M trained" in text


def test_every_trainer_uses_the_retaining_checkpointer(cfg_loader, tmp_path):
    cfg = cfg_loader(
        CONFIG,
        "DATALOADER.NUM_WORKERS",
        0,
        "OUTPUT_DIR",
        str(tmp_path),
        "SOLVER.CHECKPOINT_MAX_TO_KEEP",
        5,
    )
    trainer = PretrainTrainer(cfg)
    found = [h for h in trainer._hooks if isinstance(h, hooks.PeriodicCheckpointer)]
    assert len(found) == 1 and type(found[0]) is PeriodicCheckpointer and found[0].keep == 5

    # detectron2's DefaultTrainer hooks (the fine-tuning trainer's) get it too.
    class Trainer(DeviceAgnosticTrainer):
        build_train_loader = PretrainTrainer.build_train_loader
        test = PretrainTrainer.test

    found = [h for h in Trainer(cfg)._hooks if isinstance(h, hooks.PeriodicCheckpointer)]
    assert len(found) == 1 and type(found[0]) is PeriodicCheckpointer


class _Recorder(HookBase):
    def __init__(self):
        self.calls = 0

    def after_train(self):
        self.calls += 1


class _Eval(hooks.EvalHook):
    def __init__(self):
        super().__init__(0, self._eval)
        self.evaluated = False

    def _eval(self):
        self.evaluated = True
        return {}


def test_no_evaluation_after_a_failure_in_the_last_iteration(cfg_loader, tmp_path):
    cfg = cfg_loader(CONFIG, "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", str(tmp_path))
    trainer = PretrainTrainer(cfg)
    evaluation, other = _Eval(), _Recorder()
    trainer._hooks = []
    trainer.register_hooks([evaluation, other])
    with EventStorage(0) as trainer.storage:
        trainer.iter = trainer.max_iter - 1  # an exception in the last iteration
        trainer.after_train()
        # detectron2's EvalHook would evaluate here (iter + 1 >= max_iter): collectives that
        # the other ranks cannot join.
        assert not evaluation.evaluated and other.calls == 1
        trainer.iter = trainer.max_iter  # a finished run evaluates as usual
        trainer.after_train()
    assert evaluation.evaluated and other.calls == 2
