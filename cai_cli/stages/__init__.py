"""One module per stage, each with ``run(config, force=False)``; shared machinery in ``base``."""
