"""MkDocs hook: the site's Contributing page is CONTRIBUTING.md itself, which is written for the
repository (links like ``docs/results.md``); on the site those pages are its siblings."""
import re
from pathlib import Path


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == "contributing.md":
        source = Path(config["config_file_path"]).parent / "CONTRIBUTING.md"
        markdown = re.sub(r"\]\(docs/", "](", source.read_text())
    return markdown
