"""Benchmarks, each printing one JSON object."""
import argparse


def add_parsers(sub, config_args) -> None:
    pass


def run(args: argparse.Namespace) -> dict:
    raise NotImplementedError
