#!/usr/bin/env python
"""Write a run's fully resolved config (every key, defaults filled) as YAML: the one record of
the settings every rule of the run got (each rule's params are sections of this config)."""

import yaml

from vlmflow.cli import parser, run, setup_logging
from vlmflow.config import non_default_settings, validate_config
from vlmflow.io import atomic_file


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    setup_logging(a.verbose)
    cfg = validate_config(a.config)
    changed = ", ".join(k for k, _ in non_default_settings(cfg)) or "none"
    header = (
        "# Resolved vlmflow config: every key, with the schema's default where the config files\n"
        "# named none (config/schema/config.schema.yaml). Run it again with\n"
        "#   snakemake --cores all --configfile <this file>\n"
        f"# Settings that differ from the defaults: {changed}\n"
    )
    with atomic_file(a.out) as tmp:
        tmp.write_text(header + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    print(f"resolved config: {a.out}")


if __name__ == "__main__":
    run(main)
