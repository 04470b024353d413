#!/usr/bin/env python
"""Download the base model (model.name, model.revision) into the Hugging Face cache and write a
marker JSON naming the snapshot. Run where the internet is reachable (the login node)."""

import logging

from vlmflow.cli import parser, run, setup_logging
from vlmflow.config import resolve_sections
from vlmflow.hub import fetch
from vlmflow.io import write_json

log = logging.getLogger("vlmflow.fetch_model")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", required=True, help="marker JSON to write")
    p.add_argument(
        "--check-gguf", action="store_true", help="fail if llama.cpp cannot convert its family"
    )
    a = p.parse_args()
    setup_logging(a.verbose)
    m = resolve_sections(a.config, ["model"])["model"]
    info = fetch(m["name"], m["revision"], trust_remote_code=m["trust_remote_code"])
    if a.check_gguf:  # export.save_method gguf*: known once the config is downloaded
        from vlmflow.gguf import check_gguf_family, family_of

        check_gguf_family(family_of(info["snapshot"]), f"{m['name']} (config.json)")
    write_json(a.out, info)
    log.info(
        "%s @ %s: %d files, %.1f MB in %s",
        info["repo_id"],
        info["commit"],
        len(info["files"]),
        info["bytes"] / 1e6,
        info["snapshot"],
    )


if __name__ == "__main__":
    run(main)
