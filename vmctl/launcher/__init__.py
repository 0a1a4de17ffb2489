"""A pre-initialised launcher: a fork server that has already imported the VMM.

Starting a VMM means starting CPython and importing vmctl's VMM modules before the first
KVM_RUN; under emulation (the nested host) that is most of a boot's start-up. The launcher
pays it once: `python -m vmctl.launcher serve` imports the modules and waits on a Unix
socket; each command (`vmctl boot`, a `vmctl up`/`run` VMM) is a fork of it that runs with
the client's argv, environment, working directory and stdio (passed as fds).

- client.py: what `vmctl` does first (`VMCTL_LAUNCHER=1`): hand the command to a running
  launcher, relay signals, return its exit status; or start one for the next command.
- server.py: the launcher process (single-threaded when it forks: checked every time).
"""
