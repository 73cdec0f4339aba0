"""``icrm`` console entry point (the trainer fills in the subcommands)."""

import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="icrm", description="ICRM reward-model training (trainer not yet implemented)")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
