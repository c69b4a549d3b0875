"""``python -m kvzip_cache.train_predictor``: the command keeps its name; the code lives in `kvzip_cache.tools.train_predictor`."""

from .tools.train_predictor import main

if __name__ == "__main__":
    main()
