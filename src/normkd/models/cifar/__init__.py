"""CIFAR-100 KD benchmark zoo (CRD/RepDistiller family); importing registers every model."""

from normkd.models.cifar import (
    mobilenetv2,  # noqa: F401
    resnet,  # noqa: F401
    resnetv2,  # noqa: F401
    shufflenetv1,  # noqa: F401
    shufflenetv2,  # noqa: F401
    vgg,  # noqa: F401
    wrn,  # noqa: F401
)
