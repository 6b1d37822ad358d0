"""Hooks that make training reproducible across an interruption.

mmengine seeds ``random``, ``numpy`` and ``torch`` once, when the Runner is built. A run
resumed from ``epoch_2.pth`` therefore starts epoch 3 with the RNG streams of a fresh
process, not with those the uninterrupted run had after two epochs: data augmentation
(``RandomFlip`` draws from ``numpy``), the RPN/RoI samplers, dropout and drop path (``torch``)
all take different decisions, and the losses diverge from the first resumed iteration.
:class:`EpochSeedHook` re-seeds every generator at the start of each epoch from the base seed
and the epoch number, so what an epoch draws depends on nothing that happened before it.
"""
import random
from typing import Optional

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.runner import EpochBasedTrainLoop

from mmhat.registry import HOOKS


def epoch_seed(base_seed: int, epoch: int) -> int:
    """A 32-bit seed for ``epoch`` of a run seeded with ``base_seed``.

    ``SeedSequence`` mixes the pair into well-spread entropy, so runs with seeds 0 and 1 do not
    share epochs (``base_seed + epoch`` would make epoch 1 of seed 0 equal epoch 0 of seed 1).
    The result is below 2**32, the limit of ``numpy.random.seed``.
    """
    return int(np.random.SeedSequence([base_seed, epoch]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch (CPU and every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


@HOOKS.register_module()
class EpochSeedHook(Hook):
    """Re-seed ``random``, ``numpy`` and ``torch`` before every training epoch.

    The seed of epoch ``e`` is :func:`epoch_seed` of (``runner.seed``, ``e``); ``runner.seed``
    is the config's ``randomness.seed`` (restored from the checkpoint on resume; it includes
    the rank when ``randomness.diff_rank_seed`` is set). Together with a seeded sampler
    (mmengine's ``DefaultSampler`` shuffles with ``seed + epoch``), an epoch's batches,
    augmentations and in-model random draws are the same whether the run was interrupted or
    not, and a resumed run reproduces the uninterrupted run's losses exactly (given
    deterministic kernels: CPU, or ``randomness.deterministic=True`` on GPU).

    Usage: ``custom_hooks = [dict(type='mmhat.EpochSeedHook')]``.

    Limits: dataloader workers re-seed themselves through mmengine's ``worker_init_fn`` (the
    same seeds every epoch, so they are reproducible), but ``persistent_workers=True`` keeps
    their generators running across epochs, which a resumed run cannot restore. Iteration-based
    loops have one "epoch" and skip already-trained batches on resume without running hooks,
    so this hook cannot make them exact; it warns there.

    Args:
        seed (int, optional): base seed; ``None`` (default) uses ``runner.seed``.
    """

    # before anything else in before_train_epoch could draw a random number
    priority = 'VERY_HIGH'

    def __init__(self, seed: Optional[int] = None) -> None:
        self.seed = seed

    def before_train(self, runner) -> None:
        """Warn where the epoch is not the unit of resumption (iteration-based loops)."""
        if not isinstance(runner.train_loop, EpochBasedTrainLoop):
            print_log(f'EpochSeedHook re-seeds per epoch, but the train loop is '
                      f'{type(runner.train_loop).__name__}: a resumed run will not reproduce '
                      f'the uninterrupted one exactly', logger='current', level=30)

    def before_train_epoch(self, runner) -> None:
        """Seed every generator from (base seed, epoch about to run)."""
        base = runner.seed if self.seed is None else self.seed
        seed_everything(epoch_seed(base, runner.epoch))
