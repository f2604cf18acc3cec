"""Extra CLI commands beyond ``run``: predict, import-stego, export-nns, export/import-squirrel."""
