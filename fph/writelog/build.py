"""Build the TCG write-log plugin where fph looks for it at run time (run by scripts/setup).

``python -m fph.writelog.build [--force]``: compiles ``tcg_writelog.c`` into ``fph/writelog/_build/`` of the
installed package unless the plugin for the current source is there already; prints its path. Without a C
compiler, or when the compiler rejects the source, it prints one line saying so (and what to install) and
exits 1.
"""

from __future__ import annotations

import argparse
import sys

from fph.writelog import tcg
from fph.writelog.errors import PluginBuildError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fph.writelog.build", description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="compile even when the plugin is up to date")
    ap.add_argument("--cc", default=None, help="C compiler (default $CC or cc)")
    args = ap.parse_args(argv)
    fresh = args.force or not tcg.plugin_file().exists()
    try:
        out = tcg.build_plugin(cache_dir=tcg.PLUGIN_BUILD_DIR, cc=args.cc, force=args.force)
    except PluginBuildError as e:
        first, _, rest = str(e).partition("\n")
        print(f"fph.writelog.build: {first}", file=sys.stderr)
        if rest:  # the compiler's own diagnostics, after the one-line summary
            print(rest, file=sys.stderr)
        return 1
    print(f"fph.writelog.build: TCG write-log plugin {'built' if fresh else 'up to date'}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
