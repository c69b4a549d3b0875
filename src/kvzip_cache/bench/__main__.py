"""``python -m kvzip_cache.bench``: the benchmark command (`kvzip_cache.bench.cli.main`)."""

from .cli import main

if __name__ == "__main__":
    main()
