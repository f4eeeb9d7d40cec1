"""Regenerate the committed shell completion scripts from click (never edit them by hand).

    python completions/generate.py          # writes completions/eplbctl.{bash,zsh,fish}
    python completions/generate.py --check  # exit 1 if a committed script is stale

The scripts are exactly what ``eplbctl completion SHELL`` (and ``_EPLBCTL_COMPLETE=SHELL_source
eplbctl``) print: small loaders that ask ``eplbctl`` itself for completions at run time.
"""

from __future__ import annotations

import sys
from pathlib import Path

from eplbctl.cli.completion import SHELLS, completion_source

HERE = Path(__file__).resolve().parent


def expected() -> dict[Path, str]:
    # click.echo adds the final newline when the command prints; the files match that output.
    return {HERE / f"eplbctl.{shell}": completion_source(shell) + "\n" for shell in SHELLS}


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path, text in expected().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        if check:
            stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"stale completion scripts: {', '.join(stale)} (run python completions/generate.py)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
