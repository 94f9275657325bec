"""cai_cli: Constitutional AI end to end from one YAML config."""

__version__ = "0.1.0"
