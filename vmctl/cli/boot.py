"""Placeholder until the native VMM lands."""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    pass
