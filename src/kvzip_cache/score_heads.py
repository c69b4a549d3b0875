"""``python -m kvzip_cache.score_heads``: the command keeps its name; the code lives in `kvzip_cache.tools.score_heads`."""

from .tools.score_heads import main

if __name__ == "__main__":
    main()
