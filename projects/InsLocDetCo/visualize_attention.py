#!/usr/bin/env python
"""
Per-stage attention maps (res2..res5) of one or more checkpoints, side by side, as DetCo's
Fig. 4: one PNG per image, a row per checkpoint.

    python visualize_attention.py output/pretrain_detco/model_final.pth \\
        output/pretrain_moco_v2/model_final.pth random --images a.jpg b.jpg --size 224
    python visualize_attention.py model_final.pth random --dataset demo_cls_val --num-images 4

Weights: pretraining checkpoints (.pth), converted .pkl files, or "random". A map is the mean
over channels of the squared activations (Zagoruyko & Komodakis 2017), scaled to [0, 1].
"""

import argparse
import os
import sys

from insloc_detco.data.reading import UnreadableImageError, read_rgb_image
from insloc_detco.readout.attention import attention_maps, save_attention_figure
from insloc_detco.readout.datasets import get_readout_dataset
from insloc_detco.readout.encoder import LAYOUTS, STAGES, ReadoutError, build_readout_encoder
from insloc_detco.readout.features import eval_transform
from insloc_detco.transfer.converter import ConversionError


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("weights", nargs="+", help="checkpoints (.pth / .pkl) or 'random'")
    p.add_argument("--images", nargs="*", default=[], help="image files")
    p.add_argument("--dataset", default=None, help="or the first --num-images of a data set")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--labels", default=None, help="comma-separated row labels (default: names)")
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="shorter side and centre crop (default: the data set's size, else 224)",
    )
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--layout", choices=LAYOUTS, default="c4")
    p.add_argument("--output-dir", default="output/attention")
    return p


def _label(weights: str) -> str:
    if weights == "random":
        return "random init"
    parent = os.path.basename(os.path.dirname(os.path.abspath(weights)))
    return f"{parent}/{os.path.basename(weights)}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    try:
        if any(s not in STAGES for s in stages):
            raise ReadoutError(f"--stages must be among {STAGES}")
        files, size = list(args.images), args.size
        if args.dataset:
            records, _ = get_readout_dataset(args.dataset)
            files += [r["file_name"] for r in records[: args.num_images]]
            if size is None:
                from detectron2.data import MetadataCatalog

                size = MetadataCatalog.get(args.dataset).get("image_size", None)
        if not files:
            raise ReadoutError("Give --images or --dataset.")
        size = size or 224
        labels = args.labels.split(",") if args.labels else [_label(w) for w in args.weights]
        if len(labels) != len(args.weights):
            raise ReadoutError("--labels needs one label per weights file.")
        encoders = [build_readout_encoder(w, args.layout)[0] for w in args.weights]
        tf = eval_transform(size, size)
        for f in files:
            image = tf(read_rgb_image(f))
            rows = [(lab, attention_maps(e, image, stages)) for lab, e in zip(labels, encoders)]
            stem = os.path.splitext(os.path.basename(f))[0]
            out = os.path.join(args.output_dir, f"attention_{stem}.png")
            save_attention_figure(image, rows, out, title=os.path.basename(f))
            print(f"Wrote {out}")
    except (ReadoutError, ConversionError, UnreadableImageError) as e:
        print(f"visualize_attention.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
