"""CIFAR-100 KD benchmark zoo (CRD/RepDistiller family); importing registers every model."""
