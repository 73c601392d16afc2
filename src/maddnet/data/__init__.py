"""Data sets: one registry, ``create_dataset(name, split, root, augment=..., **kwargs)``.

Registered: fashion_mnist, digits, cifar10, imagenet (class folders), speech_commands
(Google Speech Commands layout), synthetic.
"""

from maddnet.data.registry import DatasetInfo, create_dataset, list_datasets, register_dataset

__all__ = ["DatasetInfo", "create_dataset", "list_datasets", "register_dataset"]
