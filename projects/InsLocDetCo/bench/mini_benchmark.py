#!/usr/bin/env python
"""
Mini benchmark: does each pretext task learn something a detector can use, at a budget a CPU
can afford? Random init, MoCo v2, InsLoc-C4, InsLoc-FPN and DetCo are pretrained with one
budget (iterations x batch, the same unlabeled images, the same optimiser), several seeds each
(detectron2 ``SEED``: seeded pretraining), then read out with frozen features on the generated
labelled set ``demo_cls`` (one shape on a real photo; 2,000 train / 500 val):

* Views: augmented-view retrieval on the 500 val images at the pretraining's view side (the
  pretext task itself, on unseen images; res5, chance 0.2 %), see
  ``insloc_detco/readout/views.py``;
* kNN: weighted kNN (k 20, T 0.07) of the shape class on pooled res5;
* Cls: linear classification of the shape class on pooled res5;
* Loc: InsLoc's linear localization readout (cell index of a 3 x 3 grid from the cell's RoI
  feature through the R50-C4 head);
* ObjLoc: which of the 9 cells holds the object, from the same per-cell features;

and, with ``--finetune-iters N``, Mask R-CNN fine-tuning on ``demo_det`` as
``eval_transfer.py``. Every method is read out through the same R50-C4 network (each converts
to it completely). Results: mean +- std over the seeds.

    python bench/mini_benchmark.py                     # CPU defaults (README table)
    python bench/mini_benchmark.py --device cuda --jobs 1 --pretrain-iters 2000 \\
        --pretrain-batch 128 --image-size 96 --seeds 5   # the same experiment, larger

Everything goes under ``--output-dir``; re-running skips finished pretraining runs and
readouts. ``--jobs`` runs that many single-threaded runs side by side (CPU), from one queue:
the longest pretraining runs first, each readout as soon as its checkpoint exists.

The CPU defaults are sized to 60 min on 2 cores (measured on the project's CPU, 2026-11-23, one
core per run): per pretraining step MoCo v2 1.3 s, InsLoc-C4 1.75 s (3.1 s with the detector's
14 x 14 RoIAlign), InsLoc-FPN 2.9 s, DetCo 5.2 s (smaller jigsaw patches barely help: 4.6 s
with 18 px instead of 32); a readout 145 s at 600 cell images, 85 % of it frozen features (about
half of those in the res5 head: whole images and 9 cell boxes per image). 200 steps would
take ~82 min.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PROJECT_DIR)

# name -> the instant-test recipe (its full-scale parent holds the method); the budget flags
# below override its size, schedule and data.
METHODS = {
    "random": None,
    "moco_v2": "instant_test/pretrain_moco_v2.yaml",
    "insloc_c4": "instant_test/pretrain_insloc_c4.yaml",
    "insloc_fpn": "instant_test/pretrain_insloc_fpn.yaml",
    "detco": "instant_test/pretrain_detco.yaml",
}
COLUMNS = ("Views", "kNN", "Cls", "Loc", "ObjLoc")
# Seconds per iteration at the defaults on one CPU core (2026-11-23): the scheduling order.
STEP_COST = {"moco_v2": 1.3, "insloc_c4": 1.8, "insloc_fpn": 2.9, "detco": 5.2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--seeds", type=int, default=3, help="pretraining seeds per method (1..N)")
    p.add_argument("--pretrain-iters", type=int, default=128,
                   help="128 x 32 = 4,096 samples: the whole benchmark took 52 min 40 s on 2 "
                   "CPU cores (see the README)")  # fmt: skip
    p.add_argument("--pretrain-batch", type=int, default=32)
    p.add_argument("--pretrain-lr", type=float, default=0.06)
    p.add_argument("--momentum", type=float, default=0.99,
                   help="m of the key encoder: 0.999 barely moves it in a few hundred steps")
    p.add_argument("--queue-size", type=int, default=512,
                   help="K, well below the pool: older keys of the same image are false "
                   "negatives")  # fmt: skip
    p.add_argument("--mlp-norm", default="BN", choices=("", "BN"),
                   help="MODEL.CONTRAST.MLP_NORM: without BN the projection heads collapse in "
                   "short schedules (see the README)")  # fmt: skip
    p.add_argument("--image-size", type=int, default=64,
                   help="MoCo v2 / DetCo view side and InsLoc canvas side (pixels)")
    p.add_argument("--readout-cells-images", type=int, default=400,
                   help="training images for the cell readouts (Loc, ObjLoc); all for kNN/Cls")
    p.add_argument("--roi-pooler", type=int, default=7,
                   help="RoIAlign side of InsLoc-C4's pretraining boxes and of the C4 cell "
                   "readouts (the detector's 14 resamples the 2-4 res4 cells of a box on a "
                   "64-96 px image to 14 x 14, at 1.8x the cost of InsLoc-C4's step)")  # fmt: skip
    p.add_argument("--precise-bn", type=int, default=512,
                   help="re-estimate BN statistics on this many readout training images (every "
                   "model, random init too; 0: the checkpoint's)")  # fmt: skip
    p.add_argument("--finetune-iters", type=int, default=0, help="> 0: also fine-tune demo_det")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per pretraining run")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (CPU: one per core)")
    p.add_argument("--output-dir", default="output/mini_benchmark")
    return p.parse_args(argv)


def log(msg: str, start: float):
    print(f"[mini_benchmark {time.strftime('%H:%M:%S')} +{time.time() - start:5.0f}s] {msg}",
          flush=True)  # fmt: skip


def _env():
    # One thread per run: --jobs runs share the cores without oversubscription.
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


# ------------------------------------------------------------------------------------------
# Pretraining
# ------------------------------------------------------------------------------------------
def pretrain_command(method: str, seed: int, args, out: str, pool: str):
    s = args.image_size
    cmd = [
        sys.executable, "train_net.py", "--config-file", METHODS[method], "--resume",
        "--num-gpus", str(args.num_gpus),
        "MODEL.DEVICE", args.device,
        "DATASETS.TRAIN", f"('folder:{pool}',)",
        "SEED", str(seed),
        "SOLVER.MAX_ITER", str(args.pretrain_iters),
        "SOLVER.IMS_PER_BATCH", str(args.pretrain_batch),
        "SOLVER.BASE_LR", str(args.pretrain_lr),
        "SOLVER.WARMUP_ITERS", str(max(1, args.pretrain_iters // 20)),
        "SOLVER.CHECKPOINT_PERIOD", str(args.pretrain_iters),  # the final checkpoint only
        "SOLVER.LOG_PERIOD", "10",
        "MODEL.CONTRAST.QUEUE_SIZE", str(args.queue_size),
        "MODEL.CONTRAST.MOMENTUM", str(args.momentum),
        "MODEL.CONTRAST.MLP_NORM", args.mlp_norm,
        "MODEL.CONTRAST.MLP_HIDDEN_DIM", "2048",
        "DATALOADER.NUM_WORKERS", "1",
        "OUTPUT_DIR", out,
    ]  # fmt: skip
    if method == "insloc_c4":
        cmd += ["MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", str(args.roi_pooler)]
    if method.startswith("insloc"):
        cmd += ["INPUT.PRETRAIN.COPY_PASTE.CANVAS_SIZE", str(s),
                "INPUT.PRETRAIN.COPY_PASTE.PASTE_SIZE", f"({s // 2}, {s - 1})"]  # fmt: skip
    else:
        cmd += ["INPUT.PRETRAIN.CROP_SIZE", str(s)]
    return cmd


def pretrain(method: str, seed: int, args, pool: str) -> str:
    """Run (or find) one pretraining run; returns its final checkpoint."""
    out = os.path.abspath(os.path.join(args.output_dir, "pretrain", f"{method}_seed{seed}"))
    final = os.path.join(out, "model_final.pth")
    if os.path.isfile(final):
        return final
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "stdout.txt"), "a") as f:
        proc = subprocess.run(pretrain_command(method, seed, args, out, pool), cwd=PROJECT_DIR,
                              env=_env(), stdout=f, stderr=subprocess.STDOUT)  # fmt: skip
    if proc.returncode != 0:
        with open(os.path.join(out, "stdout.txt")) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"pretraining {method} seed {seed} failed ({out}/stdout.txt):\n{tail}")
    return final


def pretext_summary(run_dir: str, queue_size: int) -> dict:
    """Last logged loss and contrastive top-1 of the final stage, with chance ln(K + 1)."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        return {}
    every = [json.loads(ln) for ln in open(path) if ln.strip()]
    records = [r for r in every if "total_loss" in r]
    if not records:
        return {}
    last = records[-1]
    # Accuracies are written every SOLVER.LOG_PERIOD, not on every record: the last that has them.
    with_acc = [r for r in every if any(k.startswith("[metric]acc/") for k in r)]
    accs = {k: v for k, v in (with_acc or [{}])[-1].items() if k.startswith("[metric]acc/")}
    # The image-level term of the deepest level: MoCo v2's only term, InsLoc's P5 / res4,
    # DetCo's global res5 term.
    preferred = ("acc/moco", "acc/insloc_p5", "acc/insloc_res4", "acc/res5_gg")
    key = next((k for k in accs for p in preferred if k.endswith(p)), None)
    return {
        "total_loss": last["total_loss"],
        "acc_key": key,
        "acc_top1": accs.get(key),
        "chance_loss": math.log(queue_size + 1),
    }


# ------------------------------------------------------------------------------------------
# Readouts (in worker processes, one thread each)
# ------------------------------------------------------------------------------------------
def readout_model(
    weights: str, seed: int, cells_images: int, pooler: int, precise_bn: int, view_size: int,
    device: str,
) -> dict:  # fmt: skip
    """Views, kNN, Cls, Loc and ObjLoc of one checkpoint (or random init with ``seed``); the
    views at ``view_size``, the pretraining's view side."""
    import torch
    from detectron2.data import MetadataCatalog

    torch.set_num_threads(1)
    from insloc_detco.readout.datasets import class_labels, get_readout_dataset
    from insloc_detco.readout.encoder import build_readout_encoder
    from insloc_detco.readout.features import eval_transform, extract_features, image_batches
    from insloc_detco.readout.knn import knn_accuracy
    from insloc_detco.readout.linear import LinearRecipe, linear_probe
    from insloc_detco.readout.localization import (
        grid_boxes,
        localization_probe,
        object_cell_probe,
        object_cells,
    )
    from insloc_detco.readout.views import view_retrieval

    train, classes = get_readout_dataset("demo_cls_train")
    val, _ = get_readout_dataset("demo_cls_val")
    opts = ["MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", str(pooler)]
    encoder, report = build_readout_encoder(weights, "c4", device, seed, opts)
    size = MetadataCatalog.get("demo_cls_train").image_size
    tf, boxes = eval_transform(size, size), grid_boxes(size, size, 3)
    start = time.process_time()
    if precise_bn > 0:
        encoder.recompute_bn_statistics(image_batches(train[:precise_bn], tf, 64))
    # One pass per image: the first ``cells_images`` with their cell boxes, then the rest.
    cells = train[:cells_images]
    f_trc = extract_features(encoder, cells, tf, ("res5",), boxes, num_workers=0)
    f_rest = extract_features(encoder, train[cells_images:], tf, ("res5",), num_workers=0)
    f_tr = {"res5": torch.cat([f_trc["res5"], f_rest.get("res5", f_trc["res5"][:0])])}
    f_va = extract_features(encoder, val, tf, ("res5",), boxes, num_workers=0)
    y_tr, y_va = torch.as_tensor(class_labels(train)), torch.as_tensor(class_labels(val))
    # Cached features: standardised, so one learning rate fits random and pretrained features.
    recipe = LinearRecipe(normalize="standardize", seed=seed)
    out = {
        "Views": view_retrieval(encoder, val, view_size, ("res5",))["top1_res5"],
        "kNN": knn_accuracy(f_tr["res5"], y_tr, f_va["res5"], y_va, len(classes), (20,))[
            "top1@k20"
        ],
        "Cls": linear_probe(f_tr["res5"], y_tr, f_va["res5"], y_va, len(classes), recipe)["top1"],
    }
    out.update(localization_probe(f_trc["boxes"], f_va["boxes"], 9, recipe))
    out.update(object_cell_probe(f_trc["boxes"], object_cells(cells, size, size), f_va["boxes"],
                                 object_cells(val, size, size), 9, recipe))  # fmt: skip
    return {"metrics": out, "weights_loaded": report.summary(),
            "cpu_s": round(time.process_time() - start, 1)}  # fmt: skip


# ------------------------------------------------------------------------------------------
# Detection fine-tune (optional)
# ------------------------------------------------------------------------------------------
def finetune(method: str, seed: int, weights: str, args) -> dict:
    out = os.path.abspath(os.path.join(args.output_dir, "finetune", f"{method}_seed{seed}"))
    os.makedirs(out, exist_ok=True)
    it = args.finetune_iters
    cmd = [
        sys.executable, "eval_transfer.py", "run", weights, "--benchmark", "demo_coco_fpn",
        "--trials", "1", "--seed", str(seed), "--output-dir", out,
        "--num-gpus", str(args.num_gpus), "MODEL.DEVICE", args.device,
        "SOLVER.MAX_ITER", str(it), "SOLVER.STEPS", f"({int(it * 0.75)},)",
        "SOLVER.WARMUP_ITERS", str(max(1, it // 10)), "SOLVER.IMS_PER_BATCH", "4",
        "SOLVER.BASE_LR", "0.02",
    ]  # fmt: skip
    with open(os.path.join(out, "stdout.txt"), "a") as f:
        proc = subprocess.run(cmd, cwd=PROJECT_DIR, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"fine-tuning {method} seed {seed} failed; see {out}/stdout.txt")
    with open(os.path.join(out, "results.json")) as f:
        summary = json.load(f)["demo_coco_fpn"]["summary"]
    return {k: v["mean"] for k, v in summary.items()}


# ------------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------------
def summarize(runs: dict, columns) -> dict:
    from insloc_detco.engine.runs import mean_std

    out = {}
    for method, seeds in runs.items():
        out[method] = {}
        for c in columns:
            values = [r["metrics"][c] for r in seeds.values() if c in r.get("metrics", {})]
            if values:
                out[method][c] = mean_std(values)
        acc = [r["pretext"]["acc_top1"] for r in seeds.values()
               if r.get("pretext", {}).get("acc_top1") is not None]  # fmt: skip
        if acc:
            out[method]["pretext top-1"] = mean_std(acc)
    return out


def table(summary: dict, columns, seeds: int) -> str:
    from insloc_detco.engine.runs import format_mean_std

    cols = list(columns) + ["pretext top-1"]
    lines = ["| pretraining | " + " | ".join(cols) + " | seeds |",
             "|---" * (len(cols) + 2) + "|"]  # fmt: skip
    for method, s in summary.items():
        cells = [format_mean_std(s.get(c)) for c in cols]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {seeds} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"Unknown method(s) {unknown}; choose from {list(METHODS)}")
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.time()

    from insloc_detco.readout.demo_cls import demo_cls_root, ensure_demo_cls

    root = ensure_demo_cls(demo_cls_root())
    pool = os.path.join(root, "train")  # the labelled set's training images, labels unused
    seeds = list(range(1, args.seeds + 1))
    log(f"pretraining pool {pool}; methods {methods}; seeds {seeds}", start)

    results_path = os.path.join(args.output_dir, "results.json")
    previous = json.load(open(results_path)).get("runs", {}) if os.path.isfile(results_path) else {}
    # What a cached readout must have been computed with (readout_model's arguments in order).
    readout_settings = {"cells_images": args.readout_cells_images, "roi_pooler": args.roi_pooler,
                        "precise_bn": args.precise_bn, "view_size": args.image_size}  # fmt: skip
    readout_args = (*readout_settings.values(), args.device)
    runs = {m: {} for m in methods}

    def cached_readout(m, s, ckpt):
        done = previous.get(m, {}).get(str(s))
        if (done and set(COLUMNS) <= set(done.get("metrics", {})) and done.get("weights") == ckpt
                and done.get("readout") == readout_settings):  # fmt: skip
            return done
        return None

    # One pool for everything: pretraining runs longest first (the tail is then short), each
    # checkpoint's readout queued as soon as it exists, random init's behind the pretraining;
    # no core idles while another run finishes. Every run and readout is seeded, so the order
    # changes no number.
    order = sorted((m for m in methods if METHODS[m]), key=lambda m: -STEP_COST[m])
    with ProcessPoolExecutor(max_workers=args.jobs) as ex:
        pending = {ex.submit(pretrain, m, s, args, pool): ("pretrain", m, s, None)
                   for m in order for s in seeds}  # fmt: skip
        for m in (m for m in methods if not METHODS[m]):
            for s in seeds:
                done = cached_readout(m, s, "random")
                if done:
                    runs[m][str(s)] = done
                else:
                    pending[ex.submit(readout_model, "random", s, *readout_args)] = (
                        "readout", m, s, "random")  # fmt: skip
        while pending:
            fut = next(as_completed(pending))
            kind, m, s, ckpt = pending.pop(fut)
            result = fut.result()
            if kind == "pretrain":
                log(f"{m} seed {s}: pretrained ({result})", start)
                done = cached_readout(m, s, result)
                if done is None:
                    pending[ex.submit(readout_model, result, s, *readout_args)] = (
                        "readout", m, s, result)
                    continue
                result, ckpt = done, result
            result.update(weights=ckpt, readout=readout_settings)
            if ckpt != "random":
                result["pretext"] = pretext_summary(os.path.dirname(ckpt), args.queue_size)
            runs[m][str(s)] = result
            log(f"{m} seed {s}: {result['metrics']}", start)
    runs = {m: dict(sorted(r.items(), key=lambda kv: int(kv[0]))) for m, r in runs.items()}
    checkpoints = {(m, int(s)): r["weights"] for m in runs for s, r in runs[m].items()}
    if args.finetune_iters > 0:
        for (m, s), ckpt in checkpoints.items():
            runs[m][str(s)]["metrics"].update(finetune(m, s, ckpt, args))
    columns = COLUMNS + (("AP", "AP50") if args.finetune_iters > 0 else ())
    summary = summarize(runs, columns)
    md = table(summary, columns, args.seeds)
    wall = round(time.time() - start)
    with open(results_path, "w") as f:
        json.dump({"settings": vars(args), "runs": runs, "summary": summary, "wall_s": wall}, f,
                  indent=2)  # fmt: skip
    with open(os.path.join(args.output_dir, "mini_benchmark.md"), "w") as f:
        f.write(md + "\n\n" + json.dumps(vars(args)) + f"\nwall {wall} s\n")
    log(f"finished in {wall} s\n{md}", start)


if __name__ == "__main__":
    main()
