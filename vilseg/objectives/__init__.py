"""Training objectives as plug-ins: each declares what it needs, owns its heads and state, returns named terms.

    objectives:                 # in a training config: name -> weight and options
      xm: {weight: 1.0}
      vis: {weight: 0.5, temperature: 0.1}
      clu: {weight: 1.0, detach: true}

Built-in: ViL-Seg's ``xm``, ``vis``, ``clu`` (:mod:`.vilseg`), MMC's ``mim``, ``msd``, ``gc`` (:mod:`.mmc`),
``maskco`` (:mod:`.maskco`), ``slotcon`` (:mod:`.slotcon`), the region distillation ``dense`` (:mod:`.dense`) and
CLIPSelf's ``clipself`` (:mod:`.clipself`: a CLIP's dense features distilled from its frozen initial copy).
One EMA teacher (:class:`EMATeacher`) serves every objective that needs one.
"""
from .base import NEEDS, REGISTRY, Objective, build_objectives, check_objectives, parse_options, register
from .context import Learner, StepContext
from .teacher import EMATeacher, ema_momentum
from . import clipself, dense, maskco, mmc, slotcon, vilseg  # noqa: E402,F401  (registers the built-in objectives)

__all__ = ["EMATeacher", "Learner", "NEEDS", "Objective", "REGISTRY", "StepContext", "build_objectives", "check_objectives",
           "ema_momentum", "parse_options", "register"]
