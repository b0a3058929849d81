"""Published CIFAR-100 top-1 (%) that a reproduction is set beside, with where each comes from.

NORM, NORM+KD, NORM+CRD: the NORM authors' README (OSVAI/NORM, ICLR 2023), best test accuracy
over 240 epochs. KD and DKD: mdistiller's README (Zhao et al., CVPR 2022), the CRD benchmark's
schedule. DIST: its authors' README (hunto/DIST_KD, checked at commit 2418f18: CIFAR-100 mean of
their runs; ImageNet top-1). WKD-L + WKD-F and WKD-L alone: its authors' README (JiamingLv/WKD,
checked at commit 214cf88; with their teacher's 1 - CKA class costs, which the shipped recipes
leave to the user). ReviewKD: its paper (Chen et al., CVPR 2021, arXiv 2104.09044) for
CIFAR-100, as Papers with Code lists the paper's results (the KD++ authors' README quotes the
same 75.63); its authors' README (dvlab-research/ReviewKD ``ImageNet/README.md``, checked at
commit cede6ea) for ImageNet. LSKD (KD with logit standardisation): its authors' README
(sunshangquan/logit-standardization-KD, "KD+Ours", each at the base temperature and KD weight its
log is named with, which the ``lskd.yaml`` recipes use).
Pairs are keyed as ``configs/cifar100/<teacher>__<student>`` (``configs/imagenet/...``) folders; a
pair of normkd's own (not in these papers) has no entry.
"""

from __future__ import annotations

SOURCES = {
    "norm": "NORM authors' README",
    "norm_kd": "NORM authors' README",
    "norm_crd": "NORM authors' README",
    "kd": "mdistiller README",
    "dkd": "mdistiller README",
    "dist": "DIST authors' README (hunto/DIST_KD)",
    "wkd_l_wkd_f": "WKD authors' README (JiamingLv/WKD)",
    "wkd_l": "WKD authors' README (JiamingLv/WKD)",
    "lskd": "LSKD authors' README (sunshangquan/logit-standardization-KD)",
    "reviewkd": "ReviewKD paper (CVPR 2021); ImageNet: its authors' README (dvlab-research/ReviewKD)",
}

# pair -> {method recipe name: top-1 %}
CIFAR100: dict[str, dict[str, float]] = {
    "wrn_40_2__wrn_16_2": {"norm": 75.65, "norm_kd": 76.26, "norm_crd": 76.02, "kd": 74.92, "dkd": 76.23, "lskd": 76.11},
    "wrn_40_2__wrn_40_1": {"norm": 74.82, "norm_kd": 75.42, "norm_crd": 75.37, "kd": 73.54, "dkd": 74.81, "dist": 74.43, "lskd": 74.37},
    "resnet56__resnet20": {"norm": 71.35, "norm_kd": 71.61, "norm_crd": 71.51, "kd": 70.66, "dkd": 71.97, "dist": 71.75, "lskd": 71.43},
    "resnet110__resnet20": {"norm": 71.55, "norm_kd": 72.00, "norm_crd": 71.90},
    "resnet110__resnet32": {"norm": 73.67, "norm_kd": 73.95, "norm_crd": 73.81, "kd": 73.08, "dkd": 74.11, "lskd": 74.17},
    "resnet32x4__resnet8x4": {"norm": 76.49, "norm_kd": 76.98, "norm_crd": 76.49, "kd": 73.33, "dkd": 76.32, "dist": 76.31, "wkd_l_wkd_f": 77.28, "wkd_l": 76.53, "reviewkd": 75.63, "lskd": 76.62},
    "vgg13__vgg8": {"norm": 73.95, "norm_kd": 74.46, "norm_crd": 73.58, "kd": 72.98, "dkd": 74.68, "reviewkd": 74.84, "lskd": 74.36},
    "vgg13__MobileNetV2": {"norm": 68.94, "norm_kd": 69.38, "norm_crd": 69.17, "kd": 67.37, "dkd": 69.71, "lskd": 68.61},
    "ResNet50__MobileNetV2": {"norm": 70.56, "norm_kd": 71.17, "norm_crd": 71.08, "kd": 67.35, "dkd": 70.35, "dist": 68.66, "lskd": 69.02},
    "ResNet50__vgg8": {"norm": 75.17, "norm_kd": 75.67, "norm_crd": 75.51},
    "resnet32x4__ShuffleV1": {"norm": 77.42, "norm_kd": 77.79, "norm_crd": 77.50, "kd": 74.07, "dkd": 76.45, "dist": 76.34},
    "resnet32x4__ShuffleV2": {"norm": 78.07, "norm_kd": 78.32, "norm_crd": 77.96, "kd": 74.45, "dkd": 77.07, "dist": 77.35, "lskd": 75.56},
    "wrn_40_2__ShuffleV1": {"norm": 77.06, "norm_kd": 77.63, "norm_crd": 77.09, "kd": 74.83, "dkd": 76.70, "wkd_l_wkd_f": 77.50, "wkd_l": 76.72},
}  # fmt: skip

# ImageNet top-1 (%), keyed as configs/imagenet/<teacher>__<student> folders.
IMAGENET: dict[str, dict[str, float]] = {
    "resnet34__resnet18": {"dist": 72.07, "wkd_l_wkd_f": 72.76, "wkd_l": 72.49, "reviewkd": 71.61},
}


def published(pair: str, method: str) -> float | None:
    """The published top-1 of ``method`` on ``pair`` (the NORM authors' variants count as NORM)."""
    return CIFAR100.get(pair, {}).get(method.removesuffix("_authors"))
