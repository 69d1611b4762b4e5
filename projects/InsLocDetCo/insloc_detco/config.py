"""Config keys of InsLocDetCo.

Every key is added here, before the YAML is merged, so that a misspelt key in a config file or on
the command line fails at load time (yacs raises ``KeyError: Non-existent config key``).
Symbols in the comments follow the papers: MoCo (He et al. 2020, Chen et al. 2020), InsLoc
(Yang et al. CVPR 2021) and DetCo (Xie et al. ICCV 2021).
"""

from detectron2.config import CfgNode as CN

from .checkpoint.periodic import DEFAULT_MAX_TO_KEEP


def add_insloc_detco_config(cfg):
    """Add the pretraining keys to a detectron2 config in place."""
    _C = cfg

    # ---------------------------------------------------------------------------------------
    # Contrastive machinery shared by MoCo v2, InsLoc and DetCo.
    # ---------------------------------------------------------------------------------------
    _C.MODEL.CONTRAST = CN()
    # Dimension of the L2-normalised embedding that enters InfoNCE.
    _C.MODEL.CONTRAST.DIM = 128
    # K: number of negative keys kept in each FIFO queue.
    _C.MODEL.CONTRAST.QUEUE_SIZE = 65536
    # T (tau): InfoNCE temperature (MoCo v2 uses 0.2).
    _C.MODEL.CONTRAST.TEMPERATURE = 0.2
    # m: momentum of the key encoder, theta_k <- m * theta_k + (1 - m) * theta_q.
    _C.MODEL.CONTRAST.MOMENTUM = 0.999
    # Hidden width of the 2-layer projection MLP on res5 features (MoCo v2: 2048).
    _C.MODEL.CONTRAST.MLP_HIDDEN_DIM = 2048
    # Norm after the first layer of every projection MLP: "" (the papers) or "BN" (SimCLR /
    # MoCo v3 heads; short schedules collapse without it: docs/BENCHMARKS.md).
    _C.MODEL.CONTRAST.MLP_NORM = ""
    # Shuffle-BN: encode keys on a random permutation of the global batch so that BatchNorm
    # statistics cannot leak the positive pair (MoCo Sec. 3.3).
    _C.MODEL.CONTRAST.SHUFFLE_BN = True
    # One process: encode the permuted key batch in this many chunks, each with its own BN
    # statistics (split-batch emulation of shuffle-BN; 1 = plain encoding).
    _C.MODEL.CONTRAST.SINGLE_PROCESS_BN_SPLITS = 2

    # ---------------------------------------------------------------------------------------
    # InsLoc (instance localization).
    # ---------------------------------------------------------------------------------------
    _C.MODEL.INSLOC = CN()
    # Feature maps the box is pooled from: FPN all of p2..p5 (no level assignment); C4 res4.
    _C.MODEL.INSLOC.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    # Per-level loss weights, same order as IN_FEATURES (paper: sum over levels, all 1).
    _C.MODEL.INSLOC.LEVEL_LOSS_WEIGHTS = [1.0, 1.0, 1.0, 1.0]
    # Hidden width of the FC layers after the detectron2 box head (fc1 -> FC_DIM -> DIM).
    _C.MODEL.INSLOC.FC_DIM = 1024
    # Ablation switches (InsLoc Table 3b):
    # pool the pasted box with RoIAlign; False -> global average pool of the whole map.
    _C.MODEL.INSLOC.ROI_ALIGN = True
    # compose the instance on a background; False -> the plain MoCo v2 crop, box = whole view.
    _C.MODEL.INSLOC.COPY_PASTE = True
    # jitter the query box with an anchor of IoU > BOX_AUG_IOU to the true box.
    _C.MODEL.INSLOC.BOX_AUG = True
    # Features on which the query box is augmented (reference: P5 only for FPN; res4 for C4).
    _C.MODEL.INSLOC.BOX_AUG_FEATURES = ["p5"]
    # An anchor qualifies when its IoU with the true box exceeds this.
    _C.MODEL.INSLOC.BOX_AUG_IOU = 0.5
    # NMS threshold applied to qualifying anchors scored at random before one is picked.
    _C.MODEL.INSLOC.BOX_AUG_NMS = 0.7
    # Anchor grid of the box augmentation: stride (pixels), sizes and aspect ratios (H/W).
    _C.MODEL.INSLOC.BOX_AUG_ANCHOR_STRIDE = 16
    _C.MODEL.INSLOC.BOX_AUG_ANCHOR_SIZES = [32, 64, 128, 256]
    _C.MODEL.INSLOC.BOX_AUG_ANCHOR_RATIOS = [0.5, 1.0, 2.0]

    # ---------------------------------------------------------------------------------------
    # DetCo (multi-level supervision + global-local contrast).
    # ---------------------------------------------------------------------------------------
    _C.MODEL.DETCO = CN()
    # Backbone stages with a contrastive head (MLS).
    _C.MODEL.DETCO.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    # w_i: loss weight of each stage, shallow < deep (DetCo Eq. 3).
    _C.MODEL.DETCO.STAGE_LOSS_WEIGHTS = [0.1, 0.4, 0.7, 1.0]
    # Multi-level supervision; False -> only the last stage of IN_FEATURES is supervised.
    _C.MODEL.DETCO.MULTI_LEVEL = True
    # Global-local contrast (L_l<->l and L_l->g); False -> only L_g<->g.
    _C.MODEL.DETCO.GLOBAL_LOCAL = True
    # Weights of each stage's terms L_g<->g, L_l<->l, L_l->g (Eq. 1: all 1; one-way, Eqs. 2/4/5).
    _C.MODEL.DETCO.TERM_WEIGHTS = [1.0, 1.0, 1.0]
    # Hidden width of the global head mlp^i_q as a multiple of C_i (1: MoCo v2's, Sec. 3.1).
    _C.MODEL.DETCO.GLOBAL_HIDDEN_MULT = 1
    # Hidden width of the local head mlp_local (9 C_i -> hidden -> 128) as a multiple of C_i
    # (our choice: the paper does not give it).
    _C.MODEL.DETCO.LOCAL_HIDDEN_MULT = 1

    # ---------------------------------------------------------------------------------------
    # Pretraining input pipeline (MoCo v2 augmentation, InsLoc compositor, DetCo jigsaw).
    # ---------------------------------------------------------------------------------------
    _C.INPUT.PRETRAIN = CN()
    # Name in PRETRAIN_MAPPER_REGISTRY of the mapper that makes the method's views:
    # "MoCoV2Mapper", "CopyPasteMapper" (InsLoc), "JigsawMapper" (DetCo).
    _C.INPUT.PRETRAIN.MAPPER = "MoCoV2Mapper"
    # Side of the square RandomResizedCrop of each global view.
    _C.INPUT.PRETRAIN.CROP_SIZE = 224
    # Area range and aspect range (w/h, log-uniform) of RandomResizedCrop.
    _C.INPUT.PRETRAIN.CROP_SCALE = (0.2, 1.0)
    _C.INPUT.PRETRAIN.CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
    # ColorJitter (brightness, contrast, saturation, hue), applied with probability p.
    _C.INPUT.PRETRAIN.COLOR_JITTER = (0.4, 0.4, 0.4, 0.1)
    _C.INPUT.PRETRAIN.COLOR_JITTER_PROB = 0.8
    _C.INPUT.PRETRAIN.GRAYSCALE_PROB = 0.2
    # Gaussian blur sigma range and probability; the kernel side is the odd integer nearest to
    # BLUR_KERNEL_FRAC x view size (SimCLR's 10%).
    _C.INPUT.PRETRAIN.BLUR_SIGMA = (0.1, 2.0)
    _C.INPUT.PRETRAIN.BLUR_PROB = 0.5
    _C.INPUT.PRETRAIN.BLUR_KERNEL_FRAC = 0.1
    _C.INPUT.PRETRAIN.FLIP_PROB = 0.5
    # Where the photometric part of a view runs (one definition, data/augmentation.py):
    # "loader" (workers), "device" (the model's preprocess), "auto" (device on CUDA).
    _C.INPUT.PRETRAIN.AUGMENT_ON = "auto"
    # Where JPEGs are decoded and cut: "loader", "device" (workers ship bytes and crop boxes;
    # MoCo v2 and DetCo; data/device_decode.py) or "auto" (device on CUDA where possible).
    _C.INPUT.PRETRAIN.DECODE_ON = "loader"
    # Images whose shorter side is below this many pixels are skipped (and counted).
    _C.INPUT.PRETRAIN.MIN_IMAGE_SIZE = 16
    # Decoded images are first resized so that the shorter side is at most this (0: never).
    _C.INPUT.PRETRAIN.MAX_DECODE_SIZE = 0
    # Images of more pixels (read from the header, before decoding) are skipped and counted
    # (0: no cap). Default: Pillow's decompression-bomb threshold, written out.
    _C.INPUT.PRETRAIN.MAX_IMAGE_PIXELS = 89_478_485
    # Abort when a loader worker's first this-many images are all unreadable, or every file is;
    # after one good image, failures are only skipped and counted.
    _C.INPUT.PRETRAIN.MAX_CONSECUTIVE_FAILURES = 1000

    # InsLoc copy-paste compositor.
    _C.INPUT.PRETRAIN.COPY_PASTE = CN()
    # Side of the square canvas the background is resized to.
    _C.INPUT.PRETRAIN.COPY_PASTE.CANVAS_SIZE = 256
    # Area range of the foreground crop (aspect log-uniform in CROP_RATIO).
    _C.INPUT.PRETRAIN.COPY_PASTE.CROP_SCALE = (0.2, 1.0)
    _C.INPUT.PRETRAIN.COPY_PASTE.CROP_RATIO = (0.5, 2.0)
    # The crop is rescaled, keeping its aspect, to fit a random (w, h) with w, h in [lo, hi).
    _C.INPUT.PRETRAIN.COPY_PASTE.PASTE_SIZE = (128, 255)
    # Backgrounds: "dataset" (a random image per view, as the reference) or "batch" (other
    # images of the same batch: no extra decode).
    _C.INPUT.PRETRAIN.COPY_PASTE.BACKGROUND = "dataset"

    # DetCo jigsaw local views.
    _C.INPUT.PRETRAIN.JIGSAW = CN()
    # Minimum area fraction of the random crop that is cut into the puzzle.
    _C.INPUT.PRETRAIN.JIGSAW.CROP_SCALE = (0.6, 1.0)
    # The crop is resized to (GRID x CELL_SIZE)^2, cut into GRID x GRID cells, and a random
    # PATCH_SIZE square is taken inside every cell.
    _C.INPUT.PRETRAIN.JIGSAW.GRID = 3
    _C.INPUT.PRETRAIN.JIGSAW.CELL_SIZE = 85
    _C.INPUT.PRETRAIN.JIGSAW.PATCH_SIZE = 64
    # RandAugment on the global views (the paper's "AA" variant); 0 ops disables it.
    _C.INPUT.PRETRAIN.RANDAUGMENT_OPS = 0
    _C.INPUT.PRETRAIN.RANDAUGMENT_MAGNITUDE = 9

    # ---------------------------------------------------------------------------------------
    # Speed on the training device.
    # ---------------------------------------------------------------------------------------
    # NHWC ("channels last") model and batches on CUDA (ignored on the CPU; docs/SPEED.md).
    _C.MODEL.CHANNELS_LAST = True
    # The training step's fast path (torch.compile, CUDA graphs, fused SGD; engine/fast_path.py):
    # "on", "off" (eager), or "auto" (on CUDA only). Both run the same step definition.
    _C.MODEL.FAST_PATH = CN()
    _C.MODEL.FAST_PATH.ENABLED = "auto"
    # torch.compile backend: "inductor" (fused kernels) or e.g. "aot_eager" (traced, run eagerly).
    _C.MODEL.FAST_PATH.BACKEND = "inductor"
    # torch.compile mode, or "auto": "reduce-overhead" (CUDA graphs) on CUDA, else "default".
    _C.MODEL.FAST_PATH.COMPILE_MODE = "auto"
    # Autocast dtype of SOLVER.AMP.ENABLED: "bfloat16", "float16", or "auto" (bfloat16 where
    # supported: it needs no GradScaler).
    _C.SOLVER.AMP.PRECISION = "auto"

    # Intra-op threads of each training process; 0 = auto (OMP_NUM_THREADS if set, else the
    # cores its loader workers leave on CUDA, or its share of the cores on the CPU).
    _C.DATALOADER.MAIN_PROCESS_THREADS = 0

    # ---------------------------------------------------------------------------------------
    # Schedule.
    # ---------------------------------------------------------------------------------------
    # > 0: MAX_ITER = ceil(EPOCHS * len(train set) / IMS_PER_BATCH), before world-size scaling.
    _C.SOLVER.EPOCHS = 0
    # Iterations between console / metrics.json / TensorBoard writes.
    _C.SOLVER.LOG_PERIOD = 20
    # Write a loss / accuracy curve PNG from metrics.json at every checkpoint and at the end.
    _C.SOLVER.PLOT_CURVES = True
    # Newest periodic checkpoints kept in OUTPUT_DIR (model_final.pth always; 0 keeps all).
    _C.SOLVER.CHECKPOINT_MAX_TO_KEEP = DEFAULT_MAX_TO_KEEP
    # Scale BASE_LR linearly when the command line changes IMS_PER_BATCH but not BASE_LR
    # (engine/lr_scaling.py); False keeps the config file's BASE_LR.
    _C.SOLVER.SCALE_LR_WITH_BATCH = True
