"""Distribution metrics of ``diffaccel eval``: FID and KID between image folders, through clean-fid.

clean-fid (Parmar, Zhang, Zhu, "On Aliased Resizing and Surprising Subtleties in GAN Evaluation", CVPR 2022) is
used in ``mode="clean"`` (its anti-aliased PIL resize to 299x299), with its own feature loop
(``get_folder_features``), Frechet distance (``fid_from_feats``, Heusel et al. 2017) and kernel distance
(``kernel_distance``, KID of Binkowski et al. 2018), so that one feature pass serves both numbers. The features are
Inception-V3's (clean-fid's TorchScript file ``inception-2015-12-05.pt``: ``--fid-weights FILE``, else clean-fid's
cache in /tmp or its download) or, in tests, an injected ``feature_extractor`` (clean-fid's
``custom_feat_extractor`` contract: ``(N, 3, 299, 299)`` float in [0, 255] -> ``(N, D)``).

FID of a few samples is biased and its covariance singular below the feature dimension (2048): KID is unbiased
and is the number to read for small sets; the report gives the set size beside both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffaccel.errors import ConfigError
from diffaccel.eval.metrics import Skipped, downloads_allowed, missing_dependency

INCEPTION_FILE = "inception-2015-12-05.pt"
CLEANFID_CACHE = Path("/tmp")
"""Where clean-fid keeps (and downloads) its Inception file on Linux."""
FID_RELIABLE_N = 2048
"""Below this many images per set FID is biased (singular covariance of 2048-dim features): read KID."""
KID_SUBSETS = 100


@dataclass(frozen=True)
class SetDistance:
    """FID and KID between two image sets of sizes ``n1`` and ``n2`` (``fid`` is None below 2 images)."""

    fid: float | None
    kid: float | None
    n1: int
    n2: int

    def to_dict(self) -> dict:
        return {"fid": self.fid, "kid": self.kid, "n1": self.n1, "n2": self.n2,
                "fid_reliable": min(self.n1, self.n2) >= FID_RELIABLE_N}


FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]


def build_extractor(weights: str | Path | None, device: torch.device) -> FeatureExtractor | Skipped:
    """clean-fid's Inception-V3 feature function, or why FID/KID cannot run."""
    name = "FID/KID"
    skipped = missing_dependency(name, "cleanfid", "cleanfid.fid", "clean-fid needs torchvision")
    if skipped is not None:
        return skipped
    from cleanfid.inception_torchscript import InceptionV3W

    if weights is not None:
        path = Path(weights)
        if not path.is_file() or path.name != INCEPTION_FILE:
            raise ConfigError(f"--fid-weights {str(path)!r} must be clean-fid's Inception file named {INCEPTION_FILE}")
        folder, download = path.parent, False
    else:
        folder, download = CLEANFID_CACHE, not (CLEANFID_CACHE / INCEPTION_FILE).is_file()
        if download and not downloads_allowed():
            return Skipped(name, f"no --fid-weights and no {CLEANFID_CACHE / INCEPTION_FILE} (downloads off)")
    try:
        model = InceptionV3W(str(folder), download=download).to(device)
    except Exception as exc:  # noqa: BLE001 - a failed download is a skip, not a crash
        return Skipped(name, f"cannot load Inception-V3 ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
    model.eval()
    return model


def folder_features(folder: str | Path, extractor: FeatureExtractor, device: torch.device) -> np.ndarray:
    """clean-fid features (``mode="clean"``) of every image under ``folder``, in sorted file order."""
    from cleanfid.fid import get_folder_features

    return get_folder_features(str(folder), extractor, num_workers=0, batch_size=32, device=device, mode="clean",
                               verbose=False)


def distance(feats1: np.ndarray, feats2: np.ndarray, *, seed: int = 0) -> SetDistance:
    """FID (``fid_from_feats``) and KID (``kernel_distance``, its random subsets drawn from ``seed``)."""
    from cleanfid.fid import fid_from_feats, kernel_distance

    n1, n2 = len(feats1), len(feats2)
    fid = float(fid_from_feats(feats1, feats2)) if min(n1, n2) >= 2 else None
    kid = None
    if min(n1, n2) >= 2:
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            kid = float(kernel_distance(feats1, feats2, num_subsets=KID_SUBSETS))
        finally:
            np.random.set_state(state)
    return SetDistance(fid, kid, n1, n2)
