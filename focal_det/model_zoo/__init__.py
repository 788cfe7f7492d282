"""focal_det's model zoo: ``get_config_file``, ``get_config``, ``get`` as detectron2.model_zoo."""
from .model_zoo import TRAINED, get, get_checkpoint_url, get_config, get_config_file, list_configs

__all__ = ["TRAINED", "get", "get_checkpoint_url", "get_config", "get_config_file", "list_configs"]
