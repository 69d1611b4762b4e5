"""What a training run says about itself at start-up: the model and the schedule."""

from torch import nn

__all__ = ["describe_model", "describe_schedule"]


def describe_model(model: nn.Module) -> str:
    """
    ``repr(model)`` and its parameter counts. A contrastive model's key encoder is a momentum
    copy of ``encoder_q`` with the same modules, so it is named, not printed a second time.
    """
    children = dict(model.named_children())
    if "encoder_q" in children and "encoder_k" in children:
        lines = []
        for name, child in children.items():
            text = "momentum copy of encoder_q (same modules, no gradient)"
            if name != "encoder_k":
                text = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {text}")
        extra = model.extra_repr()
        body = "\n".join([f"{model._get_name()}("] + ([f"  {extra}"] if extra else []) + lines)
        body += "\n)"
    else:
        body = repr(model)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    buffers = sum(b.numel() for b in model.buffers())
    return (
        f"Model:\n{body}\nParameters: {trained / 1e6:.1f}M trained, {frozen / 1e6:.1f}M without "
        f"gradient; buffers (queues, BN statistics): {buffers / 1e6:.1f}M values."
    )


def describe_schedule(cfg, world_size: int) -> str:
    """
    One line: the effective batch, lr and schedule of ``cfg`` as the trainer will run it (after
    ``REFERENCE_WORLD_SIZE`` scaling) on ``world_size`` processes.
    """
    s = cfg.SOLVER
    name = s.LR_SCHEDULER_NAME
    if "Cosine" in name:
        shape = f"cosine to {s.BASE_LR_END:g}"
    elif "MultiStep" in name:
        shape = f"x{s.GAMMA:g} at iterations {tuple(s.STEPS)}"
    else:
        shape = name
    warmup = f", {s.WARMUP_ITERS} warmup iterations" if s.WARMUP_ITERS else ""
    return (
        f"Schedule: batch {s.IMS_PER_BATCH} ({world_size} process(es) x "
        f"{s.IMS_PER_BATCH // max(1, world_size)} images), base lr {s.BASE_LR:g} "
        f"(= {s.BASE_LR * 256 / s.IMS_PER_BATCH:g} per 256 images), {name}: {shape}{warmup}; "
        f"{s.MAX_ITER} iterations = {s.MAX_ITER * s.IMS_PER_BATCH} images."
    )
