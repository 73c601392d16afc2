"""Model registry: ``create_model(name, num_classes, in_chans, **kwargs)``.

Registered: resnet9, resnet18, resnet50, levit_128s/128/192/256/384, ds_cnn_s/m/l.
"""

from maddnet.models.registry import create_model, list_models, register_model
from maddnet.models.weights import load_weights, read_state_dict

__all__ = ["create_model", "list_models", "load_weights", "read_state_dict", "register_model"]
