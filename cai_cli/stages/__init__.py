"""The pipeline's stages, one module each, every one a ``base.Stage``; the list in pipeline
order is ``pipeline.STAGES``. What the stages share: ``common`` (a run of a stage, reading an
earlier stage's output), ``checkpointed`` (the loop that makes records resumably), ``sharded``
(shards and their merge), ``training`` and ``trackers`` (the training stages' skeleton), and
``planning`` (what the stages will do, for ``cai plan``).
"""
