"""``kdbench`` command line: ``python -m kdbench <command> ...``.

Each command lives in its own module and is imported only when run, so
``kdbench --help`` stays fast and imports no training or kernel code.
"""

from __future__ import annotations

import importlib
import sys

# command name -> (module, function taking argv and returning an exit code, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "bench": ("kdbench.bench.cli", "main", "time kdbench against eager / compile / Liger / torchmetrics; --check: GPU check"),
    "run": ("kdbench.sweep.cli", "run_main", "run a benchmark suite (resumable), then write its tables"),
    "table": ("kdbench.sweep.cli", "table_main", "regenerate a suite's tables and figures from its records"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: kdbench <command> [options]\n\ncommands:")
        for name, (_, _, help_) in sorted(COMMANDS.items()):
            print(f"  {name:<8} {help_}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"kdbench: unknown command {name!r}; expected one of {', '.join(sorted(COMMANDS))}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
