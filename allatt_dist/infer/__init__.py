"""Using a ranked model: `generate` (incremental decoding), `export --format hf` (Hugging Face
Transformers), `serve` (Ray Serve, HTTP JSON).

One job per module: `decode.py` (incremental decoding, sampling, scoring; plain torch), `text.py` (text
through the model's vocabulary), `source.py` (which model: a folder, a bucket, a leaderboard pick),
`hf.py` + `hf_template/` (the export), `serve.py` (the Ray Serve app), `commands.py` (the sub-commands).
Model code (allatt_dist/model/) knows nothing of this package, nor of Ray.
"""

from allatt_dist.infer.commands import register

__all__ = ["register"]
