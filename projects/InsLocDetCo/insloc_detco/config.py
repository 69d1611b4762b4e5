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
    # Normalisation after the first layer of every projection MLP: "" (none: MoCo v2, InsLoc
    # and DetCo as published) or "BN" (BatchNorm1d, as SimCLR / MoCo v3 heads). Short
    # schedules need "BN": without it the embeddings of all images crowd into a narrow cone
    # whose direction drifts, and the contrastive accuracy rises by recognising the freshest
    # keys instead of the instance while the loss climbs to ln(K + 1) (README, mini benchmark).
    _C.MODEL.CONTRAST.MLP_NORM = ""
    # Shuffle-BN: encode keys on a random permutation of the global batch so that BatchNorm
    # statistics cannot leak the positive pair (MoCo Sec. 3.3).
    _C.MODEL.CONTRAST.SHUFFLE_BN = True
    # With a single process there is no other rank to shuffle to: the key batch is permuted
    # and encoded in this many chunks, each with its own BN statistics (split-batch emulation).
    # 1 disables the emulation.
    _C.MODEL.CONTRAST.SINGLE_PROCESS_BN_SPLITS = 2

    # ---------------------------------------------------------------------------------------
    # InsLoc (instance localization).
    # ---------------------------------------------------------------------------------------
    _C.MODEL.INSLOC = CN()
    # Feature maps the box is pooled from. FPN: all of p2..p5 (no size-based level assignment);
    # C4: res4.
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
    # Weights of the three terms in each stage: L_g<->g, L_l<->l, L_l->g (Eq. 1: all 1). Each
    # term is one-way, as Eqs. 2, 4, 5 write it (query side vs key side; not symmetrised).
    _C.MODEL.DETCO.TERM_WEIGHTS = [1.0, 1.0, 1.0]
    # Hidden width of the global head mlp^i_q (avgpool -> C -> 128), as a multiple of the
    # stage's channels C_i (1 -> MoCo v2's 2048 at res5; Sec. 3.1: heads "same as MoCo v2").
    _C.MODEL.DETCO.GLOBAL_HIDDEN_MULT = 1
    # Hidden width of the local head mlp_local (9 C_i -> hidden -> 128), as a multiple of C_i
    # (choice: 1 -> C_i; the paper does not give it).
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
    # Where the photometric part of a view (colour jitter, grayscale, blur, flip, RandAugment)
    # runs: "loader" (per view, in the loader workers), "device" (per batch, on the training
    # device, in the model's preprocess), or "auto" (device when MODEL.DEVICE is CUDA, else
    # loader). The same code runs in both places (data/augmentation.py).
    _C.INPUT.PRETRAIN.AUGMENT_ON = "auto"
    # Where JPEGs are decoded and the views cut: "loader" (in the loader workers, every
    # format), "device" (the workers read only the file's bytes and header and draw the crop
    # boxes; the training device decodes the batch, batched nvjpeg on CUDA, and cuts the views;
    # needs the photometric part on the device; MoCo v2 and DetCo only; formats and JPEGs the
    # device does not take are decoded in the loader), or "auto" (device on CUDA where that is
    # possible, else loader). docs/SPEED.md has the measurements behind the default.
    _C.INPUT.PRETRAIN.DECODE_ON = "loader"
    # Images whose shorter side is below this many pixels are skipped (and counted).
    _C.INPUT.PRETRAIN.MIN_IMAGE_SIZE = 16
    # Decoded images are first resized so that the shorter side is at most this (0: never).
    # Saves work on very large photos; ImageNet images are already below it.
    _C.INPUT.PRETRAIN.MAX_DECODE_SIZE = 0
    # Images that would decode to more pixels (width x height from the header, after the JPEG
    # draft reduction of MAX_DECODE_SIZE) are skipped and counted, before decoding, whatever
    # their format (0: no cap). The default is Pillow's own decompression-bomb threshold, written
    # out so that it does not depend on the process-wide PIL.Image.MAX_IMAGE_PIXELS: at most
    # 268 MB of RGB per decode, and room for any camera photo up to 89 MP (COCO images are at
    # most 640 px a side; ImageNet and OpenImages hold ordinary camera photos). Pillow itself
    # refuses images over 2 x PIL.Image.MAX_IMAGE_PIXELS, whatever this says (that skip says so).
    _C.INPUT.PRETRAIN.MAX_IMAGE_PIXELS = 89_478_485
    # Abort when the first this-many images a loader worker tries are all unreadable (nothing
    # can be read: the data, not a few files, is broken), or when every file of the data set
    # has been found unreadable. After one good image, failures are only skipped and counted.
    # A corpus with a readable fraction f aborts by chance with probability (1 - f)^N.
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
    # Where backgrounds come from: "dataset" (a random image per view: 3 decodes per sample)
    # or "batch" (other decoded images of the same batch, no extra decode).
    _C.INPUT.PRETRAIN.COPY_PASTE.BACKGROUND = "dataset"

    # DetCo jigsaw local views.
    _C.INPUT.PRETRAIN.JIGSAW = CN()
    # Minimum area fraction of the random crop that is cut into the puzzle.
    _C.INPUT.PRETRAIN.JIGSAW.CROP_SCALE = (0.6, 1.0)
    # The crop is resized to GRID x CELL_SIZE square, cut into GRID x GRID cells, and a
    # PATCH_SIZE square is cropped at random inside every cell.
    _C.INPUT.PRETRAIN.JIGSAW.GRID = 3
    _C.INPUT.PRETRAIN.JIGSAW.CELL_SIZE = 85
    _C.INPUT.PRETRAIN.JIGSAW.PATCH_SIZE = 64
    # RandAugment on the global views (the paper's "AA" variant); 0 ops disables it.
    _C.INPUT.PRETRAIN.RANDAUGMENT_OPS = 0
    _C.INPUT.PRETRAIN.RANDAUGMENT_MAGNITUDE = 9

    # ---------------------------------------------------------------------------------------
    # Speed on the training device.
    # ---------------------------------------------------------------------------------------
    # Keep the model and its input batches in NHWC ("channels last") memory format on CUDA
    # (ignored on the CPU): cuDNN runs the convolutions without layout transposes. Measured on
    # one H100, MoCo v2 at batch 64: +18% img/s in fp32/TF32, +24% under bf16 autocast
    # (README, "Speed").
    _C.MODEL.CHANNELS_LAST = True
    # Autocast dtype of SOLVER.AMP.ENABLED: "bfloat16", "float16", or "auto" (bfloat16 where
    # the GPU supports it, else float16). bfloat16 needs no loss scaling (no GradScaler, whose
    # overflow check synchronises the GPU every step).
    _C.SOLVER.AMP.PRECISION = "auto"

    # Intra-op threads (torch.set_num_threads) of each training process; 0 = auto: on CUDA, the
    # machine's cores left over by the loader workers of all local processes (at least 1); on
    # the CPU, the cores divided among the local processes. A user's OMP_NUM_THREADS is kept
    # when this is 0. Loader workers always run one thread each (PyTorch's DataLoader rule).
    _C.DATALOADER.MAIN_PROCESS_THREADS = 0

    # ---------------------------------------------------------------------------------------
    # Schedule.
    # ---------------------------------------------------------------------------------------
    # When > 0, SOLVER.MAX_ITER is derived as ceil(EPOCHS * len(train set) / IMS_PER_BATCH)
    # (before REFERENCE_WORLD_SIZE scaling), so configs can state epochs as the papers do.
    _C.SOLVER.EPOCHS = 0
    # Iterations between console / metrics.json / TensorBoard writes.
    _C.SOLVER.LOG_PERIOD = 20
    # Write a loss / accuracy curve PNG from metrics.json at every checkpoint and at the end.
    _C.SOLVER.PLOT_CURVES = True
    # Periodic checkpoints (model_<iter>.pth) kept in OUTPUT_DIR: after each one is written,
    # all but this many newest are deleted; model_final.pth is always kept. 0 keeps all
    # (a DetCo checkpoint is ~1.2 GB: one per epoch for 200 epochs would be ~240 GB).
    _C.SOLVER.CHECKPOINT_MAX_TO_KEEP = DEFAULT_MAX_TO_KEEP
    # BASE_LR is the config file's lr for the config file's IMS_PER_BATCH: when the command
    # line changes SOLVER.IMS_PER_BATCH without setting SOLVER.BASE_LR, scale BASE_LR linearly
    # with the batch (engine/lr_scaling.py). False keeps the config file's BASE_LR.
    _C.SOLVER.SCALE_LR_WITH_BATCH = True
