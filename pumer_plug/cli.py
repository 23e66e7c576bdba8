"""The `pumer-plug` command."""


def main(argv=None) -> int:
    raise SystemExit("pumer-plug: not built yet")
