"""Stage drivers: one small, readable single-controller loop per stage (DESIGN.md, The pipeline).

Each stage writes into `<run_dir>/<stage>/` (Parquet shards + manifest.json) and is skipped when
its manifest says it finished, so a killed run resumes where it stopped. The stage names and
folders live in `cai_ray.layout`.
"""
