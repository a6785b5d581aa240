"""Default configurations shared by every experiment file under configs/.

Each file in configs/ calls `base_config()` (segmentation) or `translation_config()` and changes
what differs, so one place holds every key (and `main.py` rejects unknown ones). `config.task`
selects the task module (cen_jax/tasks/<task>.py) that the shared runner drives.

- `base_config()`: the official CEN segmentation recipe (RefineNet-LW on ResNet-101, NYUDv2,
  docs/papers.md §1.2).
- `translation_config()`: the official CEN image-to-image translation recipe (pix2pix U-Net
  generator with private InstanceNorm, shared PatchGAN discriminator, Taskonomy shade + texture
  -> rgb, docs/papers.md §1.1(i), §1.2).
- `dense_config(branches)`: the TPAMI scenarios (multimodal fusion with any M, multitask,
  multimodal multitask) as 'input>task' branches of the segmentation network.
"""

import ml_collections

RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def add_fusion_keys(model: ml_collections.ConfigDict) -> None:
  """config.model keys of the fusion registry (cen_jax/fusion/registry.py)."""
  model.fusion_module = ''  # a module path or .py file whose import registers more fusions
  model.fusion_options = opts = ml_collections.ConfigDict()  # read by the fusion (Site.options)
  opts.random_fraction = 0.5  # 'random_exchange': fraction of each partition exchanged
  opts.random_seed = 0


def add_runner_keys(train: ml_collections.ConfigDict) -> None:
  """The config.train keys the shared runner (cen_jax/train.py) reads for every task."""
  train.parallel = 'pmap'  # 'pmap' | 'shard_map'
  train.eval_every_epochs = 5
  train.log_every_steps = 10
  train.checkpoint_every_steps = 500
  train.keep_checkpoints = 2
  train.num_previews = 4
  train.max_steps = -1  # > 0 truncates the schedule (smoke runs)
  train.skip_nonfinite = False  # False: stop at a non-finite loss/gradient; True: skip it
  # CPU only. False: XLA:CPU runs each step on the calling thread, whose glibc arena reuses the
  # step's temporaries; True: on a worker thread, whose arena maps any buffer over 64 MiB afresh
  # every step (cen_jax/host_memory.py), but the host prepares the next batch meanwhile: faster
  # for steps with less than 64 MiB of temporaries (the demos).
  train.cpu_async_dispatch = False


def add_process_keys(config: ml_collections.ConfigDict) -> None:
  """Keys of the process rather than the experiment: several processes, the compile cache."""
  config.distributed = distributed_config()
  # JAX's persistent compilation cache (cen_jax/compile_cache.py): 'default' ($JAX_COMPILATION_
  # CACHE_DIR, else ~/.cache/cen_jax/xla), a folder, or '' (off).
  config.compile_cache_dir = 'default'


def distributed_config() -> ml_collections.ConfigDict:
  dist = ml_collections.ConfigDict()
  dist.initialize = False  # call jax.distributed.initialize (auto-detected on TPU/Slurm/MPI)
  dist.coordinator_address = ''
  dist.num_processes = 1
  dist.process_id = 0
  return dist


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = 'segmentation'  # 'segmentation' | 'translation' (cen_jax/tasks/<task>.py)
  config.seed = 42
  config.expected = ()  # (output, metric, mean, std) over seeds: what `--mode check` compares
  # Branch order: branch m of every stacked array is modality config.modalities[m].
  config.modalities = ('rgb', 'depth')

  config.model = m = ml_collections.ConfigDict()
  m.fusion = 'cen'  # a registered fusion: 'cen' | 'asymfusion' | 'none' | ... (fusion/registry.py)
  add_fusion_keys(m)
  # 'resnet' (RefineNet-LW on a ResNet, CEN's network) | 'mit_b0'..'mit_b5' (TokenFusion's
  # segmenter: the Mix Transformer and the SegFormer head, cen_jax/models/segformer.py)
  m.backbone = 'resnet'
  m.resnet = 101  # 50 | 101 | 152; ignored when `blocks` is set
  m.blocks = ()  # bottlenecks per stage, e.g. (1, 1, 1, 1) for tiny test models
  m.stem_width = 64
  m.widths = (64, 128, 256, 512)  # bottleneck planes per stage (outputs are 4x)
  m.decoder_widths = (512, 256)  # RefineNet-LW: 512 at the deepest level, 256 elsewhere
  m.num_classes = 40
  m.threshold = 2e-2  # |BN scale| below this => channel exchanged
  m.bn_momentum = 0.1  # PyTorch convention: new = (1 - momentum) * old + momentum * batch
  m.bn_eps = 1e-5
  m.frozen_bn = True  # official FREEZE_BN: running statistics in training, never updated
  m.dropout = 0.5
  m.dtype = 'float32'  # compute dtype: 'float32' | 'bfloat16' (params/statistics stay float32)
  # What each bottleneck and RefineNet block keeps for the backward pass (ResNet backbone):
  # 'none' | 'blocks' (only its input: least memory, the forward runs twice) | 'keep_convs'
  # (its convolutions' outputs; norms, activations and fusions run again). Same values.
  m.remat = 'none'
  m.init_from = ''  # ImageNet .pth (needs torch) or '' for random init: torchvision ResNet, or
  #   the official SegFormer mit_bX.pth for a MiT backbone (loaded into every branch)
  m.embedding_dim = 256  # MiT: the SegFormer head's width
  m.drop_path_rate = 0.1  # MiT: stochastic depth, rising linearly to this over all blocks
  # MiT: per stage widths (heads 1, 2, 5, 8 must divide them), blocks and attention spatial
  # reduction (8, 4, 2, 1: a stage map must be at least that large), overriding the backbone's;
  # () = the official ones. For small test and demo networks.
  m.mit_embed_dims = ()
  m.mit_depths = ()
  m.mit_sr_ratios = ()

  config.data = d = ml_collections.ConfigDict()
  d.name = 'nyudv2'  # TFDS builder under data/
  d.builder_dir = ''  # a folder of your own holding <name>_dataset_builder.py ('' = data/)
  d.data_dir = './tfds_data'  # where prepared array_record files live
  d.manual_dir = ''  # user-downloaded files (NYUDv2/SUN RGB-D layout)
  d.builder_config = ''  # TFDS BuilderConfig name ('' = default; synthetic_scenes: small, tiny)
  d.train_split = 'train'
  d.eval_split = 'test'
  d.crop_size = 500
  d.shorter_side = 350
  d.low_scale = 0.5
  d.high_scale = 2.0
  d.ignore_label = 255
  d.depth_scale = 1.0 / 5000
  d.rgb_mean = IMAGENET_MEAN
  d.rgb_std = IMAGENET_STD
  d.num_workers = 0  # grain worker processes for augmentation (0: in the main process)
  d.eval_batch_size = 1  # per device; batches only group equal-shaped images
  d.eval_upsample = 'bicubic'  # logits -> label size: 'bicubic' (official, cv2) | 'bilinear'
  d.tta_scales = (1.0,)
  d.tta_flip = False

  config.train = t = ml_collections.ConfigDict()
  t.batch_size = 6  # global
  t.stage_epochs = (100, 100, 100)
  t.lr_enc = (5e-4, 2.5e-4, 1e-4)
  t.lr_dec = (3e-3, 1.5e-3, 7e-4)
  t.momentum_enc = 0.9
  t.momentum_dec = 0.9
  t.wd_enc = 1e-5
  t.wd_dec = 1e-5
  t.l1_lambda = 2e-4
  t.l1_per_output = True  # official: the L1 term sits in the loop over M + 1 outputs
  t.clip_grad_norm = 0.0  # > 0: torch's clip_grad_norm_ before the step (official: off)
  # 'sgd' (CEN: two SGD groups, lr_enc / lr_dec per stage) | 'adamw' (TokenFusion's
  # PolyWarmupAdamW: lr_enc / lr_dec per stage for the encoder / decoder, wd_enc on the
  # encoder but its norms, wd_dec on the decoder; warm-up then poly decay, restarted per stage)
  t.optimizer = 'sgd'
  t.adam_betas = (0.9, 0.999)
  t.adam_eps = 1e-8
  t.warmup_steps = 1500  # adamw: linear warm-up from warmup_ratio x lr, in each stage
  t.warmup_ratio = 1e-6
  t.poly_steps = 40000  # adamw: lr x (1 - k / poly_steps) ** poly_power after the warm-up
  t.poly_power = 1.0
  add_runner_keys(t)

  add_process_keys(config)
  return config


def translation_config() -> ml_collections.ConfigDict:
  """The official CEN translation recipe (yikaiw/CEN image2image_translation/main.py defaults).

  `config.modalities` are the input domains (one generator branch each, in this order);
  `config.data.target` is the domain every branch (and the ensemble) predicts.
  """
  config = ml_collections.ConfigDict()
  config.task = 'translation'
  config.seed = 42
  config.expected = ()  # (output, metric, mean, std) over seeds: what `--mode check` compares
  config.modalities = ('reshading', 'edge_texture')  # official default: -i 2 7 0
  # Optional 'input>target' branches (cen_jax/branches.py), e.g. branches.cycle(domains) for
  # cycle fusion; empty: one branch per modality, all predicting config.data.target.
  config.branches = ()

  config.model = m = ml_collections.ConfigDict()
  m.fusion = 'cen'  # a registered fusion with a U-Net 'norm' point, or 'none'
  add_fusion_keys(m)
  # 'unet' (CEN's pix2pix U-Net and PatchGAN) | 'mit_b0'..'mit_b5' (TokenFusion's Mix
  # Transformer generator gen_bX and discriminator dis_bX; threshold 0.02, drop_path_rate 0.1)
  m.backbone = 'unet'
  m.drop_path_rate = 0.1  # MiT: stochastic depth of G and D, rising linearly over the blocks
  # MiT: per stage widths (heads 1, 2, 4, 8, 16 must divide them, and 4 each for the pixel
  # shuffle), blocks and attention spatial reduction (16, 8, 4, 2, 1), overriding the
  # backbone's; () = the official ones. For small test and demo networks.
  m.mit_embed_dims = ()
  m.mit_depths = ()
  m.mit_sr_ratios = ()
  m.ngf = 64  # generator width
  m.ndf = 64  # discriminator width
  m.num_downs = 0  # U-Net levels; 0: log2(config.data.crop_size) (8 at 256x256, as official)
  m.threshold = 1e-2  # |InstanceNorm scale| below this => channel exchanged
  m.in_momentum = 0.1  # running statistics (tracked, never used: G and D use instance stats)
  m.in_eps = 1e-5
  m.dropout = 0.5  # after the first three decoder blocks
  m.test_dropout = True  # official/pix2pix: evaluation and predict keep dropout on
  m.dtype = 'float32'

  config.data = d = ml_collections.ConfigDict()
  d.name = 'taskonomy'  # TFDS builder under data/
  d.builder_dir = ''  # a folder of your own holding <name>_dataset_builder.py ('' = data/)
  d.target = 'rgb'
  d.data_dir = './tfds_data'
  d.manual_dir = ''  # user-downloaded files (Taskonomy layout)
  d.builder_config = ''
  d.train_split = 'train'
  d.eval_split = 'val'
  d.load_size = 286  # training: resize to load_size x load_size (bilinear) ...
  d.crop_size = 256  # ... random crop_size crop; evaluation: resize to crop_size
  d.flip = True
  d.num_workers = 0
  d.eval_batch_size = 1  # per device

  config.train = t = ml_collections.ConfigDict()
  t.batch_size = 1  # global (official)
  t.num_epochs = 300
  t.lr_g = 2e-4
  t.lr_d = 2e-4
  t.beta1 = 0.5
  t.beta2 = 0.999
  t.l1_weight = 100.0  # official 'gama': weight of the pixel L1 of every output
  t.l1_lambda = 1e-3  # sparsity weight on the partitioned InstanceNorm scales (counted once)
  # TokenFusion's recipe: Adam's learning rates are lr_g and lr_d times the global batch size
  # (its main.py); CEN's are not scaled (False).
  t.lr_times_batch = False
  add_runner_keys(t)

  config.eval = e = ml_collections.ConfigDict()
  e.inception_weights = ''  # pytorch-fid InceptionV3 weights (.pth or converted .npz): FID/KID
  e.fid_8bit = True  # truncate the min-max stretched images to 8 bits, as the official's PNGs

  add_process_keys(config)
  return config


def dense_config(branches=('rgb>semseg', 'rgb>depth', 'rgb>normals')) -> ml_collections.ConfigDict:
  """Dense multitask prediction (cen_jax/tasks/dense.py): the segmentation recipe with branches
  given as 'input>task' pairs (cen_jax/branches.py); `config.modalities` becomes the inputs
  the branches read, in order of first appearance."""
  from cen_jax import branches as branches_lib
  config = base_config()
  config.task = 'dense'
  config.branches = tuple(branches)
  config.modalities = tuple(branches_lib.unique(b.input for b in branches_lib.parse(branches)))
  config.data.depth_target_scale = 1.0 / 5000  # stored depth -> metres for the depth target
  config.train.task_weights = ml_collections.ConfigDict(
      {'semseg': 1.0, 'depth': 1.0, 'normals': 1.0})  # every output's loss is weighted by its task
  return config


MIT_BACKBONES = tuple(f'mit_b{i}' for i in range(6))
BACKBONES = ('resnet',) + MIT_BACKBONES
TRANSLATION_BACKBONES = ('unet',) + MIT_BACKBONES


def backbone_family(model_config) -> str:
  """'resnet' or 'mit' for config.model.backbone (one-line error for anything else)."""
  backbone = model_config.get('backbone', 'resnet')
  if backbone not in BACKBONES:
    raise ValueError(f'config.model.backbone={backbone!r}: expected one of {", ".join(BACKBONES)}')
  return 'mit' if backbone in MIT_BACKBONES else 'resnet'


def translation_family(model_config) -> str:
  """'unet' or 'mit' for a translation config.model.backbone (one-line error otherwise)."""
  backbone = model_config.get('backbone', 'unet')
  if backbone not in TRANSLATION_BACKBONES:
    raise ValueError(f'config.model.backbone={backbone!r}: translation expects one of '
                     f'{", ".join(TRANSLATION_BACKBONES)}')
  return 'mit' if backbone in MIT_BACKBONES else 'unet'


def resnet_blocks(model_config) -> tuple:
  if model_config.blocks:
    return tuple(model_config.blocks)
  if model_config.resnet not in RESNET_BLOCKS:
    raise ValueError(f'config.model.resnet={model_config.resnet!r}: expected one of '
                     f'{sorted(RESNET_BLOCKS)} (or set config.model.blocks)')
  return RESNET_BLOCKS[model_config.resnet]
