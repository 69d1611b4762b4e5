#!/usr/bin/env python
"""
Mini transfer benchmark: does each pretext task learn something useful for detection?

Random init, MoCo v2, InsLoc-C4, InsLoc-FPN and DetCo are pretrained with the same budget
(iterations x batch, same unlabeled images) and fine-tuned with the same Mask R-CNN R50-FPN
recipe on the generated ``demo_det`` detection task (real-photo backgrounds), several seeds
each; prints AP / AP50 / AP75 / APmask as mean +- std.

    python bench/mini_transfer.py                     # CPU defaults (about an hour on 2 cores)
    python bench/mini_transfer.py --seeds 5 --pretrain-iters 2000 --pretrain-batch 64 \
        --finetune-iters 1000 --device cuda           # the same experiment, larger, on a GPU

Pretraining images (512 by default): the ``demo_det`` train images (labels unused), more images
generated like them with another seed, and the 18 scikit-image photos; the ``demo_det`` val
images are never seen before evaluation. Everything (runs,
checkpoints, results.json, mini_transfer.md) goes under ``--output-dir``; re-running skips
finished pretraining runs and fine-tuning trials.
"""
import argparse
import json
import os
import subprocess
import sys
import time

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PROJECT_DIR)

METHODS = {  # name -> instant-test pretraining config (its full-scale parent holds the recipe)
    "random": None,
    "moco_v2": "instant_test/pretrain_moco_v2.yaml",
    "insloc_c4": "instant_test/pretrain_insloc_c4.yaml",
    "insloc_fpn": "instant_test/pretrain_insloc_fpn.yaml",
    "detco": "instant_test/pretrain_detco.yaml",
}
BENCHMARK = "demo_coco_fpn"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning trials per method")
    p.add_argument("--pretrain-iters", type=int, default=200)
    p.add_argument("--pretrain-batch", type=int, default=16)
    p.add_argument("--pretrain-lr", type=float, default=0.03)
    p.add_argument("--num-unlabeled", type=int, default=462,
                   help="extra generated images in the pretraining pool (with the 32 demo_det "
                   "train images and 18 photos: 512)")
    p.add_argument("--queue-size", type=int, default=128,
                   help="keep it well below the pool size: older keys of the same image in the "
                   "queue are false negatives")
    p.add_argument("--finetune-iters", type=int, default=100)
    p.add_argument("--finetune-batch", type=int, default=4)
    p.add_argument("--finetune-lr", type=float, default=0.02)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per run")
    p.add_argument("--output-dir", default="output/mini_transfer")
    return p.parse_args(argv)


def log(msg: str, start: float):
    print(f"[mini_transfer {time.strftime('%H:%M:%S')} +{time.time() - start:6.0f}s] {msg}",
          flush=True)


def run(cmd, log_file: str):
    """Run a command, streaming its output to ``log_file``; raise with the tail on failure."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_file, "a") as f:
        proc = subprocess.run(cmd, cwd=PROJECT_DIR, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log_file) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log_file}:\n{tail}")


def pretraining_list(output_dir: str, num_unlabeled: int) -> str:
    """Write the unlabeled image list: demo_det train images, ``num_unlabeled`` more images
    drawn like them (another seed), and the scikit-image photos."""
    from detectron2.data import DatasetCatalog

    from insloc_detco.transfer.demo_det import write_unlabeled_images

    files = [d["file_name"] for d in DatasetCatalog.get("demo_det_coco_train")]
    pool = os.path.abspath(os.path.join(output_dir, "unlabeled"))  # the list needs full paths
    files += write_unlabeled_images(pool, num_unlabeled)
    files += [d["file_name"] for d in DatasetCatalog.get("pretrain_demo")]
    path = os.path.abspath(os.path.join(output_dir, "pretrain_images.txt"))
    with open(path, "w") as f:
        f.write("\n".join(files) + "\n")
    return path


def pretrain(method: str, args, image_list: str, start: float) -> str:
    out = os.path.abspath(os.path.join(args.output_dir, "pretrain", method))
    final = os.path.join(out, "model_final.pth")
    if os.path.isfile(final):
        log(f"{method}: pretraining finished earlier ({final})", start)
        return final
    os.makedirs(out, exist_ok=True)
    log(f"{method}: pretraining {args.pretrain_iters} iterations x {args.pretrain_batch} "
        f"images (log: {out}/log.txt)", start)
    run([
        sys.executable, "train_net.py", "--config-file", METHODS[method],
        "--num-gpus", str(args.num_gpus), "--resume",
        "MODEL.DEVICE", args.device,
        "DATASETS.TRAIN", f"('list:{image_list}',)",
        "SOLVER.MAX_ITER", str(args.pretrain_iters),
        "SOLVER.IMS_PER_BATCH", str(args.pretrain_batch),
        "SOLVER.BASE_LR", str(args.pretrain_lr),
        "SOLVER.CHECKPOINT_PERIOD", str(max(50, args.pretrain_iters // 4)),
        "SOLVER.LOG_PERIOD", "10",
        "MODEL.CONTRAST.QUEUE_SIZE", str(args.queue_size),
        "DATALOADER.NUM_WORKERS", "1",
        "OUTPUT_DIR", out,
    ], os.path.join(out, "stdout.txt"))
    return final


def finetune(method: str, weights: str, args, start: float) -> dict:
    out = os.path.abspath(os.path.join(args.output_dir, "finetune", method))
    os.makedirs(out, exist_ok=True)
    log(f"{method}: fine-tuning {BENCHMARK} x {args.seeds} seeds, {args.finetune_iters} "
        f"iterations each (logs under {out})", start)
    iters = args.finetune_iters
    run([
        sys.executable, "eval_transfer.py", "run", weights, "--benchmark", BENCHMARK,
        "--trials", str(args.seeds), "--output-dir", out, "--num-gpus", str(args.num_gpus),
        "MODEL.DEVICE", args.device,
        "SOLVER.MAX_ITER", str(iters),
        "SOLVER.STEPS", f"({int(iters * 0.75)},)",
        "SOLVER.WARMUP_ITERS", str(max(1, iters // 10)),
        "SOLVER.IMS_PER_BATCH", str(args.finetune_batch),
        "SOLVER.BASE_LR", str(args.finetune_lr),
    ], os.path.join(out, "stdout.txt"))
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)[BENCHMARK]


def table(results: dict) -> str:
    from insloc_detco.engine.runs import format_mean_std

    cols = ("AP", "AP50", "AP75", "APmask")
    lines = [
        "| pretraining | " + " | ".join(cols) + " | seeds |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for method, r in results.items():
        cells = [format_mean_std(r["summary"].get(c)) for c in cols]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {len(r['trials'])} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"Unknown method(s) {unknown}; choose from {list(METHODS)}")
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.time()
    image_list = pretraining_list(args.output_dir, args.num_unlabeled)
    log(f"{sum(1 for _ in open(image_list))} pretraining images; methods: {methods}", start)
    checkpoints = {m: "random" if METHODS[m] is None else pretrain(m, args, image_list, start)
                   for m in methods}
    results = {}
    for m in methods:
        results[m] = finetune(m, checkpoints[m], args, start)
        log(f"{m}: done\n{table(results)}", start)
    md = table(results)
    settings = {k: v for k, v in vars(args).items()}
    with open(os.path.join(args.output_dir, "mini_transfer.md"), "w") as f:
        f.write(md + "\n\n" + json.dumps(settings) + "\n")
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"settings": settings, "results": results,
                   "wall_s": round(time.time() - start)}, f, indent=2)
    log(f"finished in {time.time() - start:.0f} s\n{md}", start)


if __name__ == "__main__":
    main()
