"""The commands that are not stages: init, inspect, report, plan, merge, import-gguf,
push, config validate, status, tiny-model."""
