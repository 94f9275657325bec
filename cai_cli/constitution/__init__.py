"""Constitutions: the principles behind critique, revision and AI feedback, plus worked examples.

A constitution is loaded from one file or from several files whose parts are merged. The layout
of each file is detected from its content, never from its extension (JSON is valid YAML, so
either syntax works for every layout). One module per layout, each documenting it:

- ``ours``: our own YAML (``source_format`` "cai_cli");
- ``anthropic``: the JSON files of Anthropic's ConstitutionalHarmlessnessPaper repository;
- ``hf``: Hugging Face's llm-swarm constitutional-ai JSON (the alignment-handbook recipe).

``load`` reads a file and picks its layout; ``common`` holds the types every layout builds and
how the parts of several files merge (``load_constitution``'s docstring has the rules).
"""

from cai_cli.constitution.common import (
    ComparisonExample,
    Constitution,
    FewShotExample,
    Principle,
    default_comparison,
)
from cai_cli.constitution.load import FORMATS_HELP, load_constitution

__all__ = [
    "FORMATS_HELP",
    "ComparisonExample",
    "Constitution",
    "FewShotExample",
    "Principle",
    "default_comparison",
    "load_constitution",
]
