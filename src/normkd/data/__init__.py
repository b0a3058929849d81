"""Data: embedded digits, CIFAR-100, ImageNet and your own image folders, device-side augmentation."""

from normkd.data.cifar import CIFAR100_MEAN, CIFAR100_STD, check_cifar100_root, load_cifar100
from normkd.data.common import Split, fake_split
from normkd.data.device import Augment, DeviceLoader, EpochPlan, augment_batch
from normkd.data.digits import load_digits_split
from normkd.data.folder import folder_datasets, folder_loaders
from normkd.data.imagenet import IMAGENET_MEAN, IMAGENET_STD, IndexedDataset, imagenet_loaders

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Augment",
    "DeviceLoader",
    "EpochPlan",
    "IndexedDataset",
    "Split",
    "augment_batch",
    "check_cifar100_root",
    "fake_split",
    "folder_datasets",
    "folder_loaders",
    "imagenet_loaders",
    "load_cifar100",
    "load_digits_split",
]
