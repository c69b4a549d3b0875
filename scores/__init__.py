"""KVzip head scores computed by this project for the models that install from PyPI.

Shipped in the wheel as ``kvzip_cache.scores``; load one by its short name with
``HeadScores.from_pretrained("smollm2-135m")``. ``manifest.json`` lists each file with the command that made it.
"""
