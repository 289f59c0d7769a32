"""Where the demo model pair that ships with edgespec lives.

The pair (a ~12M-parameter Llama target and a ~1.4M-parameter draft distilled from it, both
trained on the Python standard library's source by ``experiments/train_demo_models.py``) is
package data, so that a fresh install runs offline. See ``core/demo_models/MODEL_CARD.md``.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODELS_DIR = Path(__file__).parent / "demo_models"
DEFAULT_TARGET = DEMO_MODELS_DIR / "target"
DEFAULT_DRAFT = DEMO_MODELS_DIR / "draft"

# The prompt of `edgespec demo`: code of the kind the demo pair was trained on.
DEMO_PROMPT = "def read_config(path):\n"
# Fixed benchmark prompts: code of the kind the demo pair was trained on, not from its corpus.
BENCH_PROMPTS = (
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "class Cache:\n    def __init__(self, size):\n",
    "    for key, value in items.items():\n        if ",
    '"""Return the list of files under path."""\n',
)


def resolve_pair(target: str | Path | None, draft: str | Path | None) -> tuple[Path, Path]:
    """The (target, draft) checkpoint folders to use: the given ones, else the shipped pair.

    Raises FileNotFoundError naming the folder when one is missing.
    """
    target_path = Path(target) if target else DEFAULT_TARGET
    draft_path = Path(draft) if draft else DEFAULT_DRAFT
    for role, path in (("target", target_path), ("draft", draft_path)):
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{role} model folder {path} has no config.json")
    return target_path, draft_path
