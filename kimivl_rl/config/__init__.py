"""Typed configuration: the schema and its YAML loader."""
from kimivl_rl.config.loader import (ConfigError, config_from_dict, config_to_dict, dump_config,
                                     load_config)
from kimivl_rl.config.schema import Config

__all__ = ["Config", "ConfigError", "config_from_dict", "config_to_dict", "dump_config", "load_config"]
