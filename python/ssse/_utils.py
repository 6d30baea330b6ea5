"""The old private name of :mod:`ssse.model`, kept while callers move."""

from .model import *  # noqa: F401,F403
from .model import (BATCH_SIZE, FlatModel, LossReductionError, available_memory,  # noqa: F401
                    check_inverse, check_request, concat_data, data_size, finish_update,
                    iter_batches, per_sample_losses, rebatch, warn_if_training)
