"""`python -m elite_export.bench ...`: `elite-export bench ...` where there is no console script."""
from elite_export.bench.cli import bench

bench(prog_name="python -m elite_export.bench")
