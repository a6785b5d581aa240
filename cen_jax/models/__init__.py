"""The networks (ResNet, RefineNet, pix2pix), built from a config, and functions over their
parameter trees."""

from cen_jax.models.build import (DTYPES, MIN_TRANSLATION_SIZE, branch_names, build_model,
                                  build_translation_models, fusion_options,
                                  translation_num_downs)
from cen_jax.models.params import (EXCHANGE_SCALE_PATH, SEPARATE_ENCODER_PATH,
                                   TRANSLATION_SCALE_PATH, count_params, exchange_scales,
                                   is_encoder, named_exchange_scales,
                                   named_translation_exchange_scales, path_str,
                                   translation_exchange_scales)
from cen_jax.models.pix2pix import Discriminator, Generator
from cen_jax.models.refinenet import SeparateBranches, Segmenter

__all__ = ['DTYPES', 'MIN_TRANSLATION_SIZE', 'branch_names', 'build_model',
           'build_translation_models', 'fusion_options', 'translation_num_downs',
           'EXCHANGE_SCALE_PATH', 'SEPARATE_ENCODER_PATH', 'TRANSLATION_SCALE_PATH',
           'count_params', 'exchange_scales', 'is_encoder', 'named_exchange_scales',
           'named_translation_exchange_scales', 'path_str', 'translation_exchange_scales',
           'Discriminator', 'Generator', 'SeparateBranches', 'Segmenter']
