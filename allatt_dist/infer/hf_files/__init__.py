"""The files `export --format hf` copies into its output folder, as they are (they import transformers,
not allatt_dist: the exported folder loads where only torch and transformers are installed)."""
