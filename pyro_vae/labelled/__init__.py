"""Models that read labels: the conditional VAE (:class:`CVAE`) and the semi-supervised M2 (:class:`SSVAE`), built
from the same networks, guide families, priors and likelihoods as the :class:`~pyro_vae.model.VAE`
(``--model vae|cvae|m2``; :func:`build_model` builds the one a config names)."""

from pyro_vae.labelled.models import CVAE, SSVAE, LabelledPart, build_model, class_count

__all__ = ["CVAE", "SSVAE", "LabelledPart", "build_model", "class_count"]
