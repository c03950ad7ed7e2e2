"""`peftkit.article`: the seed article's functions under the article's names (it lives in
`peftkit/studies/article.py`; this name is kept so `import peftkit.article` works as documented)."""

from .studies.article import *  # noqa: F401,F403
